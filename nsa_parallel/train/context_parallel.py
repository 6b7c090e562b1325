"""Which part of a sequence each context-parallel rank feeds to the model.

Megatron's load-balanced ("zigzag") layout: the sequence is cut into ``2 * cp_size``
equal chunks and rank ``r`` keeps chunks ``r`` and ``2 * cp_size - 1 - r``, in that
order, so every rank gets the same share of causal-attention work. NSA's Megatron
module expects exactly this layout under context parallelism.
"""
from __future__ import annotations

import torch


def zigzag_slice(x: torch.Tensor, cp_size: int, cp_rank: int, dim: int = 1) -> torch.Tensor:
    """The tokens of ``x`` (sequence along ``dim``) that context-parallel rank ``cp_rank`` keeps."""
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank ({cp_rank}) must be in [0, {cp_size})")
    if cp_size == 1:
        return x
    if x.shape[dim] % (2 * cp_size):
        raise ValueError(f"sequence length ({x.shape[dim]}) must be divisible by 2 x cp_size ({2 * cp_size})")
    chunks = x.chunk(2 * cp_size, dim=dim)
    return torch.cat([chunks[cp_rank], chunks[2 * cp_size - 1 - cp_rank]], dim=dim)
