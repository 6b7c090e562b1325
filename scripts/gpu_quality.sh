#!/usr/bin/env bash
# One model of the quality comparison in one device call (one GPU): train CONFIG with the given
# attention for at most TRAIN_S seconds (checkpoints at the config's interval, and at the end), then
# nsa-eval at 1/4, 1/2, 1, 2 and 4 times the training length. NSA and full attention share the seed,
# data and order.
#   ../shared/tools/gpu-wheels tensorboard     # once, here: the wheels the image lacks, into .whl/
#   device run (carry .whl):  bash scripts/gpu_quality.sh configs/quality-16k.yaml nsa 430   then ... full 430
#   here, after both:  nsa-eval --merge <files_at>/nsa/eval/eval.json <files_at>/full/eval/eval.json --out ...
set -uo pipefail
config=${1:?config}; attention=${2:?nsa or full}; train_s=${3:-430}; shift 3 || true
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD:$PWD/kernels PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8
out=$OUT/$attention
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 benchmarks/make_code_corpus.py /tmp/corpus/stdlib
timeout "$train_s" python3 -m nsa_parallel.train --config "$config" --no-ray \
  model.attention="$attention" data.path=/tmp/corpus/stdlib train.output_dir="$out" "$@" 2>&1 | tail -40
echo "train rc=${PIPESTATUS[0]} (124: stopped at ${train_s}s; the latest checkpoint is evaluated)"
length=$(python3 -c "from nsa_parallel.job_config import load_job_config as l; print(l('$config').train.seq_length)")
python3 -m nsa_parallel.eval --run "$out" --out "$out/eval" \
  --seq-lens $((length / 4)),$((length / 2)),$length,$((length * 2)),$((length * 4)) \
  --samples 8 --lm-samples 16 2>&1 | grep -v "^W1" | tail -30
cat "$out/eval/summary.md"
rm -rf "$out/checkpoints" "$out/data_cache"  # hundreds of MB; eval.json keeps the curve and the scores
