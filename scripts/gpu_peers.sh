#!/usr/bin/env bash
# On the device machine: benchmarks/bench_peers.py, nsa-parallel against flash-nsa, fla's parallel_nsa
# and SDPA (flash, cuDNN) in one process. The peers travel as source: run scripts/fetch_peers.sh here
# first and carry peers/ (git-ignored). Megatron is not needed.
# Usage: scripts/gpu_peers.sh [seconds] [seq lens...] [-- more bench_peers.py args]
#   scripts/gpu_peers.sh 570 8192 16384 32768 65536 131072     (about 7-8 min on an H100/H200)
#   scripts/gpu_peers.sh 570 262144                            (NSA only: SDPA stops at 128k)
# Writes $OUT/peers.json (rewritten after every contestant, so a cut-off run keeps what it measured),
# $OUT/peers.md (the tables), $OUT/peers.log and $OUT/peers_env.txt.
set -uo pipefail
seconds=${1:-570}; shift || true
lens=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do lens+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
[ ${#lens[@]} -gt 0 ] || lens=(8192 16384 32768 65536 131072)
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ ! -d peers/flash-nsa/flash_nsa ] || [ ! -d peers/fla/fla ]; then
  echo "peers/ is missing: run scripts/fetch_peers.sh on the dev machine and carry peers" >&2
fi
export PYTHONPATH=$PWD:$PWD/kernels:$PWD/peers/flash-nsa:$PWD/peers/fla${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
  python3 -m pip list 2>/dev/null | grep -i -E '^(flash.attn|einops|setuptools|transformers) '
  cat peers/VERSIONS 2>/dev/null
} 2>&1 | tee "$OUT/peers_env.txt"
timeout "$seconds" python3 -W ignore benchmarks/bench_peers.py --seq-lens "${lens[@]}" \
  --json "$OUT/peers.json" --markdown "$OUT/peers.md" "$@" > "$OUT/peers.log" 2>&1
rc=$?
tail -c 6000 "$OUT/peers.log"
if [ $rc -ne 0 ] && [ -f "$OUT/peers.json" ]; then  # cut off or failed: tables of what was measured
  echo "bench_peers.py exited $rc; tables of what it measured:"
  python3 benchmarks/bench_peers.py --tables-from "$OUT/peers.json" --markdown "$OUT/peers.md"
fi
exit $rc
