"""``train.init_from``: a new run that starts from another run's weights, as Megatron-LM's
``--pretrained-checkpoint`` with ``--finetune``: step 0, a fresh optimizer and learning-rate
schedule, its own data. The weights must mean what they meant, so every ``model.*`` and ``nsa.*``
key must equal the source checkpoint's ``job.yaml``; everything else may differ, ``train.seq_length``
included (context extension: train short, then go on long). Once the new run has checkpoints of
its own it resumes from them and ``init_from`` is no longer read. Torch-free, so the launching
process checks it before any worker starts.
"""
from __future__ import annotations

from pathlib import Path

from ..job_config import JobConfig
from .checkpoint_dirs import latest_name
from .errors import JobError
from .paths import RunPaths
from .resume_config import JOB_YAML, config_changes, saved_config

WEIGHT_SECTIONS = ("model", "nsa")


def init_checkpoint(source: str) -> Path:
    """The checkpoint ``train.init_from`` names: a ``step_N`` directory, or a run directory (its ``latest``)."""
    path = Path(source)
    if (path / "metadata.json").is_file():
        return path
    root = RunPaths(path).checkpoints
    name = latest_name(root) if root.is_dir() else None
    if name is None or not (root / name / "metadata.json").is_file():
        raise JobError(f"train.init_from ({source}) is neither a complete checkpoint (a step_N directory) nor "
                       f"a run directory with one ({root}/latest)")
    return root / name


def check_init_from(config: JobConfig) -> Path:
    """The checkpoint to start from, after checking that its model is this run's."""
    checkpoint = init_checkpoint(config.train.init_from)
    saved = saved_config(checkpoint)
    if saved is None:
        raise JobError(f"train.init_from: {checkpoint / JOB_YAML} is missing or unreadable, so its model is not known")
    fixed, _ = config_changes(config, saved)
    differ = [line for line in fixed if line.split(".")[0] in WEIGHT_SECTIONS]
    if differ:
        raise JobError(f"train.init_from ({checkpoint}): its weights are of another model:\n  " + "\n  ".join(differ)
                       + f"\nset them as in {checkpoint / JOB_YAML}")
    return checkpoint
