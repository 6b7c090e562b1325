"""Which part of a sequence each context-parallel rank feeds to the model: Megatron's zigzag share.

The sequence is cut into ``2 * cp_size`` equal chunks and rank ``r`` keeps chunks ``r`` and
``2 * cp_size - 1 - r``, in that order (:class:`~nsa_parallel.context_parallel.ShardLayout`, the one
place the layouts are written), so every rank gets the same share of causal-attention work. NSA's
Megatron module expects exactly this layout under context parallelism.
"""
from __future__ import annotations

import torch

from ..context_parallel import ShardLayout


def zigzag_slice(x: torch.Tensor, cp_size: int, cp_rank: int, dim: int = 1) -> torch.Tensor:
    """The tokens of ``x`` (sequence along ``dim``) that context-parallel rank ``cp_rank`` keeps."""
    return ShardLayout("zigzag", cp_size, x.shape[dim]).shard(x, cp_rank, dim)
