"""What a resumed run may change: its config against the checkpoint's ``job.yaml``.

Settings that make the model compute something else, or train on other data, must equal
the checkpoint's: every ``model.*``, ``nsa.*`` and ``data.*`` key, ``train.seq_length``,
``train.precision``, ``train.seed`` (it decides which sample an index is) and
``launch.gpus_per_worker`` (CPU and GPU checkpoints hold the optimizer differently). The
parallel layout may change where the checkpoint reshards: on CPUs the weights and AdamW's
moments are sharded like the weights (layers by their global number), so TP, CP, PP and DP
may all change (a TP=2 run resumed at TP=1, CP=2 at CP=1 or PP=2 at PP=1 gives the
uninterrupted run's losses); on GPUs Megatron's distributed optimizer (``dp_reshardable``)
reshards only over data parallelism, so ``parallel.tensor_model_parallel_size`` and
``parallel.pipeline_model_parallel_size`` must stay. The rest (steps, learning-rate schedule,
batch sizes, logging, checkpointing, launch) may change; ``nsa-train`` lists it in the log.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from ..job_config import JobConfig
from .checkpoint_dirs import resume_candidates
from .errors import JobError

JOB_YAML = "job.yaml"  # the trainer's copy of the run's config, beside each checkpoint
FIXED_SECTIONS = ("model", "nsa", "data")
FIXED_KEYS = ("train.seq_length", "train.precision", "train.seed", "launch.gpus_per_worker")
GPU_FIXED_KEYS = ("parallel.tensor_model_parallel_size", "parallel.pipeline_model_parallel_size")


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train.lr": 0.003, ...}`` from nested sections."""
    if not isinstance(node, dict):
        return {prefix.removesuffix("."): node}
    return {k: v for key, value in node.items() for k, v in _leaves(value, f"{prefix}{key}.").items()}


def is_fixed(key: str, on_gpu: bool) -> bool:
    """Whether ``key`` must equal the checkpoint's for a run to resume from it."""
    return key.split(".")[0] in FIXED_SECTIONS or key in FIXED_KEYS or (on_gpu and key in GPU_FIXED_KEYS)


def saved_config(checkpoint: Path) -> dict[str, Any] | None:
    """The checkpoint's ``job.yaml`` as ``{"train.lr": 0.003, ...}``; None when missing or unreadable."""
    try:
        saved = OmegaConf.to_container(OmegaConf.create((checkpoint / JOB_YAML).read_text()))
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return _leaves(saved) if isinstance(saved, dict) else None


def config_changes(config: JobConfig, saved: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(fixed keys that differ, other keys that differ), each as ``key: SAVED in the checkpoint, NOW now``."""
    # Keys the checkpoint's version did not have yet take their defaults.
    saved = {**_leaves(OmegaConf.to_container(OmegaConf.structured(JobConfig))), **saved}
    now = _leaves(OmegaConf.to_container(OmegaConf.structured(config)))
    fixed, free = [], []
    for key in sorted(saved.keys() | now.keys()):
        before, after = saved.get(key, "(absent)"), now.get(key, "(absent)")
        if before != after:
            (fixed if is_fixed(key, config.launch.gpus_per_worker > 0) else free).append(
                f"{key}: {before!r} in the checkpoint, {after!r} now")
    return fixed, free


def check_resume_config(config: JobConfig, checkpoint: Path) -> list[str]:
    """Raises ``JobError`` naming every setting that differs from ``checkpoint``'s and must
    not; returns the others."""
    saved = saved_config(checkpoint)
    if saved is None:
        raise JobError(f"{checkpoint / JOB_YAML} is missing or unreadable: cannot compare it with this run's config")
    fixed, free = config_changes(config, saved)
    if fixed:
        raise JobError(f"train.output_dir ({config.train.output_dir}) resumes from {checkpoint}, but these "
                       "settings change the model or its data:\n  " + "\n  ".join(fixed)
                       + f"\nset them as in {checkpoint / JOB_YAML}, or give the run another train.output_dir")
    return free


def resume_point(root: Path) -> Path | None:
    """The checkpoint a run will most likely resume from, at a glance (no checksums): the first
    candidate with a readable ``job.yaml``. The workers verify it and may fall back further."""
    return next((p for p in resume_candidates(root) if saved_config(p) is not None), None)
