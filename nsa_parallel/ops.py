"""Public NSA ops: shape checks, then the float64-capable reference or the Triton kernels.

Layout is ``[batch, seq, heads, dim]``; query head ``h`` uses KV head
``h // (H // G)``; ``scale`` defaults to ``1/sqrt(dk)``. ``backend="auto"``
runs Triton on CUDA tensors and the reference otherwise. The whole of NSA (rotary,
compression, the gated branches, documents, context parallelism) is
:func:`nsa_parallel.core.nsa_core`.
"""
from __future__ import annotations

import math
from typing import Literal

import torch

from . import reference
from .compression import compressed_positions
from .config import NSAConfig

Backend = Literal["auto", "reference", "triton"]
BACKENDS = ("auto", "reference", "triton")


def resolve_backend(backend: str, like: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend ({backend!r}) must be one of {BACKENDS}")
    if backend == "auto":
        return "triton" if like.is_cuda else "reference"
    if backend == "triton" and not like.is_cuda and like.dtype == torch.bfloat16:
        raise ValueError("backend 'triton' on the CPU (Triton's interpreter) cannot take bfloat16: the interpreter's "
                         "tl.dot on bfloat16 is wrong (by ~1e9 in our tests); use float32 or float16, "
                         "backend='reference', or a GPU")
    return backend


def _check_rank4(**tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, seq, heads, dim], got shape {tuple(t.shape)}")


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, names: tuple[str, str] = ("k", "v")) -> None:
    """Validates ``q [B, T, H, dk]`` against ``k [B, S, G, dk]`` and ``v [B, S, G, dv]``."""
    kn, vn = names
    _check_rank4(q=q, **{kn: k, vn: v})
    for name, t in ((kn, k), (vn, v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} dtype ({t.dtype}) must equal q dtype ({q.dtype})")
        if t.device != q.device:
            raise ValueError(f"{name} device ({t.device}) must equal q device ({q.device})")
        if t.shape[0] != q.shape[0]:
            raise ValueError(f"{name} batch ({t.shape[0]}) must equal q batch ({q.shape[0]})")
    if k.shape[1:3] != v.shape[1:3]:
        raise ValueError(f"{kn} and {vn} must have the same seq and heads, got {tuple(k.shape)} and {tuple(v.shape)}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"{kn} head dim ({k.shape[3]}) must equal q head dim ({q.shape[3]})")
    heads, groups = q.shape[2], k.shape[2]
    if groups == 0 or heads % groups:
        raise ValueError(f"query heads ({heads}) must be a multiple of KV heads ({groups})")


def _check_query_offset(query_offset: int) -> None:
    if isinstance(query_offset, bool) or not isinstance(query_offset, int) or query_offset < 0:
        raise ValueError(f"query_offset ({query_offset!r}) must be a non-negative integer")


def _check_full_length(q: torch.Tensor, k: torch.Tensor, name: str = "k", query_offset: int = 0) -> None:
    _check_query_offset(query_offset)
    if k.shape[1] != query_offset + q.shape[1]:
        rule = f"q length ({q.shape[1]})" if query_offset == 0 else \
            f"query_offset + q length ({query_offset} + {q.shape[1]})"
        raise ValueError(f"{name} length ({k.shape[1]}) must equal {rule}")


def _check_compressed_length(q: torch.Tensor, k_cmp: torch.Tensor, config: NSAConfig, query_offset: int = 0) -> None:
    _check_query_offset(query_offset)
    seq_len = query_offset + q.shape[1]
    expected = config.num_compressed(seq_len)
    if k_cmp.shape[1] != expected:
        raise ValueError(
            f"k_cmp has {k_cmp.shape[1]} compressed tokens; a sequence of {seq_len} tokens with "
            f"compress_block_size {config.compress_block_size} and compress_stride "
            f"{config.compress_stride} has {expected}"
        )


def _scale(q: torch.Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def compressed_attention(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    config: NSAConfig,
    scale: float | None = None,
    backend: Backend = "auto",
    *,
    query_offset: int = 0,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
    """Attention over compression blocks wholly in the past; ``[B, T, H, dv]``.

    Queries sit at positions ``query_offset .. query_offset + T - 1`` (a shard of a
    longer sequence) and ``k_cmp`` holds every compressed token of positions
    ``0 .. query_offset + T - 1``. With ``return_lse`` also returns the row
    log-sum-exp ``[B, H, T]`` (float32) for :func:`select_blocks`; ``None`` from
    the reference backend, which does not need it.
    """
    check_attention_inputs(q, k_cmp, v_cmp, ("k_cmp", "v_cmp"))
    _check_compressed_length(q, k_cmp, config, query_offset)
    scale = _scale(q, scale)
    if resolve_backend(backend, q) == "reference":
        out, lse = reference.compressed_attention(q, k_cmp, v_cmp, config, scale, query_offset), None
    else:
        from nsa_kernels.banded_attention import banded_attention

        out, lse = banded_attention(
            q, k_cmp, v_cmp, key_stride=config.compress_stride,
            key_offset=compressed_positions(0, config) - query_offset, window=None, scale=scale,
        )
    return (out, lse) if return_lse else out


def select_blocks(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    config: NSAConfig,
    scale: float | None = None,
    backend: Backend = "auto",
    lse: torch.Tensor | None = None,
    *,
    query_offset: int = 0,
) -> torch.Tensor:
    """Top-n selection block ids per query and KV group: int32 ``[B, T, G, n]``, ascending, ``-1`` padded.

    Block ids are global (block ``j`` covers positions ``[j*l', (j+1)*l')``) when the
    queries sit at ``query_offset ..`` as in :func:`compressed_attention`. ``lse``
    (``[B, H, T]`` float32, from the compression branch) saves the Triton backend
    one pass; the reference recomputes it.
    """
    check_attention_inputs(q, k_cmp, k_cmp, ("k_cmp", "k_cmp"))
    _check_compressed_length(q, k_cmp, config, query_offset)
    scale = _scale(q, scale)
    with torch.no_grad():
        if resolve_backend(backend, q) == "reference":
            return reference.select_blocks(q, k_cmp, config, scale, query_offset)
        from nsa_kernels.block_selection import select_blocks as select_blocks_kernel

        if lse is None:
            _, lse = compressed_attention(q, k_cmp, k_cmp, config, scale, "triton",
                                          query_offset=query_offset, return_lse=True)
        return select_blocks_kernel(
            q, k_cmp, lse,
            compress_block_size=config.compress_block_size, compress_stride=config.compress_stride,
            select_block_size=config.select_block_size, num_selected=config.num_selected_blocks, scale=scale,
            query_offset=query_offset,
        )


def check_block_indices(block_indices: torch.Tensor, expected: tuple[int, int, int], num_blocks: int,
                        values: bool = True) -> None:
    """``block_indices [B, T, G, n]``: int32 or int64, each id a block of the keys (``0 .. num_blocks-1``)
    or ``-1`` (unused), no block twice in a row. ``values=False`` checks shape and dtype only: reading
    the ids costs a host sync, which ids made by :func:`select_blocks` need not pay."""
    if block_indices.dim() != 4 or tuple(block_indices.shape[:3]) != expected:
        raise ValueError(f"block_indices must be [B, T, G, n] = [{', '.join(map(str, expected))}, n], "
                         f"got shape {tuple(block_indices.shape)}")
    if block_indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_indices must be int32 or int64, got {block_indices.dtype}")
    if not values or block_indices.numel() == 0:
        return
    ids = block_indices.sort(dim=-1).values
    out_of_range = (ids[..., 0] < -1) | (ids[..., -1] >= num_blocks)
    repeated = ((ids[..., 1:] == ids[..., :-1]) & (ids[..., 1:] >= 0)).any(-1)
    bad_range, bad_repeat = torch.stack([out_of_range.any(), repeated.any()]).tolist()
    if bad_range:
        raise ValueError(f"block_indices must be -1 or block ids 0 .. {num_blocks - 1} of the {num_blocks} blocks "
                         f"of the keys, got values from {int(ids[..., 0].min())} to {int(ids[..., -1].max())}")
    if bad_repeat:
        raise ValueError("block_indices must not name a block twice for one query and KV group")


def selection_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_indices: torch.Tensor,
    config: NSAConfig,
    scale: float | None = None,
    backend: Backend = "auto",
    *,
    query_offset: int = 0,
    check_ids: bool = True,
) -> torch.Tensor:
    """Attention over the selected blocks of each query's group (causal inside the own block).

    Keys sit at positions ``0 .. S-1`` and queries at ``query_offset .. S-1``
    (``S = query_offset + T``): context parallelism puts fetched remote blocks
    before the local tokens and remaps ``block_indices`` into that cache. Both backends refuse the
    same ``block_indices`` before any work (:func:`check_block_indices`); ``check_ids=False`` skips
    reading the ids (a host sync), for ids :func:`select_blocks` made.
    """
    check_attention_inputs(q, k, v)
    _check_full_length(q, k, query_offset=query_offset)
    check_block_indices(block_indices, (q.shape[0], q.shape[1], k.shape[2]), config.num_select_blocks(k.shape[1]),
                        check_ids)
    scale = _scale(q, scale)
    if resolve_backend(backend, q) == "reference":
        return reference.selection_attention(q, k, v, block_indices, config, scale, query_offset)
    from nsa_kernels.selection_attention import selection_attention as selection_attention_kernel

    return selection_attention_kernel(
        q, k, v, block_indices.to(torch.int32), select_block_size=config.select_block_size, scale=scale,
        query_offset=query_offset,
    )


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window_size: int,
    scale: float | None = None,
    backend: Backend = "auto",
    *,
    query_offset: int = 0,
) -> torch.Tensor:
    """Sliding-window causal attention: query ``t`` (at ``p = query_offset + t``) sees keys
    ``max(0, p-w+1) .. p``; keys sit at ``0 .. query_offset + T - 1`` (a halo then the queries' own)."""
    check_attention_inputs(q, k, v)
    _check_full_length(q, k, query_offset=query_offset)
    if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size <= 0:
        raise ValueError(f"window_size ({window_size!r}) must be a positive integer")
    scale = _scale(q, scale)
    if resolve_backend(backend, q) == "reference":
        return reference.window_attention(q, k, v, window_size, scale, query_offset)
    from nsa_kernels.banded_attention import banded_attention

    return banded_attention(q, k, v, key_stride=1, key_offset=-query_offset, window=window_size, scale=scale)[0]


def combine_branches(
    o_cmp: torch.Tensor, o_slc: torch.Tensor, o_win: torch.Tensor, gates: torch.Tensor, backend: Backend = "auto"
) -> torch.Tensor:
    """``g_cmp*o_cmp + g_slc*o_slc + g_win*o_win`` with ``gates [B, T, H, 3]`` after the sigmoid."""
    for name, o in (("o_slc", o_slc), ("o_win", o_win)):
        if o.shape != o_cmp.shape:
            raise ValueError(f"{name} shape {tuple(o.shape)} must equal o_cmp shape {tuple(o_cmp.shape)}")
    if tuple(gates.shape) != (*o_cmp.shape[:3], 3):
        raise ValueError(f"gates must be [B, T, H, 3] = {(*o_cmp.shape[:3], 3)}, got {tuple(gates.shape)}")
    if resolve_backend(backend, o_cmp) == "reference":
        g = gates.unsqueeze(-1)
        return g[..., 0, :] * o_cmp + g[..., 1, :] * o_slc + g[..., 2, :] * o_win
    from nsa_kernels.gated_combine import gated_combine

    return gated_combine(o_cmp, o_slc, o_win, gates)
