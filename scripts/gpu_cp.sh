#!/usr/bin/env bash
# On a multi-GPU device machine: the kernel tests on one GPU, then the context-parallel benchmark on
# 1, 2 and 4 GPUs. Usage: scripts/gpu_cp.sh "<1-GPU seq lens>" "<2-GPU seq lens>" "<4-GPU seq lens>" [tests]
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:$PWD/kernels:${PYTHONPATH:-} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ "${4:-}" = tests ]; then
  timeout 240 python3 -m pytest -q -p no:cacheprovider -n 8 tests/test_kernel_banded_attention.py \
    tests/test_kernel_block_selection.py tests/test_kernel_selection_attention.py tests/test_ops.py \
    tests/test_layer.py 2>&1 | tee "$OUT/pytest.log" | grep -E "passed|failed|FAILED|Error" | tail -30
fi
run() {  # run <gpus> <seq lens> [extra args]
  local n=$1 seqs=$2; shift 2
  [ -z "$seqs" ] && return
  timeout 280 python3 -m torch.distributed.run --nproc_per_node="$n" benchmarks/bench_context_parallel.py \
    --seq-lens $seqs --json "$OUT/cp$n.json" "$@" 2>&1 | grep -v "^W1\|OMP_NUM\|^\*\*\*" | tee "$OUT/cp$n.md"
}
run 2 "$2" --check 32768
run 1 "$1"
run 4 "$3"
