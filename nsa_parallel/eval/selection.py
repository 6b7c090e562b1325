"""Where NSA looks: at the rows that answer a passkey, does its block selection choose a block of the needle?

A model that misses a passkey either did not find the needle (no layer's selection chose its
blocks) or found it and did not read it. This tells the two apart: it records the block ids that
``ops.select_blocks`` returns in every layer (the one NSA core calls it on every path, both
backends) while a sample is scored.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .. import ops


@contextlib.contextmanager
def recorded_block_ids() -> Iterator[list[torch.Tensor]]:
    """Appends each ``ops.select_blocks`` result (``[B, T, G, n]``, one per layer and segment) to the list it yields."""
    sink: list[torch.Tensor] = []
    original = ops.select_blocks

    def recording(*args, **kwargs) -> torch.Tensor:
        sink.append(original(*args, **kwargs).cpu())
        return sink[-1]

    ops.select_blocks = recording
    try:
        yield sink
    finally:
        ops.select_blocks = original


def needle_chosen(block_ids: list[torch.Tensor], rows: torch.Tensor, needle: range, block_size: int) -> list[float]:
    """Per layer: the fraction of (answer row, KV group) whose chosen blocks include a block of the
    ``needle``'s tokens. ``block_ids``: one ``[1, T, G, n]`` per layer, over the whole sample."""
    needle_blocks = torch.arange(needle.start // block_size, (needle.stop - 1) // block_size + 1)
    return [float(torch.isin(ids[0, rows], needle_blocks).any(-1).double().mean()) for ids in block_ids]
