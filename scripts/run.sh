#!/usr/bin/env bash
# Sets up .venv and runs the main job: nsa-train on configs/tiny.yaml (2 CPU workers on an
# embedded local Ray, context parallelism 2), then prints where the checkpoints and logs went.
# Arguments are config overrides, e.g. ./scripts/run.sh train.max_steps=100
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
nsa-train --config configs/tiny.yaml "$@"
