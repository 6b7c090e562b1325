#!/usr/bin/env bash
# Sets up and runs the test suite. Without a GPU, Triton kernels run under TRITON_INTERPRET=1
# and GPU-only tests are skipped with a reason.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
python -m pytest -ra "$@"

# The GPU image runs megatron-core 0.19 (Python 3.12); PyPI serves at most 0.16 for older Pythons.
# 0.19's Python modules import here too (only its compiled dataset helpers do not), so the tests
# that touch Megatron's APIs run once more against it.
megatron_next=0.19.2
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 -d "$wheels" "megatron-core==$megatron_next"
python -m zipfile -e "$wheels"/megatron_core-*.whl "$wheels/site"
echo "== again against megatron-core $megatron_next"
PYTHONPATH="$wheels/site" python -m pytest -ra tests/test_megatron_*.py tests/test_train_data.py \
  tests/test_train_checkpoint.py tests/test_train_config.py tests/test_train_recompute.py tests/test_job_config.py \
  tests/test_tasks.py tests/test_eval.py
