#!/usr/bin/env bash
# The README's test command: installs the CPU stack if needed (idempotent), then runs the full suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/tools/bootstrap.sh"
cd "$root"
exec "${CTNOCVR_VENV:-$root/.venv}/bin/python" -m pytest -q "$@"
