#!/usr/bin/env bash
# On a 2-GPU device machine: context-parallel bytes per step while a model learns real language
# (Python sources as byte tokens), against ring attention's. The training directory (checkpoints
# included) stays under /tmp; the metrics, the table and the plot go to $OUT.
# Usage: scripts/gpu_cp_comm_training.sh [seconds] [overrides...]
set -uo pipefail
seconds=${1:-480}; shift || true
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:$PWD/kernels:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 benchmarks/make_code_corpus.py /tmp/code/stdlib 2>&1 | grep -v -i warn
run=/tmp/cp_comm_run
timeout "$seconds" python3 benchmarks/cp_comm_during_training.py --out "$run" data.path=/tmp/code/stdlib \
  train.max_steps=1500 train.checkpoint_interval=100000 train.log_interval=100 "$@" > "$OUT/train.log" 2>&1
echo "training exit status $? (124: stopped by the time limit; the steps logged so far are summarised)"
cp "$run/metrics.jsonl" "$OUT/" 2>/dev/null
python3 benchmarks/cp_comm_during_training.py --out "$run" --summary-only data.path=/tmp/code/stdlib \
  train.max_steps=1500 train.checkpoint_interval=100000 train.log_interval=100 "$@" 2>&1 | tee "$OUT/summary.md"
cp "$run/cp_comm_summary.json" "$run/cp_comm.png" "$OUT/" 2>/dev/null
