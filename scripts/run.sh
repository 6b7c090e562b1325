#!/usr/bin/env bash
# Sets up and runs the main job (for now: a small NSA training demo; GPU when present, else CPU).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
python -m nsa_parallel.demo "$@"
