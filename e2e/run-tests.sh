#!/usr/bin/env bash
# `make test`: formatting and lints, then every test of the workspace (unit,
# golden, packet tests in network namespaces, integration tests on the real
# control plane and moto), then a one-line summary.
set -uo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/causeway/target}
log=$(mktemp -t causeway-test.XXXXXX)
trap 'rm -f "$log"' EXIT
start=$(date +%s)
status=0

phase() { printf '\n== %s\n' "$1"; }

phase "format and lints"
cargo fmt --all -- --check || { echo "cargo fmt: run 'cargo fmt --all'"; status=1; }
cargo clippy --workspace --all-targets --quiet -- -D warnings || status=1

phase "build"
cargo build --workspace --bins --quiet || exit 1

phase "tests"
# Integration tests start whole environments (etcd, apiserver, controller-manager,
# moto); three at a time fits this 2-core machine.
cargo test --workspace --no-fail-fast -- --test-threads="${CAUSEWAY_TEST_THREADS:-3}" 2>&1 | tee "$log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

passed=$(grep -oE 'test result: [a-zA-Z]+\. [0-9]+ passed' "$log" | awk '{s += $4} END {print s + 0}')
failed=$(grep -oE '[0-9]+ failed;' "$log" | awk '{s += $1} END {print s + 0}')
ignored=$(grep -oE '[0-9]+ ignored;' "$log" | awk '{s += $1} END {print s + 0}')
phase "summary ($(( $(date +%s) - start )) s)"
grep -E '^test .* FAILED$' "$log" | sed 's/^/  /' || true
[ "$ignored" = 0 ] || echo "  $ignored test(s) ignored: every test must run"
[ "$ignored" = 0 ] || status=1
echo "tests: $passed passed, $failed failed"
exit $status
