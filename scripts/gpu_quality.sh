#!/usr/bin/env bash
# The quality comparison in one device call (one GPU): train CONFIG with each attention named (nsa,
# full or both: "nsa,full") for at most TRAIN_S seconds; optionally go on from those weights with
# EXTEND_CONFIG (train.init_from: a fresh optimizer, typically a longer train.seq_length) for at most
# EXTEND_S seconds; then nsa-eval every run of the last stage at 1/4, 1/2, 1, 2 and 4 times its
# training length. The runs share the seed, data and order. Named together, they train side by
# side on the one GPU (a small model leaves it mostly idle) and are evaluated at the newest
# checkpoint step that all of them reached, so at equal tokens; their tokens/s then shares the GPU
# and is not a speed figure. The extension stage starts from that common step too.
#   ../shared/tools/gpu-wheels          # once, here: the wheels the image lacks, into .whl/
#   device run (carry .whl):
#     bash scripts/gpu_quality.sh configs/quality-gpu-1k.yaml nsa,full 420
#     bash scripts/gpu_quality.sh configs/quality-gpu-1k.yaml nsa,full 300 configs/quality-16k.yaml 150
#   EVAL_S (default 300) limits the evaluation's seconds, EVAL_SAMPLES (8) its samples per cell.
#   then here:  nsa-eval --merge <files_at>/eval.json ... --out ...   (to combine calls)
set -uo pipefail
config=${1:?config}; attentions=${2:?nsa, full or nsa,full}; train_s=${3:-420}
extend_config=${4:-}; extend_s=${5:-0}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD:$PWD/kernels PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
runs=/tmp/runs; mkdir -p "$runs" "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 benchmarks/make_code_corpus.py /tmp/corpus/stdlib > /dev/null

common_step() {  # the newest checkpoint step that every run of stage $1 reached
  python3 - "$runs" "$1" ${attentions//,/ } <<'EOF'
import sys
from pathlib import Path
root, stage, names = sys.argv[1], sys.argv[2], sys.argv[3:]
steps = [{int(p.name[5:]) for p in Path(root, f"{stage}_{a}", "checkpoints").glob("step_*")
          if (p / "metadata.json").is_file()} for a in names]
common = set.intersection(*steps)
print(max(common) if common else "none")
EOF
}

train_stage() {  # stage, config, seconds, checkpoint interval, overrides ({a} stands for the attention)
  local stage=$1 cfg=$2 seconds=$3 interval=$4; shift 4
  for attention in ${attentions//,/ }; do
    # Checkpoints often and all kept, so that a step every run reached exists in each.
    timeout "$seconds" python3 -m nsa_parallel.train --config "$cfg" --no-ray model.attention="$attention" \
      data.path=/tmp/corpus/stdlib train.output_dir="$runs/${stage}_$attention" train.checkpoint_interval=$interval \
      train.keep_checkpoints=1000 "${@//\{a\}/$attention}" > "$OUT/${stage}_$attention.log" 2>&1 &
  done
  wait
  for attention in ${attentions//,/ }; do
    echo "== $stage $attention"; grep -v "^W1" "$OUT/${stage}_$attention.log" | grep -E "INFO|rror" | tail -4
  done
}

stage=train; train_stage train "$config" "$train_s" 100
step=$(common_step train)
echo "stage train: the newest step that all reached: $step"
[ "$step" = none ] && exit 1
if [ -n "$extend_config" ]; then
  train_stage extend "$extend_config" "$extend_s" 25 "train.init_from=$runs/train_{a}/checkpoints/step_$(printf %08d "$step")"
  extended=$(common_step extend)
  echo "stage extend: the newest step that all reached: $extended"
  if [ "$extended" = none ]; then
    echo "the extension stage left no common checkpoint: evaluating the first stage"
  else
    stage=extend; step=$extended; config=$extend_config
  fi
fi
length=$(python3 -c "from nsa_parallel.job_config import load_job_config as l; print(l('$config').train.seq_length)")
run_args=(); for attention in ${attentions//,/ }; do run_args+=(--run "$runs/${stage}_$attention"); done
timeout "${EVAL_S:-300}" python3 -m nsa_parallel.eval "${run_args[@]}" --step "$step" --out "$OUT" \
  --seq-lens $((length / 4)),$((length / 2)),$length,$((length * 2)),$((length * 4)) \
  --samples "${EVAL_SAMPLES:-8}" --lm-samples "${EVAL_SAMPLES:-8}" 2>&1 | grep -v "^W1" | tail -30
cat "$OUT/summary.md"
tar czf "$OUT/logs.tgz" -C "$OUT" $(cd "$OUT" && ls train_*.log extend_*.log 2>/dev/null) && rm -f "$OUT"/train_*.log "$OUT"/extend_*.log
