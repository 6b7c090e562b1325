"""``nsa-train --no-ray`` on GPUs: Megatron's DDP + distributed optimizer, bf16, NCCL, and resuming.

CP=2 over two GPUs when the machine has them (``torchrun``), one GPU otherwise. The CPU runs
(LocalAdamW, gloo) are covered bit for bit by ``test_train_ray.py``; here the selection
kernel's float32 atomics make the backward non-deterministic, so a resumed run must match the
uninterrupted one to rounding, not bit for bit.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import gpu

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny-gpu.yaml")


def _train(out: Path, max_steps: int) -> subprocess.CompletedProcess:
    gpus = min(torch.cuda.device_count(), 2)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(gpus)] if gpus > 1 \
        else [sys.executable]
    return subprocess.run(
        [*launcher, "-m", "nsa_parallel.train", "--config", CONFIG, "--no-ray",
         f"parallel.context_parallel_size={gpus}", f"launch.num_workers={gpus}", f"train.max_steps={max_steps}",
         "train.checkpoint_interval=3", f"train.output_dir={out}"],
        check=False, capture_output=True, text=True, timeout=400, cwd=ROOT)


def _losses(out: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@gpu
def test_gpu_training_resumes_from_its_checkpoint(tmp_path):
    pytest.importorskip("megatron.core")
    whole, split = tmp_path / "whole", tmp_path / "split"
    for out, steps in ((whole, 8), (split, 3), (split, 8)):
        run = _train(out, steps)
        assert run.returncode == 0, run.stdout + run.stderr
    assert f"resuming from {split / 'checkpoints' / 'step_00000003'} (step 3)" in run.stdout + run.stderr
    reference, resumed = _losses(whole), _losses(split)
    assert sorted(resumed) == sorted(reference) == list(range(1, 9))
    assert reference[8] < reference[1], reference
    for step in range(4, 9):  # fresh Adam moments or a wrong data position would move these by far more
        assert abs(resumed[step] - reference[step]) <= 1e-3 * reference[step], (step, resumed, reference)
