#!/usr/bin/env bash
# On the device machine (carry .whl with fla_core and einops wheels): this project's kernels vs
# flash-linear-attention's public NSA, after checking the two compute the same function.
# Usage: scripts/gpu_public_nsa.sh [seconds] [seq lens...]
set -uo pipefail
seconds=${1:-240}; shift || true
[ $# -gt 0 ] || set -- 16384 32768 65536
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=$PWD:$PWD/kernels:/tmp/site PYTHONUNBUFFERED=1
timeout "$seconds" python3 benchmarks/bench_public_nsa.py --check-naive --seq-lens "$@" \
  --json "$OUT/public_nsa.json" 2>&1 | grep -v -i warn | tee "$OUT/public_nsa.md"
