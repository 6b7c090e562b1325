#!/usr/bin/env bash
# Sets up and runs the test suite. Without a GPU, Triton kernels run under TRITON_INTERPRET=1
# and GPU-only tests are skipped with a reason.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
python -m pytest -ra "$@"
