"""Atomic, checksummed Megatron distributed checkpoints under ``<output_dir>/checkpoints``.

``step_00000100/`` is a ``megatron.core.dist_checkpointing`` directory; ``latest`` holds
the name of the newest complete one. A checkpoint is written into
``.tmp-step_00000100/``; once every rank has finished, the ranks hash its files (each a
share) into ``checksums.json``, and only then is it renamed and named in ``latest``: a
write interrupted at any point leaves ``latest`` on the previous checkpoint, and the next
run deletes the leftover. Older checkpoints beyond ``train.keep_checkpoints`` are deleted
after ``latest`` moves on. Before loading, :func:`verify_checkpoint` compares every file
with its checksum (see ``checkpoint_dirs`` for which checkpoint a run tries first).
"""
from __future__ import annotations

import logging
import os
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

from . import checksums
from .checkpoint_dirs import LATEST, TMP_PREFIX, checkpoint_name, prune
from .fault import maybe_crash

log = logging.getLogger(__name__)


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


def _broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _hash_shared(directory: Path, names: list[str]) -> dict[str, checksums.Digest | None]:
    """Every file's digest on every rank; each rank reads a share of the files."""
    rank, world = dist.get_rank(), dist.get_world_size()
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, checksums.hash_files(directory, names[rank::world]))
    return {name: digest for part in parts for name, digest in part.items()}


def verify_checkpoint(path: Path) -> str | None:
    """All ranks: what is wrong with checkpoint ``path``, naming the file, or None when every file
    matches its checksum. A checkpoint written before checksums existed passes with a warning."""
    expected: dict | str | None = None
    if dist.get_rank() == 0:
        if not path.is_dir():
            expected = f"{path} does not exist"
        elif not (path / checksums.CHECKSUMS).exists() and (path / "metadata.json").is_file():
            log.warning("%s has no %s (written before checksums): loading it unverified", path, checksums.CHECKSUMS)
        else:
            try:
                expected = checksums.read_checksums(path)
            except ValueError as err:
                expected = str(err)
    expected = _broadcast(expected)
    if expected is None or isinstance(expected, str):
        return expected
    return checksums.first_mismatch(expected, _hash_shared(path, sorted(expected)))


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
    digests = _hash_shared(tmp, _broadcast(checksums.checkpoint_files(tmp) if rank0 else None))
    if rank0:
        checksums.write_checksums(tmp, digests)
        if final.exists():  # left by a run that stopped before naming it in `latest`
            shutil.rmtree(final)
        tmp.rename(final)
        _write_atomically(root / LATEST, final.name + "\n")
        prune(root, step, keep)
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
