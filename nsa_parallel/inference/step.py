"""Prefill and decode for one NSA layer, after its projections: rotary, ``phi`` and the cache
around the attention. The arguments are :func:`~nsa_parallel.core.nsa_core`'s, so any module that
calls it for training (the plain layer, the Megatron one) can call these to generate.
"""
from __future__ import annotations

import torch

from ..core import BranchKV, Compressors, compress_sequence, nsa_core, rotate_keys
from ..ops import Backend
from ..rotary import Rotary, apply_rotary
from .attention import decode_attention
from .cache import NSAKVCache


@torch.no_grad()
def prefill(cache: NSAKVCache, q: torch.Tensor, kv: BranchKV, gate_logits: torch.Tensor, phi: Compressors,
            rotary: Rotary, lengths: torch.Tensor | None = None, scale: float | None = None,
            backend: Backend = "auto") -> torch.Tensor:
    """The training forward (:func:`nsa_core`) over a batch of prompts (right-padded to ``P`` tokens,
    ``lengths [B]``), whose keys and values then fill ``cache``; returns its output ``[B, P, H, dv]``.

    ``q [B, P, H, dk]``, ``kv`` the raw (compressed, selected, window) keys/values ``[B, P, G, d]``,
    ``gate_logits [B, P, H, 3]``, ``rotary`` the cos/sin of positions ``0 .. >= P-1`` (``[S, dk]``).
    """
    batch, prompt = q.shape[:2]
    cache.check_prefill(batch, prompt)
    rotary = rotary.rows(slice(0, prompt))
    out = nsa_core(q, kv, gate_logits, phi, cache.config, rotary=rotary, scale=scale, backend=backend)
    # phi runs again here: nsa_core keeps its compressed tokens to itself.
    k_cmp, v_cmp = compress_sequence(kv.cmp, phi, cache.config, rotary)
    keys = rotate_keys(kv, rotary)
    cache.prefill(keys.slc.k, keys.slc.v, keys.win.k, keys.win.v, kv.cmp.k, kv.cmp.v, k_cmp, v_cmp, lengths)
    return out


@torch.no_grad()
def decode(cache: NSAKVCache, q: torch.Tensor, kv: BranchKV, gate_logits: torch.Tensor, phi: Compressors,
           rotary: Rotary, scale: float | None = None, backend: Backend = "auto", *,
           run_phi: bool | None = None) -> torch.Tensor:
    """One token per sequence: appends its keys/values at position ``cache.lengths`` and returns its
    NSA output ``[B, 1, H, dv]``. Shapes as :func:`prefill` with ``P = 1``; ``rotary`` must cover the
    cache's ``max_seq_len`` positions. No host synchronisation (see ``NSAKVCache.append`` for ``run_phi``).
    """
    cache.check_append(q.shape[0])
    # cos/sin [B, 1, dk] at each sequence's own position, gathered before append moves the lengths on
    here = rotary.rows(cache.lengths[:q.shape[0], None])

    def compress(k_block: torch.Tensor, v_block: torch.Tensor, end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return apply_rotary(phi.k(k_block), *rotary.rows(end[:, None]))[:, 0], phi.v(v_block)[:, 0]

    keys = rotate_keys(kv, here)
    cache.append(keys.slc.k[:, 0], keys.slc.v[:, 0], keys.win.k[:, 0], keys.win.v[:, 0], kv.cmp.k[:, 0],
                 kv.cmp.v[:, 0], compress, run_phi=run_phi)
    return decode_attention(apply_rotary(q, *here)[:, 0], torch.sigmoid(gate_logits[:, 0]), cache, scale,
                            backend)[:, None]
