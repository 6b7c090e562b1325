#!/usr/bin/env bash
# The quality comparison in one device call (one GPU): train CONFIG with each attention named (nsa,
# full or both: "nsa,full") for at most TRAIN_S seconds, then nsa-eval every run at 1/4, 1/2, 1, 2
# and 4 times the training length. The runs share the seed, data and order. Named together, they
# train side by side on the one GPU (a small model leaves it mostly idle) and are evaluated at the
# newest checkpoint step that all of them reached, so at equal tokens; their tokens/s is then shared
# GPU time and not a speed figure.
#   ../shared/tools/gpu-wheels          # once, here: the wheels the image lacks, into .whl/
#   device run (carry .whl):  bash scripts/gpu_quality.sh configs/quality-gpu-1k.yaml nsa,full 420 [overrides...]
#   then here:  nsa-eval --merge <files_at>/eval.json ... --out ...   (to combine calls)
set -uo pipefail
config=${1:?config}; attentions=${2:?nsa, full or nsa,full}; train_s=${3:-420}; shift 3 || true
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD:$PWD/kernels PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
runs=/tmp/runs; mkdir -p "$runs" "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 benchmarks/make_code_corpus.py /tmp/corpus/stdlib > /dev/null
# Checkpoints often and all kept, so that a step every run reached exists in each.
for attention in ${attentions//,/ }; do
  timeout "$train_s" python3 -m nsa_parallel.train --config "$config" --no-ray model.attention="$attention" \
    data.path=/tmp/corpus/stdlib train.output_dir="$runs/$attention" train.checkpoint_interval=100 \
    train.keep_checkpoints=1000 "$@" > "$OUT/train_$attention.log" 2>&1 &
done
wait
for attention in ${attentions//,/ }; do
  echo "== $attention"; grep -v "^W1" "$OUT/train_$attention.log" | tail -6
done
step=$(python3 - "$runs" ${attentions//,/ } <<'EOF'
import sys
from pathlib import Path
steps = [{int(p.name[5:]) for p in Path(sys.argv[1], a, "checkpoints").glob("step_*") if (p / "metadata.json").is_file()}
         for a in sys.argv[2:]]
common = set.intersection(*steps)
print(max(common) if common else "none")
EOF
)
echo "evaluating every run at step $step (the newest that all reached)"
[ "$step" = none ] && exit 1
length=$(python3 -c "from nsa_parallel.job_config import load_job_config as l; print(l('$config').train.seq_length)")
run_args=(); for attention in ${attentions//,/ }; do run_args+=(--run "$runs/$attention"); done
python3 -m nsa_parallel.eval "${run_args[@]}" --step "$step" --out "$OUT" \
  --seq-lens $((length / 4)),$((length / 2)),$length,$((length * 2)),$((length * 4)) \
  --samples 8 --lm-samples 16 2>&1 | grep -v "^W1" | tail -30
cat "$OUT/summary.md"
