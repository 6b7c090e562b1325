"""Banded attention: query ``t`` sees key ``i`` iff ``p_i <= t`` and ``p_i > t - window``,
where key ``i`` sits at position ``p_i = i*key_stride + key_offset``.

One kernel family serves two NSA branches: compressed attention (key ``i`` is the
compression block ending at ``i*d + l - 1``, no window) and sliding-window attention
(stride 1, offset 0, window ``w``). Under context parallelism the queries are a shard
starting at global position ``query_offset``: positions are then relative to the first
query, so ``key_offset`` is negative (``l - 1 - query_offset``, ``-query_offset``) and
``S`` exceeds what ``T`` alone would need; ranges below are clamped to the queries
``[0, T)`` and keys no query sees get zero dK/dV.

Why the kernels are shaped as they are:

- The rule is monotone in ``t`` and in ``i``: row ``t`` sees exactly the keys
  ``[n(t - window), n(t))`` with ``n(x)`` = number of keys at positions ``<= x``. So a
  tile of queries sees one contiguous key range and a tile of keys is seen by one
  contiguous query range. Every kernel computes its range with integer arithmetic
  and visits only those tiles: work follows the band, not ``T x S``.
- Each range is walked in two loops: tiles fully inside it (visible to every row of the
  tile, so they skip the per-element mask), then the masked tiles straddling either edge
  as one loop. Two loops, not three: under a window the loops are short and each one
  starts its load pipeline afresh.
- FlashAttention-2 structure: the forward (one program per query tile and batch) keeps an
  online softmax in base 2 with float32 accumulators and stores ``o`` and the natural-log
  ``lse``. A query tile stacks heads of one group where a window cuts the band (2 heads
  x 64 positions see fewer keys than 128 positions) and runs from the last positions
  down (without a window those see the most keys). The backward computes
  ``delta = rowsum(dO * O)``, then dK/dV with programs per (key tile, batch, KV head) that
  walk the heads of the group times the query tiles that see the key tile as flat
  loops, so dK/dV accumulate in registers without atomics, then dQ like the forward.
- Without a window the first key tiles are seen by every later query, so one dK/dV
  program per key tile is badly unbalanced (at T=64k, 16 heads: ~16k (head, query tile)
  pairs for the first, ~250 for the last). The grid runs key tiles first to last, so
  the longest programs start first, and splits such key tiles into slices of the flat
  loops, each writing a float32 partial dK/dV summed afterwards (deterministic).
- Rows that see no key (compressed attention before the first full block) keep a zero
  softmax denominator: their output is 0 and ``lse = -inf``. The backward reads their
  ``lse`` as ``+inf``, so every probability and hence every gradient is exactly 0.
- The streamed K/V tiles of the forward and dQ are boxes of consecutive positions of one head,
  so on sm_90+ with 16-bit inputs and power-of-two head dims they come by TMA
  (``nsa_kernels.tma``): the copy engine fetches them while the warps compute. A box can run
  past the tensor's sequence into the next batch's rows; every tile already masks positions out
  of range (scores to -inf), so those rows never count. Otherwise, gathers. dK/dV gathers its
  Q/dO tiles always (see ``_dkdv_tile``).
- Each program offsets its base pointers by int64 scalars and indexes its tile with
  small int32 offsets, so tensors beyond 2**31 elements address correctly.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import tma

# Kernels may read globals only when they are constexpr.
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _num_keys_upto(t, key_stride, key_offset):
    """Number of keys at positions ``<= t`` (keys start at ``key_offset``); 0 for ``t < key_offset``."""
    return tl.maximum(t - key_offset + key_stride, 0) // key_stride


@triton.jit
def _visible(t, key_idx, key_stride, key_offset, window):
    """``[len(t), len(key_idx)]`` visibility mask of queries at positions ``t``."""
    pos = key_idx * key_stride + key_offset
    return (pos[None, :] <= t[:, None]) & (pos[None, :] > t[:, None] - window)


@triton.jit
def _rows_tile(base, desc, row0, col0, start, limit, stride_t,
               HEAD_D: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr):
    """Positions ``start .. start + ROWS`` of one head: a TMA copy of the box at
    ``(row0 + start, col0)`` (``nsa_kernels.tma``; rows past ``limit`` hold other data, which
    every caller masks), or a gather from ``base`` with those rows zeroed."""
    if TMA:
        return desc.load([(row0 + start).to(tl.int32), col0])
    else:
        offs = tl.arange(0, ROWS)
        offs_d = tl.arange(0, BLOCK_D)
        return tl.load(
            base + tl.cast(start, tl.int64) * stride_t + offs[:, None] * stride_t + offs_d[None, :],
            mask=((start + offs) < limit)[:, None] & (offs_d < HEAD_D)[None, :], other=0.0,
        )


@triton.jit
def _fwd_tile(
    acc, m_i, l_i, q, t, k_base, v_base, k_desc, v_desc, kv_row0, g, start_n, S, stride_kt, stride_vt,
    key_stride, key_offset, window, qk_scale,
    HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASKED: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr,
):
    key_idx = start_n + tl.arange(0, BLOCK_N)
    in_range = key_idx < S
    k = _rows_tile(k_base, k_desc, kv_row0, g * HEAD_DK, start_n, S, stride_kt, HEAD_DK, BLOCK_N, BLOCK_DK, TMA)
    v = _rows_tile(v_base, v_desc, kv_row0, g * HEAD_DV, start_n, S, stride_vt, HEAD_DV, BLOCK_N, BLOCK_DV, TMA)
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    if MASKED:
        visible = _visible(t, key_idx, key_stride, key_offset, window) & in_range[None, :]
        qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    # A row that has seen nothing yet keeps m = -inf; subtract 0 instead so no inf - inf.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _tile_ranges(lo, full_lo, full_hi, hi, BLOCK: tl.constexpr):
    """Cuts ``[lo, hi)`` into tiles of ``BLOCK`` from ``lo``; items in ``[full_lo, full_hi)`` need no mask.

    Returns ``mid_start, n_full, n_lo, n_edge``: the ``n_full`` tiles from ``mid_start`` lie in
    ``[full_lo, full_hi)``; ``_edge_start`` enumerates the ``n_edge`` others, ``n_lo`` of them
    below ``mid_start``.
    """
    mid_start = lo + tl.cdiv(tl.maximum(full_lo - lo, 0), BLOCK) * BLOCK
    n_full = tl.maximum(full_hi - mid_start, 0) // BLOCK
    n_lo = (mid_start - lo) // BLOCK
    n_hi = tl.cdiv(tl.maximum(hi - mid_start - n_full * BLOCK, 0), BLOCK)
    return mid_start, n_full, n_lo, n_lo + n_hi


@triton.jit
def _edge_start(i, lo, n_lo, n_full, BLOCK: tl.constexpr):
    """Start of edge tile ``i``: the ``n_lo`` tiles from ``lo``, then those past the ``n_full`` inner ones."""
    return lo + (i + (i >= n_lo).to(tl.int32) * n_full) * BLOCK


@triton.jit
def _query_tile(T, H, HEADS: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's query tile: ``HEADS`` heads of one group at ``BLOCK_M // HEADS`` positions.

    Row ``r`` is position ``m0 + r // HEADS`` of head ``h0 + r % HEADS``; returns ``m0, h0``,
    the rows' positions and head offsets. Tiles run from the last positions down, so without
    a window (where later rows see more keys) the longest programs start first.
    """
    units = H // HEADS
    pid = tl.program_id(0)
    m0 = (tl.cdiv(T, BLOCK_M // HEADS) - 1 - pid // units) * (BLOCK_M // HEADS)
    offs_m = tl.arange(0, BLOCK_M)
    return m0, pid % units * HEADS, m0 + offs_m // HEADS, offs_m % HEADS


@triton.jit
def _tile_rows(stride_b, stride_t, stride_h, b, m0, h0, t, dh):
    """Offsets of row ``r`` (position ``t[r]``, head ``h0 + dh[r]``) in a ``[B, T, H, d]`` tensor (q, o, dO)."""
    return b * stride_b + h0 * stride_h + m0.to(tl.int64) * stride_t + ((t - m0) * stride_t + dh * stride_h)


@triton.jit
def _key_tiles(m0, T, S, key_stride, key_offset, window, QUERIES: tl.constexpr, BLOCK_N: tl.constexpr):
    """``lo`` and ``_tile_ranges`` of the keys seen by positions ``[m0, m0 + QUERIES)``."""
    t_max = tl.minimum(m0 + QUERIES, T) - 1
    lo = _num_keys_upto(m0 - window, key_stride, key_offset)
    hi = tl.minimum(_num_keys_upto(t_max, key_stride, key_offset), S)
    full_lo = tl.minimum(_num_keys_upto(t_max - window, key_stride, key_offset), hi)
    full_hi = tl.minimum(_num_keys_upto(m0, key_stride, key_offset), S)
    mid_start, n_full, n_lo, n_edge = _tile_ranges(lo, full_lo, full_hi, hi, BLOCK_N)
    return lo, mid_start, n_full, n_lo, n_edge


@triton.jit
def _fwd_kernel(
    Q, K, V, K_DESC, V_DESC, O, LSE,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    T, S, H, key_stride, key_offset, window, qk_scale,
    GROUP: tl.constexpr, HEADS: tl.constexpr, HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr, TMA: tl.constexpr,
):
    m0, h0, t, dh = _query_tile(T, H, HEADS, BLOCK_M)
    b = tl.program_id(1).to(tl.int64)
    g = h0 // GROUP
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = t < T

    q_rows = Q + _tile_rows(stride_qb, stride_qt, stride_qh, b, m0, h0, t, dh)
    q = tl.load(q_rows[:, None] + offs_dk[None, :], mask=row_ok[:, None] & (offs_dk < HEAD_DK)[None, :], other=0.0)
    k_base = K + b * stride_kb + g * stride_kh
    v_base = V + b * stride_vb + g * stride_vh

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    lo, mid_start, n_full, n_lo, n_edge = _key_tiles(
        m0, T, S, key_stride, key_offset, window, BLOCK_M // HEADS, BLOCK_N)
    for start_n in range(mid_start, mid_start + n_full * BLOCK_N, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(
            acc, m_i, l_i, q, t, k_base, v_base, K_DESC, V_DESC, b * S, g, start_n, S, stride_kt, stride_vt,
            key_stride, key_offset, window, qk_scale,
            HEAD_DK, HEAD_DV, BLOCK_N, BLOCK_DK, BLOCK_DV, False, PRECISION, TMA)
    for i in range(n_edge):
        acc, m_i, l_i = _fwd_tile(
            acc, m_i, l_i, q, t, k_base, v_base, K_DESC, V_DESC, b * S, g,
            _edge_start(i, lo, n_lo, n_full, BLOCK_N), S,
            stride_kt, stride_vt, key_stride, key_offset, window, qk_scale,
            HEAD_DK, HEAD_DV, BLOCK_N, BLOCK_DK, BLOCK_DV, True, PRECISION, TMA)

    seen = l_i > 0.0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * _LN2, float("-inf"))
    o_rows = O + _tile_rows(stride_ob, stride_ot, stride_oh, b, m0, h0, t, dh)
    tl.store(o_rows[:, None] + offs_dv[None, :], o.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (offs_dv < HEAD_DV)[None, :])
    tl.store(LSE + (b * H + h0) * T + dh.to(tl.int64) * T + t, lse, mask=row_ok)


@triton.jit
def _delta_kernel(
    O, DO, DELTA, stride_ob, stride_ot, stride_oh, T, H,
    HEAD_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """``delta[b, h, t] = sum_d dO * O`` in float32: the softmax-backward row term."""
    m0 = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = ((m0 + offs_m) < T)[:, None] & (offs_dv < HEAD_DV)[None, :]
    offs = b * stride_ob + h * stride_oh + m0.to(tl.int64) * stride_ot + offs_m[:, None] * stride_ot + offs_dv[None, :]
    o = tl.load(O + offs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + (b * H + h) * T + m0 + offs_m, tl.sum(o * do, 1), mask=(m0 + offs_m) < T)


@triton.jit
def _load_row_stats(LSE, DELTA, rows, row_ok):
    """``lse`` in base 2 with empty and out-of-range rows as ``+inf`` (so ``p = 0``), and ``delta``."""
    lse = tl.load(LSE + rows, mask=row_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)
    delta = tl.load(DELTA + rows, mask=row_ok, other=0.0)
    return lse2, delta


@triton.jit
def _dq_tile(
    dq, q, do, lse2, delta, t, k_base, v_base, k_desc, v_desc, kv_row0, g, start_n, S, stride_kt, stride_vt,
    key_stride, key_offset, window, qk_scale,
    HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASKED: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr,
):
    key_idx = start_n + tl.arange(0, BLOCK_N)
    in_range = key_idx < S
    k = _rows_tile(k_base, k_desc, kv_row0, g * HEAD_DK, start_n, S, stride_kt, HEAD_DK, BLOCK_N, BLOCK_DK, TMA)
    v = _rows_tile(v_base, v_desc, kv_row0, g * HEAD_DV, start_n, S, stride_vt, HEAD_DV, BLOCK_N, BLOCK_DV, TMA)
    p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse2[:, None])
    if MASKED:
        p = tl.where(_visible(t, key_idx, key_stride, key_offset, window) & in_range[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)


@triton.jit
def _dq_kernel(
    Q, K, V, K_DESC, V_DESC, DO, DQ, LSE, DELTA,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    T, S, H, key_stride, key_offset, window, scale, qk_scale,
    GROUP: tl.constexpr, HEADS: tl.constexpr, HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr, TMA: tl.constexpr,
):
    m0, h0, t, dh = _query_tile(T, H, HEADS, BLOCK_M)
    b = tl.program_id(1).to(tl.int64)
    g = h0 // GROUP
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = t < T
    q_offs = _tile_rows(stride_qb, stride_qt, stride_qh, b, m0, h0, t, dh)[:, None] + offs_dk[None, :]
    q_mask = row_ok[:, None] & (offs_dk < HEAD_DK)[None, :]
    q = tl.load(Q + q_offs, mask=q_mask, other=0.0)
    do_rows = DO + _tile_rows(stride_ob, stride_ot, stride_oh, b, m0, h0, t, dh)
    do = tl.load(do_rows[:, None] + offs_dv[None, :], mask=row_ok[:, None] & (offs_dv < HEAD_DV)[None, :], other=0.0)
    lse2, delta = _load_row_stats(LSE, DELTA, (b * H + h0) * T + dh.to(tl.int64) * T + t, row_ok)
    k_base = K + b * stride_kb + g * stride_kh
    v_base = V + b * stride_vb + g * stride_vh

    dq = tl.zeros([BLOCK_M, BLOCK_DK], dtype=tl.float32)
    lo, mid_start, n_full, n_lo, n_edge = _key_tiles(
        m0, T, S, key_stride, key_offset, window, BLOCK_M // HEADS, BLOCK_N)
    for start_n in range(mid_start, mid_start + n_full * BLOCK_N, BLOCK_N):
        dq = _dq_tile(
            dq, q, do, lse2, delta, t, k_base, v_base, K_DESC, V_DESC, b * S, g, start_n, S, stride_kt, stride_vt,
            key_stride, key_offset, window, qk_scale,
            HEAD_DK, HEAD_DV, BLOCK_N, BLOCK_DK, BLOCK_DV, False, PRECISION, TMA)
    for i in range(n_edge):
        dq = _dq_tile(
            dq, q, do, lse2, delta, t, k_base, v_base, K_DESC, V_DESC, b * S, g,
            _edge_start(i, lo, n_lo, n_full, BLOCK_N), S,
            stride_kt, stride_vt, key_stride, key_offset, window, qk_scale,
            HEAD_DK, HEAD_DV, BLOCK_N, BLOCK_DK, BLOCK_DV, True, PRECISION, TMA)

    tl.store(DQ + q_offs, (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _dkdv_tile(
    dk, dv, k, v, key_pos, q_base, do_base, LSE, DELTA, row_base, start_m, T,
    stride_qt, stride_ot, window, qk_scale,
    HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASKED: tl.constexpr, PRECISION: tl.constexpr,
):
    t = start_m + tl.arange(0, BLOCK_M)
    row_ok = t < T  # rows past T read as lse = +inf: p = 0, whatever the tile holds there
    # Gathered, not by TMA: on triton 3.6 / sm_90 this kernel's 2-stage TMA pipeline hangs when a
    # program's loop runs exactly once (docs/KERNELS.md); the gather costs ~1.9 ms of 36.8 at 64k.
    q = _rows_tile(q_base, None, 0, 0, start_m, T, stride_qt, HEAD_DK, BLOCK_M, BLOCK_DK, False)
    do = _rows_tile(do_base, None, 0, 0, start_m, T, stride_ot, HEAD_DV, BLOCK_M, BLOCK_DV, False)
    lse2, delta = _load_row_stats(LSE, DELTA, row_base + t, row_ok)
    # Transposed ([keys, queries]) so dK and dV come out of the dots without transposes.
    p_t = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse2[None, :])
    if MASKED:
        visible_t = (key_pos[:, None] <= t[None, :]) & (key_pos[:, None] > t[None, :] - window)
        p_t = tl.where(visible_t, p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_dks, stride_dkb, stride_dkt, stride_dkh,
    stride_dvs, stride_dvb, stride_dvt, stride_dvh,
    T, S, H, key_stride, key_offset, window, scale, qk_scale, B, SPLITS,
    GROUP: tl.constexpr, HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Program id -> (key tile, batch, KV head, slice), key tile slowest: low tiles, which
    # without a window are seen by the most queries, start first.
    pid = tl.program_id(0)
    split = pid % SPLITS
    pid = pid // SPLITS
    g = pid % (H // GROUP)
    pid = pid // (H // GROUP)
    b = (pid % B).to(tl.int64)
    n0 = pid // B * BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    key_ok = (n0 + offs_n) < S
    k_mask = key_ok[:, None] & (offs_dk < HEAD_DK)[None, :]
    v_mask = key_ok[:, None] & (offs_dv < HEAD_DV)[None, :]
    n0_64 = n0.to(tl.int64)
    k = tl.load(
        K + b * stride_kb + g * stride_kh + n0_64 * stride_kt + offs_n[:, None] * stride_kt + offs_dk[None, :],
        mask=k_mask, other=0.0,
    )
    v = tl.load(
        V + b * stride_vb + g * stride_vh + n0_64 * stride_vt + offs_n[:, None] * stride_vt + offs_dv[None, :],
        mask=v_mask, other=0.0,
    )
    key_pos = (n0 + offs_n) * key_stride + key_offset

    # Queries that see some key of the tile: [first position, last position + window);
    # those in [last position, first position + window) see all of them.
    # Queries sit at 0 .. T-1 while keys may sit at negative positions (a shard's halo), so
    # both ends are clamped to [0, T]; a tile no query sees gets hi <= lo: no work, dK = dV = 0.
    pos_first = n0 * key_stride + key_offset
    pos_last = (tl.minimum(n0 + BLOCK_N, S) - 1) * key_stride + key_offset
    lo = tl.minimum(tl.maximum(pos_first, 0), T)
    hi = tl.minimum(pos_last + window, T)
    mid_start, n_full, n_lo, n_edge = _tile_ranges(
        lo, tl.minimum(pos_last, hi), tl.minimum(pos_first + window, T), hi, BLOCK_M)

    # One flat loop per kind over (head of the group, query tile) pairs, so the pipeline
    # fills twice per program rather than three times per head. The program takes slice
    # `split` of each loop: SPLITS programs share a key tile that has much work.
    dk = tl.zeros([BLOCK_N, BLOCK_DK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    pairs = GROUP * n_full
    for it in range(split * pairs // SPLITS, (split + 1) * pairs // SPLITS):
        h = g * GROUP + it // n_full
        dk, dv = _dkdv_tile(
            dk, dv, k, v, key_pos, Q + b * stride_qb + h * stride_qh, DO + b * stride_ob + h * stride_oh,
            LSE, DELTA, (b * H + h) * T, mid_start + it % n_full * BLOCK_M, T,
            stride_qt, stride_ot, window, qk_scale,
            HEAD_DK, HEAD_DV, BLOCK_M, BLOCK_DK, BLOCK_DV, False, PRECISION)
    pairs = GROUP * n_edge
    for it in range(split * pairs // SPLITS, (split + 1) * pairs // SPLITS):
        h = g * GROUP + it // n_edge
        dk, dv = _dkdv_tile(
            dk, dv, k, v, key_pos, Q + b * stride_qb + h * stride_qh, DO + b * stride_ob + h * stride_oh,
            LSE, DELTA, (b * H + h) * T,
            _edge_start(it % n_edge, lo, n_lo, n_full, BLOCK_M), T,
            stride_qt, stride_ot, window, qk_scale,
            HEAD_DK, HEAD_DV, BLOCK_M, BLOCK_DK, BLOCK_DV, True, PRECISION)

    split_64 = split.to(tl.int64)
    tl.store(
        DK + split_64 * stride_dks + b * stride_dkb + g * stride_dkh + n0_64 * stride_dkt
        + offs_n[:, None] * stride_dkt + offs_dk[None, :],
        (dk * scale).to(DK.dtype.element_ty), mask=k_mask,
    )
    tl.store(
        DV + split_64 * stride_dvs + b * stride_dvb + g * stride_dvh + n0_64 * stride_dvt
        + offs_n[:, None] * stride_dvt + offs_dv[None, :],
        dv.to(DV.dtype.element_ty), mask=v_mask,
    )


# --- launch configuration ------------------------------------------------------


@dataclass(frozen=True)
class _Tiles:
    """One launch's tile: ``m`` rows by ``n`` keys (dK/dV: ``m`` queries by ``n`` keys).

    Forward and dQ rows are ``pack`` heads of one group at ``m // pack`` positions: under a
    window, a tile spanning fewer positions needs fewer keys (its band is narrower) while
    keeping ``m`` rows per key load. In a base configuration ``pack`` is an upper bound;
    ``_Launch.tiles`` resolves it for the shape.
    """

    m: int
    n: int
    num_warps: int
    num_stages: int
    pack: int = 1


# Under the interpreter programs run one after another on the CPU: small tiles keep
# the tests quick and cover many tile boundaries. m != n catches mixed-up bounds.
_INTERPRETER_TILES = _Tiles(m=32, n=16, num_warps=4, num_stages=1, pack=2)
# Pretend SM count under the interpreter, small so that the tests split dK/dV key tiles.
_INTERPRETER_SMS = 2
# Most programs one dK/dV key tile is split into (each keeps a float32 partial dK, dV).
_MAX_DKDV_SPLITS = 16


def _gpu_tiles(kernel: str, dtype: torch.dtype, block_d: int, by_tma: bool = False) -> _Tiles:
    """sm_90 tiles by kernel, element size, padded head dim (the larger of dk, dv) and whether
    the kernel's streamed tiles come by TMA."""
    wide = block_d > 128
    if dtype == torch.float32:  # IEEE fp32 dots: a correctness path, sized for shared memory
        return _Tiles(32, 32, 4, 1 if wide else 2)
    if kernel == "fwd" and by_tma:
        # H200, T=64k, d=128, benchmarks/tune_banded.py: 64x64 tiles, 4 warps, 3 stages are the
        # window forward's best (3.33 ms; gathered tiles 3.75) and within 0.2 ms of the compressed
        # one's (9.66 ms against 9.45 at 128x64, 8 warps; gathered 10.31).
        return _Tiles(64, 64, 4, 3, pack=2)
    if kernel == "fwd":
        # Window 512: 2 heads x 64 positions see 575 keys, 9 tiles of 64 (of which 2
        # masked), where 128 positions see 639 keys in 10 tiles (4 masked).
        return _Tiles(64, 64, 4, 2, pack=2) if wide else _Tiles(128, 64, 8, 3, pack=2)
    # Backward, d <= 128, from benchmarks/tune_banded.py (H200, T=64k, 16 heads per group):
    # 64-key dQ tiles and 128-key dK/dV tiles (fewer, longer programs; the dK/dV accumulators
    # stay in registers at one program per SM) took the compressed branch's backward from
    # 63 to ~36 ms and the window's from 15.5 to ~12 ms.
    if kernel == "dq":
        return _Tiles(64, 32, 8, 2, pack=2) if wide else _Tiles(128, 64, 8, 3, pack=2)
    # dkdv: dK and dV accumulators of n rows live in registers for the whole program.
    return _Tiles(32, 64, 8, 2) if wide else _Tiles(64, 128, 8, 2)


def _num_sms(device: torch.device) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return _INTERPRETER_SMS
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=256)
def _dkdv_splits(
    seq_len: int, num_keys: int, key_stride: int, key_offset: int, window: int,
    group: int, units: int, block_m: int, block_n: int, num_sms: int,
) -> int:
    """Programs per (key tile, batch, KV head) of the dK/dV kernel.

    A key tile's work is its (head of the group, query tile) pairs; ``units`` (batch x KV
    heads) copies of each tile run side by side. Without a window the first tiles are seen
    by every later query (T=64k, 16 heads, 64 x 64 tiles: 16k pairs for the first, 256 for
    the last). Halving until the longest program is at most half an SM's share of all the
    work lets the SMs finish together, as the kernel launches the long ones first (there:
    4 slices, within 1% of a perfect split in a list-scheduling model). Window tiles are
    small and alike; they stay whole unless there are too few to fill the SMs.
    """
    first = torch.arange(0, num_keys, block_n, dtype=torch.int64)
    last = (first + block_n).clamp(max=num_keys) - 1
    # Queries are 0 .. seq_len-1; keys may sit at negative positions (key_offset < 0).
    lo = (first * key_stride + key_offset).clamp(min=0, max=seq_len)
    hi = (last * key_stride + key_offset + window).clamp(max=seq_len)
    work = group * (((hi - lo).clamp(min=0) + block_m - 1) // block_m)
    share = max(int(work.sum()) * units / (2 * num_sms), 1.0)
    longest = int(work.max())
    splits = 1
    while splits < _MAX_DKDV_SPLITS and longest > splits * share:
        splits *= 2
    return splits


@dataclass(frozen=True)
class _Launch:
    """Shapes and scalars shared by the forward and backward launches."""

    batch: int
    seq_len: int
    num_keys: int
    num_heads: int
    group: int
    head_dk: int
    head_dv: int
    key_stride: int
    key_offset: int
    window: int
    scale: float

    @property
    def block_dk(self) -> int:
        return max(16, triton.next_power_of_2(self.head_dk))

    @property
    def block_dv(self) -> int:
        return max(16, triton.next_power_of_2(self.head_dv))

    @property
    def keys_per_row(self) -> int:
        return min(self.num_keys, triton.cdiv(self.window, self.key_stride))

    def tiles(self, kernel: str, dtype: torch.dtype, by_tma: bool = False) -> _Tiles:
        """Tile for ``kernel`` ("fwd", "dq" or "dkdv"), no larger than the rows and keys need."""
        base = _INTERPRETER_TILES if os.environ.get("TRITON_INTERPRET") == "1" else _gpu_tiles(
            kernel, dtype, max(self.block_dk, self.block_dv), by_tma)
        # Stacking heads narrows the band only where a window cuts it; the stacked heads
        # must share a group (a power of two dividing it).
        pack = 1
        windowed = kernel != "dkdv" and self.window < self.seq_len - min(self.key_offset, 0)
        while windowed and pack < base.pack and self.group % (2 * pack) == 0:
            pack *= 2
        m = min(base.m, max(16, triton.next_power_of_2(self.seq_len * pack)))
        n = min(base.n, max(16, triton.next_power_of_2(self.keys_per_row)))
        return _Tiles(m, n, base.num_warps, base.num_stages, pack)

    def scalars(self) -> tuple:
        return (self.seq_len, self.num_keys, self.num_heads, self.key_stride, self.key_offset, self.window)

    def query_grid(self, tiles: _Tiles) -> tuple[int, int]:
        """Forward / dQ grid: (query tile, head pack) flattened by ``_query_tile``, batch."""
        return triton.cdiv(self.seq_len, tiles.m // tiles.pack) * (self.num_heads // tiles.pack), self.batch

    def kernel_kwargs(self, tiles: _Tiles, dtype: torch.dtype) -> dict:
        return dict(
            GROUP=self.group, HEAD_DK=self.head_dk, HEAD_DV=self.head_dv,
            BLOCK_M=tiles.m, BLOCK_N=tiles.n, BLOCK_DK=self.block_dk, BLOCK_DV=self.block_dv,
            PRECISION="ieee" if dtype == torch.float32 else "tf32",
            num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )


def _strides(x: torch.Tensor) -> tuple[int, ...]:
    return x.stride()[:-1]


def _forward(q, k, v, p: _Launch) -> tuple[torch.Tensor, torch.Tensor]:
    o_shape, lse_shape = (p.batch, p.seq_len, p.num_heads, p.head_dv), (p.batch, p.num_heads, p.seq_len)
    if p.num_keys == 0:
        return q.new_zeros(o_shape), torch.full(lse_shape, float("-inf"), dtype=torch.float32, device=q.device)
    # The kernel writes every row, so no memset.
    o = q.new_empty(o_shape)
    lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    by_tma = tma.applies(k, v)
    tiles = p.tiles("fwd", q.dtype, by_tma)
    kv = (tma.row_tiles(k, tiles.n), tma.row_tiles(v, tiles.n)) if by_tma else (k, v)
    _fwd_kernel[p.query_grid(tiles)](
        q, k, v, *kv, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        *p.scalars(), p.scale * _LOG2E.value, HEADS=tiles.pack, **p.kernel_kwargs(tiles, q.dtype), TMA=by_tma,
    )
    return o, lse


def _backward(q, k, v, o, lse, do, p: _Launch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if p.num_keys == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(o))
    delta = torch.empty_like(lse)
    block_m = 64
    _delta_kernel[(triton.cdiv(p.seq_len, block_m), p.num_heads, p.batch)](
        o, do, delta, *_strides(o), p.seq_len, p.num_heads,
        HEAD_DV=p.head_dv, BLOCK_M=block_m, BLOCK_DV=p.block_dv,
    )

    tiles = p.tiles("dkdv", q.dtype)
    num_groups = p.num_heads // p.group
    splits = _dkdv_splits(
        p.seq_len, p.num_keys, p.key_stride, p.key_offset, p.window,
        p.group, p.batch * num_groups, tiles.m, tiles.n, _num_sms(q.device))
    if splits == 1:
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        dk_out, dv_out = dk[None], dv[None]
    else:  # float32 partials per slice, summed below (deterministic, no atomics)
        dk_out = torch.empty((splits, *k.shape), dtype=torch.float32, device=k.device)
        dv_out = torch.empty((splits, *v.shape), dtype=torch.float32, device=v.device)
    _dkdv_kernel[(triton.cdiv(p.num_keys, tiles.n) * p.batch * num_groups * splits,)](
        q, k, v, do, dk_out, dv_out, lse, delta, *strides, *_strides(dk_out), *_strides(dv_out),
        *p.scalars(), p.scale, p.scale * _LOG2E.value, p.batch, splits, **p.kernel_kwargs(tiles, q.dtype),
    )
    if splits > 1:
        dk, dv = dk_out.sum(0).to(k.dtype), dv_out.sum(0).to(v.dtype)

    dq = torch.empty_like(q)
    by_tma = tma.applies(k, v)
    tiles = p.tiles("dq", q.dtype, by_tma)
    kv = (tma.row_tiles(k, tiles.n), tma.row_tiles(v, tiles.n)) if by_tma else (k, v)
    _dq_kernel[p.query_grid(tiles)](
        q, k, v, *kv, do, dq, lse, delta, *strides,
        *p.scalars(), p.scale, p.scale * _LOG2E.value, HEADS=tiles.pack, **p.kernel_kwargs(tiles, q.dtype), TMA=by_tma,
    )
    return dq, dk, dv


class _BandedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, params: _Launch):
        o, lse = _forward(q, k, v, params)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.params = params
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, o, lse, do.contiguous(), ctx.params)
        return dq, dk, dv, None


def banded_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_stride: int,
    key_offset: int,
    window: int | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``q [B, T, H, dk]`` over ``k [B, S, G, dk]``, ``v [B, S, G, dv]``.

    Key ``i`` sits at position ``i*key_stride + key_offset``; query ``t`` sees it iff that
    position is ``<= t`` and (``window is None`` or ``> t - window``). ``key_offset`` may be
    negative: queries that are a shard of a longer sequence (context parallelism) see keys
    before their first position; any ``S`` (keys no query sees get zero dK/dV). Query head ``h``
    uses KV head ``h // (H // G)``. Returns ``o [B, T, H, dv]`` in ``q``'s dtype (0 on rows
    that see nothing) and ``lse [B, H, T]`` float32, natural log (``-inf`` on those rows).
    ``o`` is differentiable in ``q``, ``k``, ``v``; ``lse`` is not.
    """
    batch, seq_len, num_heads, head_dk = q.shape
    num_keys, num_groups, head_dv = k.shape[1], k.shape[2], v.shape[3]
    if k.shape != (batch, num_keys, num_groups, head_dk) or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match")
    if num_heads % num_groups:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of KV heads ({num_groups})")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"dtypes differ: q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if key_stride < 1 or (window is not None and window < 1):
        raise ValueError(f"need key_stride >= 1, window >= 1 or None; got {key_stride}, {window}")
    # Any window >= T - min(key_offset, 0) hides nothing (positions are >= min(key_offset, 0)
    # > t - window for every t < T); capping keeps int32 sums small.
    window_cap = seq_len - min(key_offset, 0)
    params = _Launch(
        batch=batch, seq_len=seq_len, num_keys=num_keys, num_heads=num_heads,
        group=num_heads // num_groups, head_dk=head_dk, head_dv=head_dv,
        key_stride=key_stride, key_offset=key_offset,
        window=window_cap if window is None else min(window, window_cap),
        scale=float(scale),
    )
    return _BandedAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), params)
