#!/usr/bin/env bash
# On the device machine: GPU tests (bf16/fp16/fp32 against float64) and the benchmark.
# Usage: scripts/gpu_check.sh [test-seconds] [bench-seconds] [bench args...]
set -uo pipefail
tests_s=${1:-300}; bench_s=${2:-270}; shift 2 || true
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:$PWD/kernels:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
# -v names every test as it finishes, so $OUT/pytest.log shows the failures even if the timeout
# cuts the run before pytest's summary.
# A test that hangs (a stuck kernel) is killed after 240 s and reported as failed.
timeout "$tests_s" python3 -m pytest -v -ra --tb=short -p no:cacheprovider -n 8 --timeout 240 --timeout-method thread tests > "$OUT/pytest.log" 2>&1
grep -E "FAILED|ERROR|[0-9]+ passed|[0-9]+ failed" "$OUT/pytest.log" | tail -40
timeout "$bench_s" python3 benchmarks/bench_attention.py --components --json "$OUT/bench.json" --plot "$OUT/bench.png" "$@" 2>&1 | tee "$OUT/bench.md"
