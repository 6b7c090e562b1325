#!/usr/bin/env bash
# On the device machine (one GPU): Megatron-LM's own pretrain_gpt.py with NSA's layer spec, as the README
# tells Megatron-LM users to run it, next to the same command with Megatron's default spec. Megatron-LM
# travels as source: run scripts/fetch_megatron_lm.sh and ../shared/tools/gpu-wheels here first, then
#   device:  scripts/gpu_megatron_lm.sh                  carry: ["megatron-lm", ".whl"]; about 6-8 min
#   here:    PYTHON=/path/to/python scripts/gpu_megatron_lm.sh --check
# --check (no GPU) runs every command below through scripts/check_megatron_lm_args.py instead: Megatron-LM
# parses and validates it, its --spec resolves to a ModuleSpec, and for the NSA and default specs
# Megatron-LM's gpt_builder builds the model and runs a forward and backward pass on the CPU.
#
# Runs, each a fresh pretrain_gpt.py (mock data, bf16, distributed optimizer, $SEQ tokens, 4 layers,
# hidden 1024, 8 heads, 2 KV groups, head dim 128, vocab 4096, batch 4, no attention dropout, fp32
# softmax):
#   nsa                  --spec nsa_parallel.megatron.paper_spec layer_spec, $ITERS iterations, --save every 10
#   nsa_resume           the same with --load of iteration 10 (--ckpt-step 10): iterations 11.. again
#   default              Megatron's default spec (local: DotProductAttention), $ITERS iterations
#   user_spec            --spec my_nsa_spec layer_spec: the README's own module, written from README.md
#   {nsa,default}_{full,selective}   --recompute-granularity full (uniform, 1 layer) and selective
# Every run's log ends up in $OUT/logs.tar.gz; $OUT/summary.md and summary.json compare them
# (benchmarks/megatron_lm_summary.py). Megatron-LM is not patched: the flags below turn off what needs
# Transformer Engine or apex (neither is on the image), and --transformer-impl local picks its own modules.
set -uo pipefail
check=0; [ "${1:-}" = "--check" ] && check=1
SEQ=${SEQ:-8192}; ITERS=${ITERS:-20}; BUDGET=${BUDGET:-540}
py=${PYTHON:-python3}
OUT=${OUT:-/tmp/out}; logs=$OUT/logs; mkdir -p "$logs"
[ -f megatron-lm/pretrain_gpt.py ] || { echo "megatron-lm/ is missing: run scripts/fetch_megatron_lm.sh here and carry it" >&2; exit 2; }
export PYTHONPATH=$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1

# The README's user spec module, as the file it names (what a user would write).
spec_dir=$(mktemp -d)
"$py" - "$spec_dir" <<'PY' || exit 2
import re, sys
block = re.search(r"```python\n# my_nsa_spec.py\n(.*?)```", open("README.md").read(), re.S).group(1)
open(f"{sys.argv[1]}/my_nsa_spec.py", "w").write(block)
PY
export PYTHONPATH=$PYTHONPATH:$spec_dir

if [ $check = 0 ]; then
  if [ -d .whl ]; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
  fi
  # pretrain_gpt.py runs `make` for its dataset helpers; the megatron-core wheel's prebuilt one (same
  # helpers.cpp) makes that a no-op, whatever compilers and Python headers the image has.
  ext=$("$py" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
  for so in /tmp/site/megatron/core/datasets/helpers_cpp*.so; do
    [ -f "$so" ] && cp "$so" "megatron-lm/megatron/core/datasets/helpers_cpp$ext" && touch "megatron-lm/megatron/core/datasets/helpers_cpp$ext"
  done
  export MAKEFLAGS="LIBEXT=$ext"
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    cat megatron-lm/VERSION
    (cd megatron-lm && "$py" -c "import sys, torch, triton, megatron.core as m; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'megatron.core', m.__version__, m.__file__)")
  } 2>&1 | tee "$OUT/env.txt"
fi

model=(--transformer-impl local --num-layers 4 --hidden-size 1024 --num-attention-heads 8 --group-query-attention
       --num-query-groups 2 --kv-channels 128 --ffn-hidden-size 4096 --seq-length "$SEQ" --max-position-embeddings "$SEQ"
       --position-embedding-type rope
       --attention-dropout 0  # NSA refuses Megatron-LM's default (0.1)
       --no-rope-fusion --no-persist-layer-norm --no-gradient-accumulation-fusion)  # each needs TE or apex
train=(--micro-batch-size 1 --global-batch-size 4 --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 2
       --clip-grad 1.0 --weight-decay 0.1 --bf16 --use-distributed-optimizer --seed 1234
       --mock-data --tokenizer-type NullTokenizer --vocab-size 4096 --log-interval 1 --eval-iters 0)
nsa=(--spec nsa_parallel.megatron.paper_spec layer_spec)
full=(--recompute-granularity full --recompute-method uniform --recompute-num-layers 1)
selective=(--recompute-granularity selective)
ckpt=/tmp/megatron_lm_ckpt; rm -rf "$ckpt"
failed=()
deadline=$((SECONDS + BUDGET))

# --check's forward pass: not for the default spec with recomputation, whose DotProductAttention makes its
# causal mask on "cuda" inside the backward pass, where the CPU stand-ins do not reach.
run() {  # name, seconds at most, forward tokens for --check (0: parse only), pretrain_gpt.py arguments
  local name=$1 limit=$2 tokens=$3; shift 3
  if [ $check = 1 ]; then
    echo "== $name"
    local fwd=(); [ "$tokens" -gt 0 ] && fwd=(--forward "$tokens")
    "$py" scripts/check_megatron_lm_args.py megatron-lm "${fwd[@]}" -- "${model[@]}" "${train[@]}" "$@" \
      > "$logs/check_$name.log" 2>&1 || { failed+=("$name"); tail -5 "$logs/check_$name.log"; }
    grep -E "^(--spec|parsed|Megatron-LM's)" "$logs/check_$name.log"
    return
  fi
  local left=$((deadline - SECONDS)); [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 40 ]; then echo "== $name: skipped, out of time"; return; fi
  echo "== $name (at most ${limit}s)"
  timeout "$limit" "$py" -m torch.distributed.run --standalone --nproc_per_node 1 megatron-lm/pretrain_gpt.py \
    "${model[@]}" "${train[@]}" "$@" > "$logs/$name.log" 2>&1
  echo "   exit $? after $((SECONDS - deadline + BUDGET))s of the budget"
  grep -E "iteration +[0-9]+/" "$logs/$name.log" | tail -2 | cut -c1-200
  grep -E "Error|error:" "$logs/$name.log" | grep -v -i "warn" | tail -3
}

run nsa 170 256 "${nsa[@]}" --train-iters "$ITERS" --save "$ckpt/nsa" --save-interval 10 --log-memory-interval "$ITERS"
run nsa_resume 120 0 "${nsa[@]}" --train-iters "$ITERS" --load "$ckpt/nsa" --ckpt-step 10 --exit-on-missing-checkpoint \
  --log-memory-interval "$ITERS"
run default 120 256 --train-iters "$ITERS" --log-memory-interval "$ITERS"
run user_spec 70 256 --spec my_nsa_spec layer_spec --train-iters 5 --log-memory-interval 5
run nsa_full 70 256 "${nsa[@]}" "${full[@]}" --train-iters 5 --log-memory-interval 5
run nsa_selective 70 256 "${nsa[@]}" "${selective[@]}" --train-iters 5 --log-memory-interval 5
run default_full 70 0 "${full[@]}" --train-iters 5 --log-memory-interval 5
run default_selective 70 0 "${selective[@]}" --train-iters 5 --log-memory-interval 5
rm -rf "$spec_dir"
if [ $check = 1 ]; then echo "failed: ${failed[*]:-none} (logs: $logs)"; exit ${#failed[@]}; fi
rm -rf "$ckpt"
"$py" benchmarks/megatron_lm_summary.py "$logs" --json "$OUT/summary.json" | tee "$OUT/summary.md"
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$logs"  # at most 8 files come back
