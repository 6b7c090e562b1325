"""The learning-rate schedule: linear warm-up, then cosine decay to ``min_lr``.

A pure function of the step, so a resumed run needs no scheduler state.
"""
from __future__ import annotations

import math

from ..job_config import TrainSection


def learning_rate(step: int, train: TrainSection) -> float:
    """The learning rate of optimizer step ``step`` (0-based)."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    decay_steps = max(1, train.max_steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / decay_steps)
    return train.min_lr + 0.5 * (train.lr - train.min_lr) * (1.0 + math.cos(math.pi * progress))
