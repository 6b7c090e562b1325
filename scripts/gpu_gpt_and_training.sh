#!/usr/bin/env bash
# On a 4-GPU device machine: a Megatron GPT step with NSA under CP=4 at 512k, the 64k kernel
# benchmark, and the 1-GPU 16k training comparison (NSA vs full attention), GPUs used side by side.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD:$PWD/kernels PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
python3 -c "import tensorboard" 2>/dev/null || echo "no tensorboard on the image"
echo "== GPT CP step"
timeout 150 python3 -m torch.distributed.run --nproc_per_node=4 benchmarks/bench_gpt_context_parallel.py --seq 524288 --json $OUT/gpt_cp4.json 2>&1 | grep -v "^W1\|OMP_NUM\|^\*\*\*" | tail -8
echo "== training + kernel bench"
(CUDA_VISIBLE_DEVICES=1 timeout 100 python3 benchmarks/bench_attention.py --seq-lens 65536 --json $OUT/bench64k.json > $OUT/bench64k.md 2>&1) &
(CUDA_VISIBLE_DEVICES=0 timeout 60 python3 -m nsa_parallel.train --config configs/gpu-1gpu-16k.yaml --no-ray train.max_steps=6 train.checkpoint_interval=3 train.output_dir=$OUT/smoke > $OUT/smoke.log 2>&1; echo "smoke rc=$?" >> $OUT/smoke.log
 CUDA_VISIBLE_DEVICES=0 timeout 180 python3 benchmarks/train_curve.py --out $OUT/train_curve --only nsa > $OUT/train_nsa.log 2>&1; echo "nsa rc=$?" >> $OUT/train_nsa.log) &
(CUDA_VISIBLE_DEVICES=2 timeout 230 python3 benchmarks/train_curve.py --out $OUT/train_curve --only full > $OUT/train_full.log 2>&1; echo "full rc=$?" >> $OUT/train_full.log) &
wait
python3 benchmarks/train_curve.py --out $OUT/train_curve --plot-only 2>&1 | tail -8
tail -4 $OUT/smoke.log; tail -6 $OUT/train_nsa.log; tail -6 $OUT/train_full.log; tail -12 $OUT/bench64k.md
rm -rf $OUT/smoke/checkpoints $OUT/train_curve/*/checkpoints
