"""Checks beyond the config's own validation, run before any worker starts or anything is written."""
from __future__ import annotations

from pathlib import Path

from ..job_config import JobConfig
from .data_check import check_token_ids


def check_job(config: JobConfig) -> None:
    """Raises ``ValueError`` naming the key for what the trainer cannot run."""
    path = config.data.path
    if path is not None:
        for suffix in (".bin", ".idx"):
            if not Path(path + suffix).is_file():
                raise ValueError(f"data.path ({path}): {path}{suffix} does not exist (data.path is the prefix "
                                 "of a Megatron indexed dataset, without .bin/.idx)")
        check_token_ids(config)
        if config.data.mix:
            from .data import task_mix
            task_mix(config)  # opens the corpus: each task's room in model.vocab_size and train.seq_length
