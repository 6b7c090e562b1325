#!/usr/bin/env bash
# Creates .venv (reusing a torch already installed system-wide, e.g. a CUDA build) and installs
# nsa-parallel into it with its train and test extras (the tests train models and render manifests).
# Sourced by the run and test scripts.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv --system-site-packages .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
if ! python -c "import sys, torch; sys.exit(tuple(map(int, torch.__version__.split('.')[:2])) < (2, 8))" 2>/dev/null; then
  # Missing or older than pyproject's floor. An exact CPU-compatible release: a bare "torch" may
  # resolve to a multi-GB CUDA build.
  python -m pip install -q "torch==2.13.0"
fi
python -m pip install -q -e ".[train,test]"
