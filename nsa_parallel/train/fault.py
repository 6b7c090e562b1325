"""A test-only hook that kills one worker once, to exercise restarts and resume.

``NSA_TRAIN_CRASH=<rank>:<step>:<where>`` makes global rank ``<rank>`` exit at once
(``os._exit``, as a killed process would) at step ``<step>``: ``where`` is ``step``
(after that optimizer step) or ``checkpoint`` (after writing its shards of that step's
checkpoint, before the checkpoint is complete). It fires once: a marker file left
in ``marker_dir`` keeps the restarted worker going.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch.distributed as dist

ENV = "NSA_TRAIN_CRASH"
WHERE = ("step", "checkpoint")


def maybe_crash(where: str, step: int, marker_dir: Path) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    rank, at_step, at = spec.split(":")
    if at not in WHERE:
        raise ValueError(f"{ENV} ({spec!r}): where must be one of {WHERE}")
    if (int(rank), int(at_step), at) != (dist.get_rank(), step, where):
        return
    marker = marker_dir / f".crashed-{spec.replace(':', '-')}"
    if marker.exists():
        return
    marker.touch()
    print(f"{ENV}: rank {rank} exits at {where} {step}", flush=True)
    os._exit(1)
