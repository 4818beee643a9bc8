#!/usr/bin/env bash
# The README's main job, end to end on one machine (CPU is enough; ~2 minutes on 2 cores):
#   synthesise Ali-CCP-format raw data -> prepare Parquet shards -> train MMoE + CTnoCVR with TorchX on
#   2 ranks -> evaluate the last checkpoint in one process -> print the metrics table.
# Env: CTNOCVR_DEMO_DIR (data folder, default artifacts/demo), CTNOCVR_DEMO_RUN (run folder),
#      CTNOCVR_DEMO_RANKS (default 2), CTNOCVR_DEMO_ROWS (synthetic train rows, default 200000).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash tools/bootstrap.sh
venv="${CTNOCVR_VENV:-$root/.venv}"
export PATH="$venv/bin:$PATH"   # torchx's local_cwd scheduler launches `torchrun` from PATH
data="${CTNOCVR_DEMO_DIR:-artifacts/demo}"
run="${CTNOCVR_DEMO_RUN:-runs/demo_mmoe_ctnocvr}"
ranks="${CTNOCVR_DEMO_RANKS:-2}"
rows="${CTNOCVR_DEMO_ROWS:-200000}"
t0=$(date +%s)

if [ ! -f "$data/raw/sample_skeleton_train.csv" ]; then
  echo "== 1/4 synthesise $rows train rows -> $data/raw"
  ctnocvr data synth --out "$data/raw" --rows-train "$rows" --rows-test $((rows / 4)) --seed 7
else
  echo "== 1/4 synthetic raw data already in $data/raw"
fi
echo "== 2/4 prepare -> $data/prepared"
ctnocvr data prepare --raw-dir "$data/raw" --out "$data/prepared" --no-progress

echo "== 3/4 train MMoE + CTnoCVR with TorchX on $ranks ranks -> $run"
rm -rf "$run"
torchx run -s local_cwd launchers/ctnocvr.py:train --config mmoe_ctnocvr --j "1x$ranks" \
  -- -o "data.prepared_dir=$data/prepared" --run-dir "$run"

echo "== 4/4 evaluate the last checkpoint (one process, unsharded)"
ctnocvr eval --run-dir "$run" --split test -o "data.prepared_dir=$data/prepared"
echo "== done in $(( $(date +%s) - t0 ))s; run folder: $run (metrics.json, log.jsonl, plan.json, checkpoints/, predictions/)"
