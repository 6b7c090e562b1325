"""Prefill and decode for one NSA layer, after its projections: rotary, ``phi`` and the cache
around the attention. The arguments are ``nsa_branches``'s (``nsa_parallel.layer``), so any
module that calls it for training (the plain layer, the Megatron one) can call these to generate.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import reference
from ..compression import BlockCompressor
from ..layer import nsa_branches
from ..ops import Backend
from ..rotary import apply_rotary
from .attention import decode_attention
from .cache import NSAKVCache

BranchKV = Sequence[tuple[torch.Tensor, torch.Tensor]]


def rotate_at(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotary on ``x [B, T, heads, d]`` with each row at its own ``positions [B, T]`` (a device gather)."""
    batch, seq = positions.shape
    flat = positions.reshape(-1)
    return apply_rotary(x.reshape(1, batch * seq, *x.shape[2:]), cos[flat], sin[flat]).view_as(x)


@torch.no_grad()
def prefill(cache: NSAKVCache, q: torch.Tensor, branch_kv: BranchKV, gate_logits: torch.Tensor,
            compress_k: BlockCompressor, compress_v: BlockCompressor, cos: torch.Tensor, sin: torch.Tensor,
            lengths: torch.Tensor | None = None, backend: Backend = "auto") -> torch.Tensor:
    """The training forward over a batch of prompts (right-padded to ``P`` tokens, ``lengths [B]``),
    whose keys and values then fill ``cache``; returns its output ``[B, P, H, dv]``.

    ``q [B, P, H, dk]``, ``branch_kv`` the raw (compressed, selected, window) keys/values
    ``[B, P, G, d]``, ``gate_logits [B, P, H, 3]``, ``cos``/``sin`` ``[>= P, dk]`` by position.
    """
    batch, prompt = q.shape[:2]
    cache.check_prefill(batch, prompt)
    out = nsa_branches(q, branch_kv, gate_logits, compress_k, compress_v, cos, sin, cache.config, backend)
    (k_raw, v_raw), (k_slc, v_slc), (k_win, v_win) = branch_kv
    cos_p, sin_p = cos[:prompt], sin[:prompt]
    k_cmp = compress_k(k_raw)
    ends = reference.compressed_key_ends(k_cmp.shape[1], cache.config, q.device)
    # A compressed key is rotated at its block's last token, as nsa_branches does.
    cache.prefill(apply_rotary(k_slc, cos_p, sin_p), v_slc, apply_rotary(k_win, cos_p, sin_p), v_win,
                  k_raw, v_raw, apply_rotary(k_cmp, cos[ends], sin[ends]), compress_v(v_raw), lengths)
    return out


@torch.no_grad()
def decode(cache: NSAKVCache, q: torch.Tensor, branch_kv: BranchKV, gate_logits: torch.Tensor,
           compress_k: BlockCompressor, compress_v: BlockCompressor, cos: torch.Tensor, sin: torch.Tensor,
           scale: float | None = None, backend: Backend = "auto", *, run_phi: bool | None = None) -> torch.Tensor:
    """One token per sequence: appends its keys/values at position ``cache.lengths`` and returns its
    NSA output ``[B, 1, H, dv]``. Shapes as :func:`prefill` with ``P = 1``; ``cos``/``sin`` must
    cover the cache's ``max_seq_len`` positions. No host synchronisation (see ``NSAKVCache.append``
    for ``run_phi``).
    """
    cache.check_append(q.shape[0])
    positions = cache.lengths[:q.shape[0], None].clone()  # [B, 1]; append moves lengths on
    (k_raw, v_raw), (k_slc, v_slc), (k_win, v_win) = branch_kv

    def compress(k_block: torch.Tensor, v_block: torch.Tensor, end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rotate_at(compress_k(k_block), cos, sin, end[:, None])[:, 0], compress_v(v_block)[:, 0]

    q = rotate_at(q, cos, sin, positions)
    cache.append(rotate_at(k_slc, cos, sin, positions)[:, 0], v_slc[:, 0],
                 rotate_at(k_win, cos, sin, positions)[:, 0], v_win[:, 0], k_raw[:, 0], v_raw[:, 0],
                 compress, run_phi=run_phi)
    return decode_attention(q[:, 0], torch.sigmoid(gate_logits[:, 0]), cache, scale, backend)[:, None]
