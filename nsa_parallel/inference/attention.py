"""Decode attention: one new query per sequence against an :class:`NSAKVCache`.

``q [B, H, dk]`` (rotated), ``gates [B, H, 3]`` (after the sigmoid); the cache already holds the
new token, so sequence ``b`` sits at position ``lengths[b] - 1``. The reference below is the
training reference (``nsa_parallel.reference``) restricted to that one query, with visibility
taken from the device tensor ``lengths`` instead of Python integers, so it also runs without
host synchronisation; the Triton backend is ``nsa_kernels.decode``.
"""
from __future__ import annotations

import math

import torch

from .. import reference
from ..compression import compressed_positions
from ..config import NSAConfig
from ..ops import Backend, resolve_backend
from .cache import NSAKVCache


def reference_decode(
    q: torch.Tensor, gates: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, k_slc: torch.Tensor,
    v_slc: torch.Tensor, k_win: torch.Tensor, v_win: torch.Tensor, lengths: torch.Tensor, config: NSAConfig,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated NSA output ``[B, H, dv]`` and the chosen blocks ``[B, G, n]`` of one query per sequence.

    Cache tensors are ``[B, slots, G, d]``: ``k_cmp`` compressed tokens (block ``i`` seen once
    ``i*d + l - 1 <= position``), ``k_slc`` every token, ``k_win`` a ring of the last ``w`` tokens
    (slot ``s`` filled once ``s < lengths``).
    """
    num_heads, num_groups = q.shape[1], k_slc.shape[2]
    pos = lengths - 1
    query = q[:, None]  # [B, 1, H, dk]: the training reference's [B, T, H, dk] with T = 1

    ends = compressed_positions(torch.arange(k_cmp.shape[1], device=q.device), config)
    seen_cmp = (ends[None, :] <= pos[:, None])[:, None, None, :]  # [B, 1, 1, Tc]
    o_cmp = reference.masked_attention(query, k_cmp, v_cmp, seen_cmp, scale)

    # Block scores and top-n exactly as reference.select_blocks, at each sequence's own position.
    logits = torch.einsum("bhd,bchd->bhc", q, reference.expand_kv_heads(k_cmp, num_heads))[:, :, None] * scale
    p_cmp, _ = reference.masked_softmax(logits, seen_cmp)  # [B, H, 1, Tc]
    weights = reference.overlap_weights(k_cmp.shape[1], config.num_select_blocks(k_slc.shape[1]), config, q.device)
    scores = reference.group_block_scores(p_cmp, weights.to(q.dtype), num_groups)  # [B, 1, G, Ns]
    blocks = reference.top_blocks(scores, config, pos.view(-1, 1, 1, 1))  # [B, 1, G, n]

    in_selected = reference.selected_keys(blocks, k_slc.shape[1], config)  # [B, 1, G, S]
    causal = torch.arange(k_slc.shape[1], device=q.device)[None, :] <= pos[:, None]
    seen_slc = reference.expand_kv_heads(in_selected, num_heads).permute(0, 2, 1, 3) & causal[:, None, None, :]
    o_slc = reference.masked_attention(query, k_slc, v_slc, seen_slc, scale)

    seen_win = torch.arange(k_win.shape[1], device=q.device)[None, :] < lengths[:, None]
    o_win = reference.masked_attention(query, k_win, v_win, seen_win[:, None, None, :], scale)

    g = gates[:, None, :, :, None]
    out = g[..., 0, :] * o_cmp + g[..., 1, :] * o_slc + g[..., 2, :] * o_win
    return out[:, 0], blocks[:, 0]


def decode_attention(q: torch.Tensor, gates: torch.Tensor, cache: NSAKVCache, scale: float | None = None,
                     backend: Backend = "auto") -> torch.Tensor:
    """NSA output ``[B, H, dv]`` for the newest token of each of the cache's ``B`` sequences."""
    batch, num_heads, head_dim = q.shape
    groups = cache.k_slc.shape[2]
    if batch > cache.max_batch:
        raise ValueError(f"batch ({batch}) must be at most max_batch ({cache.max_batch}), "
                         "the batch the cache was built for")
    if num_heads % groups or head_dim != cache.k_slc.shape[3]:
        raise ValueError(f"q [B, H, dk] = {tuple(q.shape)} does not fit the cache's {groups} KV heads of "
                         f"dim {cache.k_slc.shape[3]}")
    if tuple(gates.shape) != (batch, num_heads, 3):
        raise ValueError(f"gates must be [B, H, 3] = {(batch, num_heads, 3)}, got {tuple(gates.shape)}")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    parts = [t[:batch] for t in (cache.k_cmp, cache.v_cmp, cache.k_slc, cache.v_slc, cache.k_win, cache.v_win)]
    lengths, config = cache.lengths[:batch], cache.config
    if resolve_backend(backend, q) == "reference":
        return reference_decode(q, gates, *parts, lengths, config, scale)[0]
    from nsa_kernels.decode import nsa_decode

    return nsa_decode(
        q, gates, *parts, lengths, compress_block_size=config.compress_block_size,
        compress_stride=config.compress_stride, select_block_size=config.select_block_size,
        num_selected=config.num_selected_blocks, scale=scale,
    )
