"""Top-n selection blocks per query and KV group, from the compression branch's probabilities.

Semantics: ``nsa_parallel.reference.select_blocks`` given the compression branch's
``lse``. Two kernels, because a row's top-n needs all of its ``Ns`` scores while
the scores are produced one selection-block tile at a time:

1. ``_group_scores_kernel``, one program per (query tile, KV group, batch). It
   walks the selection blocks in tiles of ``BLOCK_J`` blocks; a tile's *own*
   compressed blocks are those starting inside it (``BLOCK_J * l'/d`` of them),
   so every compressed block is scored exactly once. For each head of the group
   it computes ``p = exp2(q.k * scale*log2e - lse*log2e)`` (causally masked) and
   sums over heads first, so the overlap mapping costs one small dot per tile,
   not one per head. The overlap weights ``W[i, j]`` are built in registers from
   iota arithmetic. Compressed blocks reaching past the tile's end (``l > d``)
   feed the next tile through a second weight matrix, carried in registers:
   each output block is stored once, with no read-modify-write and no atomics,
   so results are bit-reproducible. Both mapping dots are float32 IEEE because
   near-equal scores decide the selection.
2. ``_top_n_kernel``, one program per (rows, KV group, batch): a row of ``Ns``
   scores, forced blocks set to ``+inf`` and ineligible ones to ``-inf``, then
   ``n`` rounds of max with the lowest index winning ties (the reference's
   stable descending sort); chosen ids are written ascending via a cumulative
   sum of the chosen mask, the rest of the row padded with ``-1``.

The float32 score buffer ``[B, G, T_chunk, Ns]`` is bounded by processing the
queries in chunks (``SCORE_BUFFER_BYTES``).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# Upper bound on the float32 score buffer; queries are processed in chunks under it.
SCORE_BUFFER_BYTES = 512 * 2**20

_BLOCK_T = 64  # query rows per scoring program
_BLOCK_J = 16  # selection blocks per scoring tile (the mapping dot's N, Hopper's minimum)
_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _group_scores_kernel(
    q_ptr, k_ptr, lse_ptr, s_ptr,
    t_begin, t_end, num_cmp, num_blocks,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kg,
    stride_lb, stride_lh,
    stride_sb, stride_sg, stride_st,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    HEADS_PER_GROUP: tl.constexpr,
    CMP_SIZE: tl.constexpr,
    CMP_STRIDE: tl.constexpr,
    SEL_SIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Later query tiles see more blocks: launch them first to shorten the tail.
    num_t_tiles = tl.cdiv(t_end - t_begin, BLOCK_T)
    t0 = t_begin + (num_t_tiles - 1 - tl.program_id(0)) * BLOCK_T
    g = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)

    offs_t = t0 + tl.arange(0, BLOCK_T)
    t_valid = offs_t < t_end
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    offs_a = tl.arange(0, BLOCK_I)
    offs_jj = tl.arange(0, BLOCK_J)

    # A tile owns the compressed blocks starting in it; BLOCK_I pads that count
    # to a power of two when l'/d is not one, and the padding must not count.
    OWN_CMP: tl.constexpr = BLOCK_J * (SEL_SIZE // CMP_STRIDE)
    own = offs_a < OWN_CMP
    # Overlap weights in units of d, positions relative to the tile's first block;
    # w_next maps the same compressed blocks onto the next tile's blocks.
    cmp_lo = offs_a[:, None] * CMP_STRIDE
    sel_lo = offs_jj[None, :] * SEL_SIZE
    ov = tl.minimum(cmp_lo + CMP_SIZE, sel_lo + SEL_SIZE) - tl.maximum(cmp_lo, sel_lo)
    w_cur = tl.where(own[:, None], tl.maximum(ov, 0) // CMP_STRIDE, 0).to(tl.float32)
    sel_lo += BLOCK_J * SEL_SIZE
    ov = tl.minimum(cmp_lo + CMP_SIZE, sel_lo + SEL_SIZE) - tl.maximum(cmp_lo, sel_lo)
    w_next = tl.where(own[:, None], tl.maximum(ov, 0) // CMP_STRIDE, 0).to(tl.float32)

    q_rows = q_ptr + b * stride_qb + offs_t[:, None].to(tl.int64) * stride_qt + g * HEADS_PER_GROUP * stride_qh
    q_mask = t_valid[:, None] & d_valid[None, :]
    lse_rows = lse_ptr + b * stride_lb + g * HEADS_PER_GROUP * stride_lh + offs_t
    k_base = k_ptr + b * stride_kb + g * stride_kg + offs_d[:, None]
    s_rows = s_ptr + b * stride_sb + g * stride_sg + (offs_t - t_begin)[:, None].to(tl.int64) * stride_st

    # Blocks up to the tile's last row are eligible for some row: all must be written.
    last_block = (tl.minimum(t0 + BLOCK_T, t_end) - 1) // SEL_SIZE
    carry = tl.zeros([BLOCK_T, BLOCK_J], dtype=tl.float32)
    for j0 in range(0, last_block + 1, BLOCK_J):
        offs_i = j0 * (SEL_SIZE // CMP_STRIDE) + offs_a
        i_valid = own & (offs_i < num_cmp)
        k = tl.load(k_base + offs_i[None, :].to(tl.int64) * stride_kt,
                    mask=d_valid[:, None] & i_valid[None, :], other=0.0)
        visible = i_valid[None, :] & (offs_i[None, :] * CMP_STRIDE + (CMP_SIZE - 1) <= offs_t[:, None])
        p = tl.zeros([BLOCK_T, BLOCK_I], dtype=tl.float32)
        for hh in range(HEADS_PER_GROUP):
            qh = tl.load(q_rows + hh * stride_qh + offs_d[None, :], mask=q_mask, other=0.0)
            lse = tl.load(lse_rows + hh * stride_lh, mask=t_valid, other=0.0) * _LOG2E
            logits = tl.dot(qh, k, input_precision=DOT_PRECISION) * qk_scale - lse[:, None]
            # Masking the exponent (not the result) keeps exp2 finite where lse is -inf.
            p += tl.exp2(tl.where(visible, logits, float("-inf")))
        scores = carry + tl.dot(p, w_cur, input_precision="ieee")
        carry = tl.dot(p, w_next, input_precision="ieee")
        offs_j = j0 + offs_jj
        tl.store(s_rows + offs_j[None, :], scores, mask=t_valid[:, None] & (offs_j[None, :] < num_blocks))


@triton.jit
def _top_n_kernel(
    s_ptr, out_ptr,
    t_begin, t_end, num_blocks,
    stride_sb, stride_sg, stride_st,
    stride_ob, stride_ot, stride_og,
    SEL_SIZE: tl.constexpr,
    NUM_SELECTED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_NS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    g = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_t = t_begin + tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    t_valid = offs_t < t_end
    offs_j = tl.arange(0, BLOCK_NS)
    own_block = (offs_t // SEL_SIZE)[:, None]
    # j*l' <= t, i.e. j <= t // l'; only these entries were written by the scoring kernel.
    eligible = t_valid[:, None] & (offs_j[None, :] <= own_block) & (offs_j[None, :] < num_blocks)
    s_rows = s_ptr + b * stride_sb + g * stride_sg + (offs_t - t_begin)[:, None].to(tl.int64) * stride_st
    key = tl.load(s_rows + offs_j[None, :], mask=eligible, other=float("-inf"))
    forced = (offs_j[None, :] == 0) | (offs_j[None, :] == own_block) | (offs_j[None, :] == own_block - 1)
    key = tl.where(eligible & forced, float("inf"), key)

    # Scores are >= 0, so -inf marks exactly the ineligible and the already chosen.
    for _ in range(NUM_SELECTED):
        best, best_j = tl.max(key, axis=1, return_indices=True, return_indices_tie_break_left=True)
        pick = (offs_j[None, :] == best_j[:, None]) & (best[:, None] > float("-inf"))
        key = tl.where(pick, float("-inf"), key)
    chosen = eligible & (key == float("-inf"))

    out_rows = out_ptr + b * stride_ob + offs_t[:, None].to(tl.int64) * stride_ot + g * stride_og
    position = tl.cumsum(chosen.to(tl.int32), axis=1) - 1
    tl.store(out_rows + position, offs_j[None, :] + tl.zeros([BLOCK_R, BLOCK_NS], tl.int32), mask=chosen)
    count = tl.sum(chosen.to(tl.int32), axis=1)
    offs_n = tl.arange(0, BLOCK_N)[None, :]
    padding = t_valid[:, None] & (offs_n >= count[:, None]) & (offs_n < NUM_SELECTED)
    tl.store(out_rows + offs_n, tl.full([BLOCK_R, BLOCK_N], -1, tl.int32), mask=padding)


def select_blocks(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    lse: torch.Tensor,
    *,
    compress_block_size: int,
    compress_stride: int,
    select_block_size: int,
    num_selected: int,
    scale: float,
) -> torch.Tensor:
    """Chosen selection blocks ``int32 [B, T, G, n]``, ascending and ``-1`` padded.

    ``q [B, T, H, dk]``, ``k_cmp [B, Tc, G, dk]`` (compressed block ``i`` covers
    tokens ``[i*d, i*d + l)``), ``lse [B, H, T]``: the compression branch's
    log-sum-exp (``-inf`` where a row sees no compressed key).
    """
    batch, seq_len, num_heads, head_dim = q.shape
    num_cmp, num_groups = k_cmp.shape[1], k_cmp.shape[2]
    l, d, ls, n = compress_block_size, compress_stride, select_block_size, num_selected
    if k_cmp.shape[0] != batch or k_cmp.shape[3] != head_dim or k_cmp.dtype != q.dtype:
        raise ValueError(f"k_cmp {tuple(k_cmp.shape)} {k_cmp.dtype} does not match q {tuple(q.shape)} {q.dtype}")
    if num_heads % num_groups:
        raise ValueError(f"{num_heads} query heads do not split into {num_groups} groups")
    if tuple(lse.shape) != (batch, num_heads, seq_len):
        raise ValueError(f"lse {tuple(lse.shape)} must be [B, H, T] = {(batch, num_heads, seq_len)}")
    if l % d or ls % d or n < 1:
        raise ValueError(f"need d | l, d | l' and n >= 1 (l={l}, d={d}, l'={ls}, n={n})")
    if l - d > _BLOCK_J * ls:
        # A compressed block must not reach past the next tile (one carried tile).
        raise ValueError(f"compress_block_size {l} too large for select_block_size {ls}")

    num_blocks = -(-seq_len // ls)
    out = torch.empty(batch, seq_len, num_groups, n, dtype=torch.int32, device=q.device)
    if out.numel() == 0:
        return out
    q, k_cmp = q.contiguous(), k_cmp.contiguous()
    lse = lse.to(torch.float32).contiguous()

    row_bytes = batch * num_groups * num_blocks * 4
    chunk = max(_BLOCK_T, SCORE_BUFFER_BYTES // row_bytes // _BLOCK_T * _BLOCK_T)
    chunk = min(chunk, triton.cdiv(seq_len, _BLOCK_T) * _BLOCK_T)
    # With no compressed key every score is 0 and only forcing and block ids decide.
    alloc = torch.empty if num_cmp else torch.zeros
    scores = alloc(batch, num_groups, chunk, num_blocks, dtype=torch.float32, device=q.device)

    block_d = max(16, triton.next_power_of_2(head_dim))
    block_i = max(16, triton.next_power_of_2(_BLOCK_J * (ls // d)))
    block_ns = max(16, triton.next_power_of_2(num_blocks))
    block_r = max(1, min(32, 4096 // block_ns))
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"
    for t_begin in range(0, seq_len, chunk):
        t_end = min(seq_len, t_begin + chunk)
        if num_cmp:
            _group_scores_kernel[(triton.cdiv(t_end - t_begin, _BLOCK_T), num_groups, batch)](
                q, k_cmp, lse, scores,
                t_begin, t_end, num_cmp, num_blocks,
                q.stride(0), q.stride(1), q.stride(2),
                k_cmp.stride(0), k_cmp.stride(1), k_cmp.stride(2),
                lse.stride(0), lse.stride(1),
                scores.stride(0), scores.stride(1), scores.stride(2),
                scale * _LOG2E.value,
                HEAD_DIM=head_dim, HEADS_PER_GROUP=num_heads // num_groups,
                CMP_SIZE=l, CMP_STRIDE=d, SEL_SIZE=ls,
                BLOCK_T=_BLOCK_T, BLOCK_J=_BLOCK_J, BLOCK_I=block_i, BLOCK_D=block_d,
                DOT_PRECISION=dot_precision,
                num_warps=8 if block_d * block_i > 128 * 64 else 4,
            )
        _top_n_kernel[(triton.cdiv(t_end - t_begin, block_r), num_groups, batch)](
            scores, out,
            t_begin, t_end, num_blocks,
            scores.stride(0), scores.stride(1), scores.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            SEL_SIZE=ls, NUM_SELECTED=n,
            BLOCK_R=block_r, BLOCK_NS=block_ns, BLOCK_N=triton.next_power_of_2(n),
            num_warps=min(16, max(4, block_r * block_ns // 1024)),
        )
    return out
