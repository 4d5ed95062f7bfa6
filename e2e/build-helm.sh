#!/usr/bin/env bash
# Builds the helm CLI from the Go module pinned in e2e/helm-bin, once per
# version, the same way build-k8s.sh builds the Kubernetes binaries: the binary
# is cached as $CAUSEWAY_CACHE/helm/<version>/helm outside the clone, so CI and
# later runs reuse it. Prints the path of the binary.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
version=$(awk '$1 == "require" && $2 == "helm.sh/helm/v3" { print $3 } $1 == "helm.sh/helm/v3" { print $2 }' "$here/helm-bin/go.mod" | head -n1)
[ -n "$version" ] || { echo "build-helm: no helm.sh/helm/v3 version in $here/helm-bin/go.mod" >&2; exit 1; }
cache=${CAUSEWAY_CACHE:-$HOME/.cache/causeway}
out="$cache/helm/$version"

if [ -x "$out/helm" ]; then echo "$out/helm"; exit 0; fi

command -v go >/dev/null || { echo "build-helm: go is missing: install the Go toolchain (Debian package golang-go, 1.24 or newer)" >&2; exit 1; }
mkdir -p "$out"
echo "build-helm: building helm $version (first time only; takes a few minutes)" >&2
# As helm's Makefile does: the Kubernetes version `helm template` and `helm lint`
# assume without a cluster is the one of the client-go it is built with (the
# default in the source, v1.20, fails charts with a kubeVersion constraint).
client_go=$(awk '$1 == "k8s.io/client-go" { sub(/^v/, "", $2); print $2 }' "$here/helm-bin/go.mod")
k8s_major=$(( ${client_go%%.*} + 1 ))
k8s_minor=$(echo "$client_go" | cut -d. -f2)
ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$version"
for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
  ldflags="$ldflags -X $pkg.k8sVersionMajor=$k8s_major -X $pkg.k8sVersionMinor=$k8s_minor"
done
(cd "$here/helm-bin" && CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" \
   -o "$out/helm.tmp.$$" helm.sh/helm/v3/cmd/helm)
mv "$out/helm.tmp.$$" "$out/helm"
echo "$out/helm"
