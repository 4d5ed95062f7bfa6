#!/usr/bin/env bash
# Installs what the demo and the tests need and the machine lacks: Debian
# packages (iproute2, iptables with both backends, conntrack, nfacct, nftables,
# openssl, python3-venv), the Kubernetes binaries and helm (built from Go modules, cached) and moto
# (a venv, cached). Safe to run again: it installs only what is missing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

if [ "$(id -u)" != 0 ]; then
  echo "deps: the local environment needs root (network namespaces and iptables): run as root" >&2
  exit 1
fi

missing=()
need() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ] || missing+=("$2"); }
need ip iproute2
need iptables-restore iptables
need iptables-legacy-restore iptables
need conntrack conntrack
need nfacct nfacct
need nft nftables
need openssl openssl
need curl curl
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  # shellcheck disable=SC2207
  unique=($(printf '%s\n' "${missing[@]}" | sort -u))
  if command -v apt-get >/dev/null; then
    echo "deps: installing ${unique[*]}" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${unique[@]}" >/dev/null
  else
    echo "deps: missing ${unique[*]}: install these packages (no apt-get here to do it)" >&2
    exit 1
  fi
fi

command -v go >/dev/null || { echo "deps: go is missing: install Go 1.24 or newer (the Kubernetes binaries are built from its modules)" >&2; exit 1; }
command -v cargo >/dev/null || { echo "deps: cargo is missing: install Rust with rustup (rust-toolchain.toml pins the version)" >&2; exit 1; }

bash "$here/build-k8s.sh" >/dev/null
bash "$here/build-helm.sh" >/dev/null
bash "$here/install-moto.sh" >/dev/null
