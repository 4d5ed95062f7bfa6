#!/usr/bin/env bash
# `make demo`: the local environment (real etcd, kube-apiserver and
# kube-controller-manager, moto, three namespace nodes), the seed article's
# ClusterIP Service with two backend pods on two nodes, and what the real
# EndpointSlice controller made of them. Safe to run twice: `up` replaces a
# previous environment. `make down` tears it down.
set -euo pipefail
cd "$(dirname "$0")/.."
env_bin="${CARGO_TARGET_DIR:-$HOME/.cache/causeway/target}/debug/causeway-env"

step() { printf '\n\033[1m== %s\033[0m\n' "$1"; }

step "Starting the environment"
"$env_bin" up --nodes 3
# shellcheck disable=SC1091
. .causeway/env

step "Two backend pods (label run=pod-python) on node-1 and node-2"
"$env_bin" add-pods --label run=pod-python pod-python-1=node-1 pod-python-2=node-2

step "The seed's ClusterIP Service (port 3000 -> targetPort 443)"
kubectl apply -f e2e/demo/service-python.yaml

printf 'Waiting for the EndpointSlice controller'
for _ in $(seq 1 60); do
  ready=$(kubectl get endpointslices -l kubernetes.io/service-name=service-python \
    -o jsonpath='{range .items[*].endpoints[?(@.conditions.ready==true)]}{.addresses[0]} {end}')
  [ "$(wc -w <<<"$ready")" -ge 2 ] && break
  printf '.'; sleep 0.5
done
echo

step "kubectl get nodes,svc,endpointslices -o wide"
kubectl get nodes -o wide
echo
kubectl get svc,endpointslices -o wide

cat <<MSG

The environment keeps running:
  . .causeway/env      # KUBECONFIG, AWS_ENDPOINT_URL (moto), kubectl on PATH
  kubectl get nodes    # the namespace nodes, with their moto instances as providerID
  make down            # tear everything down
MSG
