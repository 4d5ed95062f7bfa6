#!/usr/bin/env bash
# `make demo`: the whole product on the local environment. Three namespace nodes
# running causeway-agent, two leader-elected causeway-controller replicas against
# the real kube-apiserver and moto; the seed article's Service as a LoadBalancer
# with three echo pods (one per node). Waits for the NLB hostname, reads the
# target group's registered targets from moto, connects from the external client
# namespace to every target's nodeIP:nodePort as the NLB would, and shows the
# health-check answers of an externalTrafficPolicy: Local Service on each node.
# Safe to run twice: `up` replaces a previous environment. `make down` tears it
# down.
set -euo pipefail
cd "$(dirname "$0")/.."
bin_dir="${CARGO_TARGET_DIR:-$HOME/.cache/causeway/target}/debug"
env_bin="$bin_dir/causeway-env"
echo_bin="$bin_dir/causeway-echo"

bold() { printf '\033[1m%s\033[0m' "$1"; }
step() { printf '\n%s\n' "$(bold "== $1")"; }
fail() {
  printf '\ndemo: %s\n' "$1" >&2
  if [ -n "${CAUSEWAY_STATE_DIR:-}" ]; then
    for log in "$CAUSEWAY_STATE_DIR"/causeway-controller-*.log; do
      [ -f "$log" ] || continue
      printf '\n--- last lines of %s\n' "$log" >&2
      tail -n 8 "$log" >&2
    done
    echo "The environment is still up for a look (. .causeway/env); make down removes it." >&2
  fi
  exit 1
}
# Waits up to $1 seconds for command "$2…" to succeed, printing a dot per try.
wait_for() {
  local seconds=$1; shift
  local deadline=$((SECONDS + seconds))
  until "$@"; do
    [ "$SECONDS" -lt "$deadline" ] || { echo; return 1; }
    printf '.'
    sleep 1
  done
  echo
}

step "Starting the environment with Causeway (3 nodes, an agent on each, 2 controllers)"
"$env_bin" up --nodes 3 --with-causeway
# shellcheck disable=SC1091
. .causeway/env
moto_python="$(bash e2e/install-moto.sh)/bin/python"
ext="$CAUSEWAY_EXTERNAL_NETNS"

step "Three backend pods (run=pod-python), one per node"
"$env_bin" add-pods --label run=pod-python --label etp-local=yes \
  pod-python-1=node-1 pod-python-2=node-2
"$env_bin" add-pods --label run=pod-python pod-python-3=node-3

step "The seed's Service as a LoadBalancer of class causeway.dev/nlb (port 3000 -> targetPort 443)"
kubectl apply -f e2e/demo/service-python.yaml
kubectl apply -f e2e/demo/service-python-local.yaml

hostname_of() {
  kubectl get svc "$1" -o jsonpath='{.status.loadBalancer.ingress[0].hostname}'
}
has_hostname() { [ -n "$(hostname_of "$1")" ]; }
printf 'Waiting for causeway-controller to build the NLB and write the ingress hostname'
wait_for 120 has_hostname service-python ||
  fail "service-python got no ingress hostname within 120 s: $(kubectl get svc service-python \
    -o jsonpath='{.status.conditions[?(@.type=="causeway.dev/LoadBalancerReady")].message}')"
hostname=$(hostname_of service-python)
echo "  $hostname"

# node name, InternalIP by EC2 instance ID (from the Node's providerID aws:///<az>/<id>).
declare -A node_of ip_of
while read -r provider name address; do
  id=${provider##*/}
  node_of[$id]=$name
  ip_of[$id]=$address
done < <(kubectl get nodes -o jsonpath='{range .items[*]}{.spec.providerID} {.metadata.name} {.status.addresses[?(@.type=="InternalIP")].address}{"\n"}{end}')

nlb_state() { "$moto_python" e2e/demo/nlb.py "$1"; }
three_targets() { [ "$(nlb_state "$1" | grep -c '^target')" -ge 3 ]; }
printf 'Waiting for three registered targets in moto'
wait_for 60 three_targets "$hostname" || fail "the target group of $hostname does not hold 3 targets"

step "What AWS (moto) holds for $hostname"
nlb=$(nlb_state "$hostname")
lb_name=$(awk -F'\t' '$1=="lb"{print $2" ("$3", "$4")"}' <<<"$nlb")
echo "  load balancer  $lb_name"
while IFS=$'\t' read -r _ port proto tg type hc_proto hc_port hc_path; do
  echo "  listener       $proto $port -> target group $tg ($type targets; health check $hc_proto $hc_port $hc_path)"
done < <(grep '^listener' <<<"$nlb")
targets=()
while IFS=$'\t' read -r _ id port; do
  targets+=("$id:$port")
  echo "  target         $id port $port  = ${node_of[$id]:-?} ${ip_of[$id]:-?}:$port"
done < <(grep '^target' <<<"$nlb" | cut -f1,3,4 | while IFS=$'\t' read -r t id port; do
  printf '%s\t%s\t%s\t%s\n' "${node_of[$id]:-~}" "$t" "$id" "$port"; done | sort | cut -f2-)
leader=$(kubectl -n kube-system get lease causeway-controller -o jsonpath='{.spec.holderIdentity}' 2>/dev/null || true)
echo "  built by       ${leader:-?} (holder of the kube-system/causeway-controller Lease)"

step "Traffic as the NLB sends it: external client ($ext) -> every target's nodeIP:nodePort"
probes=30
replies=()
for target in "${targets[@]}"; do
  id=${target%%:*}; port=${target##*:}
  address="${ip_of[$id]}:$port"
  first=$(ip netns exec "$ext" "$echo_bin" probe --tcp "$address")
  tally=$(ip netns exec "$ext" "$echo_bin" probe --tcp "$address" --count "$probes" --tally-by-name |
    awk '$2=="ok"{printf "%s%s x%s", sep, $3, $1; sep=", "; next} {printf "%s%s x%s", sep, substr($0, index($0,$2)), $1; sep=", "}')
  # "ok <pod> <source it saw>"
  read -r status pod seen <<<"$first"
  if [ "$status" = ok ]; then
    line="${node_of[$id]} $address -> $pod (the pod saw source $seen, an address of ${node_of[$id]}: ETP=Cluster masquerades)"
  else
    line="${node_of[$id]} $address -> $first"
  fi
  echo "  $line"
  echo "      $probes more connections: $tally"
  replies+=("${node_of[$id]} $address: $tally")
done

step "Health checks of service-python-local (externalTrafficPolicy: Local; pods on node-1 and node-2)"
hc_port=$(kubectl get svc service-python-local -o jsonpath='{.spec.healthCheckNodePort}')
node_port_local=$(kubectl get svc service-python-local -o jsonpath='{.spec.ports[0].nodePort}')
printf 'Waiting for its hostname'
wait_for 120 has_hostname service-python-local || fail "service-python-local got no ingress hostname within 120 s"
local_nlb=$(nlb_state "$(hostname_of service-python-local)")
hc_path=$(awk -F'\t' '$1=="listener"{print $8; exit}' <<<"$local_nlb")
hc_target_port=$(awk -F'\t' '$1=="listener"{print $7; exit}' <<<"$local_nlb")
[ "$hc_path" = - ] && hc_path=/
echo "  target group health check (moto): HTTP port $hc_target_port path $hc_path; spec.healthCheckNodePort = $hc_port"
mapfile -t node_ips < <(kubectl get nodes -o jsonpath='{range .items[*]}{.metadata.name} {.status.addresses[?(@.type=="InternalIP")].address}{"\n"}{end}')
health_of() { ip netns exec "$ext" curl -s --max-time 3 -o /dev/null -w '%{http_code}' "http://$1:$hc_port$hc_path" || true; }
# The agents see the Service and its EndpointSlice within a sync: wait until
# node-1 and node-2 report their local pod.
local_ready() {
  local n ok=0
  for n in "${node_ips[@]}"; do
    case ${n%% *} in node-1|node-2) [ "$(health_of "${n#* }")" = 200 ] && ok=$((ok + 1)) ;; esac
  done
  [ "$ok" = 2 ]
}
printf 'Waiting for the agents to see the local endpoints'
wait_for 30 local_ready || true
health=()
for n in "${node_ips[@]}"; do
  name=${n%% *}; address=${n#* }
  answer=$(ip netns exec "$ext" curl -s --max-time 3 -w '\n%{http_code}' "http://$address:$hc_port$hc_path" || true)
  code=$(tail -n 1 <<<"$answer")
  body=$(sed '$d' <<<"$answer" | tr -d '\n')
  echo "  $name GET http://$address:$hc_port$hc_path -> $code $body"
  health+=("$name=$code")
done
echo "  Traffic to its NodePort $node_port_local from $ext (the NLB would send it only to the nodes answering 200):"
local_traffic=()
for n in "${node_ips[@]}"; do
  name=${n%% *}; address=${n#* }
  read -r status pod seen <<<"$(ip netns exec "$ext" "$echo_bin" probe --tcp "$address:$node_port_local" --timeout-ms 1500)"
  if [ "$status" = ok ]; then
    echo "  $name $address:$node_port_local -> $pod (the pod saw source $seen: the client's own address, kept by ETP=Local)"
    local_traffic+=("$name->$pod")
  else
    echo "  $name $address:$node_port_local -> $status (no local pod: dropped, never sent to another node)"
    local_traffic+=("$name->$status")
  fi
done

step "Summary"
echo "  NLB hostname     $hostname"
target_nodes=()
for target in "${targets[@]}"; do target_nodes+=("${node_of[${target%%:*}]}"); done
echo "  targets          ${#targets[@]} instances registered in moto: ${target_nodes[*]} on NodePort ${targets[0]##*:}"
echo "  replies          (from $ext, $probes connections per target)"
for r in "${replies[@]}"; do echo "                   $r"; done
echo "  ETP=Local        health checks ${health[*]}; traffic ${local_traffic[*]}"
echo "  controllers      $CAUSEWAY_CONTROLLERS (leader: ${leader:-?})"

# The demo's claims, checked: every target reached all three pods; only the
# nodes with a local pod pass the ETP=Local health check.
problems=()
[ "${#targets[@]}" = 3 ] || problems+=("${#targets[@]} targets registered instead of 3")
for r in "${replies[@]}"; do
  for pod in pod-python-1 pod-python-2 pod-python-3; do
    grep -q "$pod x" <<<"$r" || problems+=("no reply from $pod through ${r%%:*}")
  done
done
[ "${health[*]}" = "node-1=200 node-2=200 node-3=503" ] ||
  problems+=("ETP=Local health checks ${health[*]}, expected node-1=200 node-2=200 node-3=503")
if [ "${#problems[@]}" -gt 0 ]; then
  printf '  NOT AS EXPECTED: %s\n' "${problems[@]}"
else
  echo "  verdict          every node's NodePort reached all 3 pods; only nodes with a local pod pass the ETP=Local check"
fi

cat <<MSG

The environment keeps running:
  . .causeway/env                         # KUBECONFIG, AWS_ENDPOINT_URL (moto), kubectl on PATH
  kubectl get svc,endpointslices -o wide  # the Services, their hostnames and endpoints
  kubectl describe svc service-python     # the controller's events and condition
  ip netns exec \$CAUSEWAY_EXTERNAL_NETNS $echo_bin probe --tcp <nodeIP>:<nodePort>
  ls \$CAUSEWAY_STATE_DIR                  # logs: agent-node-N.log, causeway-controller-N.log, …
  make down                               # tear everything down
MSG
[ "${#problems[@]}" = 0 ] || fail "the demo did not show what it should (see above)"
