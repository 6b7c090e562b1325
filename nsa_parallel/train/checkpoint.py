"""Atomic Megatron distributed checkpoints under ``<output_dir>/checkpoints``.

``step_00000100/`` is a ``megatron.core.dist_checkpointing`` directory; ``latest`` holds
the name of the newest complete one. A checkpoint is written into
``.tmp-step_00000100/``, renamed once every rank has finished, and only then named in
``latest``: a write interrupted at any point leaves ``latest`` on the previous
checkpoint, and the next run deletes the leftover. Older checkpoints beyond
``train.keep_checkpoints`` are deleted after ``latest`` moves on.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint import FileSystemWriter

from .fault import maybe_crash

log = logging.getLogger(__name__)

LATEST = "latest"
TMP_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"step_(\d{8})")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def latest_checkpoint(root: Path) -> Path | None:
    """The checkpoint ``latest`` names, or ``None`` before the first one."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "metadata.json").is_file():
        raise RuntimeError(f"{pointer} names {path}, which is not a complete checkpoint")
    return path


def remove_interrupted(root: Path) -> None:
    """Deletes checkpoints whose writing never finished (rank 0, before any rank saves)."""
    for leftover in root.glob(TMP_PREFIX + "*"):
        log.warning("removing interrupted checkpoint %s", leftover)
        shutil.rmtree(leftover)


class _HostSaveStrategy(TorchDistSaveShardedStrategy):
    """Megatron's ``torch_dist`` format, written by ``torch.distributed.checkpoint``'s synchronous writer.

    For gloo runs (CPU tensors): Megatron's own writer copies tensors to the host with
    ``non_blocking=True`` and then calls ``torch.cuda.synchronize()``, and broadcasts its status in a
    ``torch.cuda.current_device()`` tensor, none of which a CPU-only torch has. The files are the same
    (torch's DCP layout, through Megatron's planner), so either strategy's checkpoints load alike.
    """

    def save(self, sharded_state_dict: ShardedStateDict, checkpoint_dir: Path) -> None:
        state, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
        torch.distributed.checkpoint.save(
            mcore_to_pyt_state_dict(state, False), storage_writer=FileSystemWriter(checkpoint_dir),
            planner=MCoreSavePlanner(dedup_replicated_tensors=not self.keep_only_main_replica,
                                     flatten_state_dict=False))


def _save_strategy() -> TorchDistSaveShardedStrategy | None:
    """``None`` (Megatron's default writer) under NCCL; the host writer under gloo."""
    return _HostSaveStrategy("torch_dist", 1) if dist.get_backend() == "gloo" else None


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _prune(root: Path, keep: int) -> None:
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.fullmatch(p.name)))
    for _, old in steps[:-keep]:
        shutil.rmtree(old)


def save_checkpoint(root: Path, step: int, state: ShardedStateDict, keep: int, extra_files: dict[str, str]) -> Path:
    """Writes ``state`` (all ranks) as checkpoint ``step``; rank 0 adds ``extra_files`` (name: text)."""
    rank0 = dist.get_rank() == 0
    final = root / checkpoint_name(step)
    tmp = root / (TMP_PREFIX + final.name)
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(state, str(tmp), sharded_strategy=_save_strategy())
    maybe_crash("checkpoint", step, root)
    dist.barrier()  # every rank's shards are on disk
    if rank0:
        for name, text in extra_files.items():
            (tmp / name).write_text(text)
        if final.exists():  # left by a run that stopped before naming it in `latest`
            shutil.rmtree(final)
        tmp.rename(final)
        _write_atomically(root / LATEST, final.name + "\n")
        _prune(root, keep)
    dist.barrier()
    return final


def load_checkpoint(path: Path, template: ShardedStateDict) -> dict[str, Any]:
    """Loads checkpoint ``path`` into the shapes and shardings of ``template`` (all ranks)."""
    return dist_checkpointing.load(template, str(path))


def load_common(path: Path) -> dict[str, Any]:
    """The checkpoint's plain (non-sharded) values, e.g. its step."""
    return dist_checkpointing.load_common_state_dict(str(path))


def checkpoint_tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The global shape of every tensor in checkpoint ``path``, from its metadata alone."""
    metadata = dist_checkpointing.load_tensors_metadata(str(path))
    return {key: tuple(tensor.global_shape) for key, tensor in metadata.items()}
