"""Which tokens of a sequence each context-parallel rank owns.

``contiguous``: rank ``r`` owns chunk ``r`` of ``P``. ``zigzag`` (Megatron's
load-balanced slicing): the sequence is cut into ``2P`` chunks and rank ``r``
owns chunks ``r`` and ``2P-1-r``, stored in that order. A rank's local tokens
are its chunks concatenated; each chunk is a :class:`Segment`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

LAYOUTS = ("contiguous", "zigzag")
# Megatron's: its batch slicing and rotary embeddings shard a sequence this way.
DEFAULT_LAYOUT = "zigzag"


def check_layout(kind: str) -> None:
    if kind not in LAYOUTS:
        raise ValueError(f"cp_layout ({kind!r}) must be one of {LAYOUTS}")


@dataclass(frozen=True)
class Segment:
    """One owned chunk: global positions ``[start, start + length)`` at local rows ``[local_start, ...)``."""

    start: int
    length: int
    local_start: int

    @property
    def stop(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class ShardLayout:
    """How a sequence of ``seq_len`` tokens is spread over ``world_size`` ranks."""

    kind: str
    world_size: int
    seq_len: int

    def __post_init__(self) -> None:
        check_layout(self.kind)
        if self.world_size < 1:
            raise ValueError(f"context-parallel world size ({self.world_size}) must be positive")

    @property
    def chunks_per_rank(self) -> int:
        return 2 if self.kind == "zigzag" else 1

    @property
    def num_chunks(self) -> int:
        return self.chunks_per_rank * self.world_size

    @property
    def chunk_len(self) -> int:
        return self.seq_len // self.num_chunks

    @property
    def local_len(self) -> int:
        return self.seq_len // self.world_size

    def check_divisible(self, select_block_size: int) -> None:
        """Chunks must hold whole selection blocks, so every block has one owner."""
        unit = self.num_chunks * select_block_size
        if self.seq_len % unit:
            raise ValueError(
                f"sequence length ({self.seq_len}) must be divisible by {self.num_chunks} chunks of the "
                f"{self.kind} layout over {self.world_size} ranks times select_block_size "
                f"({select_block_size}) = {unit}")

    def chunks(self, rank: int) -> tuple[int, ...]:
        if self.kind == "zigzag":
            return (rank, self.num_chunks - 1 - rank)
        return (rank,)

    def check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"cp_rank ({rank}) must be in [0, {self.world_size})")

    def segments(self, rank: int) -> list[Segment]:
        size = self.chunk_len
        return [Segment(c * size, size, i * size) for i, c in enumerate(self.chunks(rank))]

    def local_positions(self, rank: int, device: torch.device | None = None) -> torch.Tensor:
        """Global position of each local row of ``rank``."""
        return torch.cat([torch.arange(s.start, s.stop, device=device) for s in self.segments(rank)])

    def shard(self, x: torch.Tensor, rank: int, dim: int = 1) -> torch.Tensor:
        """The tokens of ``x`` (the whole sequence along ``dim``) that ``rank`` holds, in local order."""
        self.check_rank(rank)
        if x.shape[dim] != self.seq_len:
            raise ValueError(f"x has {x.shape[dim]} tokens along dim {dim}; the layout is of {self.seq_len}")
        if self.world_size == 1:
            return x
        if self.seq_len % self.num_chunks:
            raise ValueError(f"sequence length ({self.seq_len}) must be divisible by the {self.num_chunks} chunks of "
                             f"the {self.kind} layout over {self.world_size} ranks")
        return x.index_select(dim, self.local_positions(rank, x.device))

    def owner(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rank, local row)`` owning each global position."""
        chunk, offset = positions // self.chunk_len, positions % self.chunk_len
        if self.kind == "zigzag":
            late = chunk >= self.world_size
            rank = torch.where(late, self.num_chunks - 1 - chunk, chunk)
            return rank, offset + late.long() * self.chunk_len
        return chunk, offset
