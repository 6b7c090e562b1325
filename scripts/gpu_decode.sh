#!/usr/bin/env bash
# On the device machine: the inference tests (GPU ones included: bf16 paper settings, CUDA graph
# capture) and the decode benchmark, in one call. Usage: scripts/gpu_decode.sh [seconds for the benchmark]
set -uo pipefail
seconds=${1:-330}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/kernels:$PWD/launch PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
timeout 240 python3 -m pytest -q -x tests/test_inference.py 2>&1 | tail -15 | tee "$OUT/tests.txt"
timeout "$seconds" python3 benchmarks/bench_decode.py --json "$OUT/decode.json" --markdown "$OUT/decode.md" 2>&1 \
  | grep -v -i warn | tee "$OUT/decode.log"
