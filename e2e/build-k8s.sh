#!/usr/bin/env bash
# Builds etcd, kube-apiserver, kube-controller-manager, kubectl and kube-proxy
# from the Go modules pinned in e2e/k8s-bins, once per version: the binaries are
# cached in $CAUSEWAY_CACHE/k8s/<version>/ outside the clone, so CI and later
# runs reuse them.
# Prints the directory holding the binaries.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
version=$(awk '$1 == "k8s.io/kubernetes" { sub(/^v/, "", $2); print $2 }' "$here/k8s-bins/go.mod")
etcd_version=$(awk '$1 == "go.etcd.io/etcd/server/v3" { print $2 }' "$here/k8s-bins/go.mod")
cache=${CAUSEWAY_CACHE:-$HOME/.cache/causeway}
out="$cache/k8s/v$version"
bins=(etcd kube-apiserver kube-controller-manager kubectl kube-proxy)

complete() { for b in "${bins[@]}"; do [ -x "$out/$b" ] || return 1; done; }
if complete; then echo "$out"; exit 0; fi

command -v go >/dev/null || { echo "build-k8s: go is missing: install the Go toolchain (Debian package golang-go, 1.24 or newer)" >&2; exit 1; }
mkdir -p "$out"
minor=$(echo "$version" | cut -d. -f2)
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=v$version \
 -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor \
 -X k8s.io/client-go/pkg/version.gitVersion=v$version"
build() { # name package
  [ -x "$out/$1" ] && return 0
  echo "build-k8s: building $1 v$version (first time only; takes minutes)" >&2
  (cd "$here/k8s-bins" && CGO_ENABLED=0 go build -trimpath -tags selinux,notest \
     -ldflags "$ldflags" -o "$out/$1.tmp" "$2")
  mv "$out/$1.tmp" "$out/$1"
}
build etcd go.etcd.io/etcd/server/v3
build kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver
build kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager
build kubectl k8s.io/kubernetes/cmd/kubectl
# kube-proxy is not part of the environment: the tests that switch a node
# between it and the agent run it.
build kube-proxy k8s.io/kubernetes/cmd/kube-proxy
echo "etcd $etcd_version" > "$out/VERSIONS"
echo "$out"
