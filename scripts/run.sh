#!/usr/bin/env bash
# Sets up .venv and runs the main job: nsa-train on an embedded local Ray with context parallelism 2,
# on 2 GPUs when there are (configs/tiny-gpu.yaml; one GPU: the same without context parallelism),
# else on 2 CPU workers (configs/tiny.yaml). Prints where the checkpoints and logs went.
# Arguments are config overrides, e.g. ./scripts/run.sh train.max_steps=100
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
config=configs/tiny.yaml extra=()
if [ "$gpus" -ge 2 ]; then
  config=configs/tiny-gpu.yaml
elif [ "$gpus" -eq 1 ]; then
  config=configs/tiny-gpu.yaml extra=(launch.num_workers=1 parallel.context_parallel_size=1)
fi
echo "$gpus GPU(s): nsa-train --config $config ${extra[*]} $*"
nsa-train --config "$config" "${extra[@]}" "$@"
