#!/usr/bin/env bash
# Create/refresh .venv with the CPU stack. Idempotent: a second run only checks a stamp and exits.
# GPU clusters: see README "GPU install" (CUDA torch + fbgemm-gpu of the matching release).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${CTNOCVR_VENV:-$root/.venv}"
stamp="$venv/.ctnocvr-stamp"
want="$(cat requirements/cpu.txt pyproject.toml | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip() { "$venv/bin/python" -m pip --disable-pip-version-check -q "$@"; }
echo "[bootstrap] installing the CPU stack into $venv (first run takes a few minutes)" >&2
pip install -r requirements/cpu.txt
pip install --no-deps torchrec==1.8.0
pip install --no-deps -e .
# Guard: a CUDA build must never have slipped in on a CPU machine.
"$venv/bin/python" - <<'PY'
import importlib.metadata as md, sys, torch
bad = [d for d in ("fbgemm-gpu", "fbgemm_gpu") if any(x.metadata["Name"].lower().replace("_", "-") == "fbgemm-gpu" for x in md.distributions())]
if torch.version.cuda is not None or bad:
    sys.exit(f"[bootstrap] a CUDA build was installed (torch cuda={torch.version.cuda}, fbgemm={bad}); refusing")
import torchrec, fbgemm_gpu  # noqa: F401  (fails loudly if the pair does not load)
PY
echo "$want" > "$stamp"
