#!/usr/bin/env bash
# Creates (once) a Python venv outside the clone holding moto's server (and boto3,
# which moto brings), and prints its directory. Safe to run again: a venv is
# reused only when its last install finished (the .complete marker).
set -euo pipefail
version=5.2.5
cache=${CAUSEWAY_CACHE:-$HOME/.cache/causeway}
venv="$cache/venv-moto-$version"
if [ -f "$venv/.complete" ]; then echo "$venv"; exit 0; fi
python=${PYTHON:-python3}
command -v "$python" >/dev/null || { echo "install-moto: python3 is missing: install the Debian package python3-venv" >&2; exit 1; }
rm -rf "$venv"
mkdir -p "$cache"
"$python" -m venv "$venv" || { echo "install-moto: cannot create a venv: install the Debian package python3-venv" >&2; exit 1; }
echo "install-moto: installing moto[server]==$version into $venv (first time only)" >&2
"$venv/bin/pip" install --quiet --disable-pip-version-check "moto[server]==$version" >&2
touch "$venv/.complete"
echo "$venv"
