#!/usr/bin/env bash
# Times the local environment's start, build excluded (warm caches): `up` then
# `down`, RUNS times, for NODES nodes. With --cold it first times building the
# Kubernetes binaries and the moto venv into an empty cache (minutes).
#   usage: e2e/bench-env.sh [--cold] [NODES] [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
cold=false
if [ "${1:-}" = --cold ]; then cold=true; shift; fi
nodes=${1:-3}
runs=${2:-5}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/causeway/target}
cargo build --quiet -p causeway-tests --bins
env_bin="$CARGO_TARGET_DIR/debug/causeway-env"
if $cold; then
  scratch=$(mktemp -d)
  t0=$(date +%s.%N)
  CAUSEWAY_CACHE=$scratch bash e2e/build-k8s.sh >/dev/null
  t1=$(date +%s.%N)
  CAUSEWAY_CACHE=$scratch bash e2e/install-moto.sh >/dev/null
  t2=$(date +%s.%N)
  printf 'cold: Kubernetes binaries %.0f s, moto venv %.0f s\n' "$(awk "BEGIN{print $t1 - $t0}")" "$(awk "BEGIN{print $t2 - $t1}")"
  rm -rf "$scratch"
fi
dir=$(mktemp -d)
for i in $(seq 1 "$runs"); do
  t0=$(date +%s.%N)
  "$env_bin" --env-dir "$dir" up --nodes "$nodes" >/dev/null
  t1=$(date +%s.%N)
  "$env_bin" --env-dir "$dir" down 2>/dev/null
  t2=$(date +%s.%N)
  printf 'warm run %d: %d nodes up in %.2f s, down in %.2f s\n' "$i" "$nodes" "$(awk "BEGIN{print $t1 - $t0}")" "$(awk "BEGIN{print $t2 - $t1}")"
done
rm -rf "$dir"
