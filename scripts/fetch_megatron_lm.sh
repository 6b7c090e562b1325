#!/usr/bin/env bash
# Here (not on the device): Megatron-LM's source, at the release of the GPU image's megatron-core, into
# megatron-lm/ (git-ignored by .gitignore), for scripts/gpu_megatron_lm.sh (carry:
# ["megatron-lm"]) and scripts/check_megatron_lm_args.py. Only what pretrain_gpt.py needs (about 11 MB):
# megatron/, pretrain_gpt.py, gpt_builders.py, model_provider.py, LICENSE. Never a dependency of the
# package, never committed, never patched.
# Default ref: branch core_r0.19.0 at f8837c04ef6c (2026-08-20; its package_info says 0.19.1, and its
# megatron/core differs from the 0.19.2 wheel in 3 files: model_chunk_schedule_plan.py,
# multi_token_prediction.py, transformer_layer.py). For megatron-core 0.16.1: tag core_v0.16.1
# (55ac7082517c). Taken from the fetch tool's mirror (github:NVIDIA/Megatron-LM) when there is one,
# else fetched from GitHub.
# Usage: scripts/fetch_megatron_lm.sh [ref] [mirror-root]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ref=${1:-f8837c04ef6cbef6cdefb8de001aad63178aebbf}
git_dir=${2:-/work/.mirror}/NVIDIA+Megatron-LM/repo
paths=(megatron pretrain_gpt.py gpt_builders.py model_provider.py LICENSE)
rm -rf megatron-lm && mkdir -p megatron-lm
if [ ! -d "$git_dir" ]; then
  git_dir=$(mktemp -d)/repo.git
  git init -q --bare "$git_dir"
  git --git-dir "$git_dir" fetch -q --depth 1 https://github.com/NVIDIA/Megatron-LM "$ref"
  ref=FETCH_HEAD
fi
git --git-dir "$git_dir" archive "$ref" "${paths[@]}" | tar -x -C megatron-lm
version=$(grep -E '^(MAJOR|MINOR|PATCH) =' megatron-lm/megatron/core/package_info.py | awk '{print $3}' | paste -sd.)
echo "Megatron-LM $(git --git-dir "$git_dir" log -1 --format='%H %cs' "$ref") (megatron-core $version)" \
  | tee megatron-lm/VERSION
find megatron-lm -name '*.md' -delete
du -sh megatron-lm
