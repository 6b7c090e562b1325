"""Banded attention: query ``t`` sees key ``i`` iff ``p_i <= t`` and ``p_i > t - window``,
where key ``i`` sits at position ``p_i = i*key_stride + key_offset``.

One kernel family serves two NSA branches: compressed attention (key ``i`` is the
compression block ending at ``i*d + l - 1``, no window) and sliding-window attention
(stride 1, offset 0, window ``w``).

Why the kernels are shaped as they are:

- The rule is monotone in ``t`` and in ``i``: row ``t`` sees exactly the keys
  ``[n(t - window), n(t))`` with ``n(x)`` = number of keys at positions ``<= x``. So a
  tile of queries sees one contiguous key range and a tile of keys is seen by one
  contiguous query range. Every kernel computes its range with integer arithmetic
  and visits only those tiles: work follows the band, not ``T x S``.
- Each range is walked in three loops: tiles straddling its lower edge, tiles fully
  inside (visible to every row of the tile, so they skip the per-element mask), and
  tiles straddling its upper edge.
- FlashAttention-2 structure: the forward (one program per query tile, head, batch)
  keeps an online softmax in base 2 with float32 accumulators and stores ``o`` and
  the natural-log ``lse``. The backward computes ``delta = rowsum(dO * O)``, then dK/dV
  with one program per (key tile, KV head, batch) that loops over the heads of its
  group and the query tiles that see the tile, so dK/dV accumulate in registers
  without atomics, and dQ with one program per (query tile, head, batch).
- Rows that see no key (compressed attention before the first full block) keep a zero
  softmax denominator: their output is 0 and ``lse = -inf``. The backward reads their
  ``lse`` as ``+inf``, so every probability and hence every gradient is exactly 0.
- Each program offsets its base pointers by int64 scalars and indexes its tile with
  small int32 offsets, so tensors beyond 2**31 elements address correctly.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

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
def _fwd_tile(
    acc, m_i, l_i, q, t, k_base, v_base, start_n, S, stride_kt, stride_vt,
    key_stride, key_offset, window, qk_scale,
    HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASKED: tl.constexpr, PRECISION: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    key_idx = start_n + offs_n
    in_range = key_idx < S
    k = tl.load(
        k_base + tl.cast(start_n, tl.int64) * stride_kt + offs_n[:, None] * stride_kt + offs_dk[None, :],
        mask=in_range[:, None] & (offs_dk < HEAD_DK)[None, :], other=0.0,
    )
    v = tl.load(
        v_base + tl.cast(start_n, tl.int64) * stride_vt + offs_n[:, None] * stride_vt + offs_dv[None, :],
        mask=in_range[:, None] & (offs_dv < HEAD_DV)[None, :], other=0.0,
    )
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
def _query_tile_key_ranges(m0, T, S, key_stride, key_offset, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key-tile loop bounds of query tile ``[m0, m0 + BLOCK_M)``.

    Returns ``lo, mid_start, mid_end, hi``: masked tiles start in ``[lo, mid_start)`` and
    ``[mid_end, hi)``; tiles starting in ``[mid_start, mid_end)`` are visible to every row.
    """
    t_max = tl.minimum(m0 + BLOCK_M, T) - 1
    lo = _num_keys_upto(m0 - window, key_stride, key_offset)
    hi = tl.minimum(_num_keys_upto(t_max, key_stride, key_offset), S)
    full_lo = tl.minimum(_num_keys_upto(t_max - window, key_stride, key_offset), hi)
    full_hi = tl.minimum(_num_keys_upto(m0, key_stride, key_offset), S)
    mid_start = lo + tl.cdiv(tl.maximum(full_lo - lo, 0), BLOCK_N) * BLOCK_N
    mid_end = mid_start + tl.maximum(full_hi - mid_start, 0) // BLOCK_N * BLOCK_N
    return lo, mid_start, mid_end, hi


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    T, S, H, key_stride, key_offset, window, qk_scale,
    GROUP: tl.constexpr, HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    m0 = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    g = h // GROUP
    offs_m = tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    t = m0 + offs_m
    row_ok = t < T

    q_base = Q + b * stride_qb + h * stride_qh + m0.to(tl.int64) * stride_qt
    q = tl.load(
        q_base + offs_m[:, None] * stride_qt + offs_dk[None, :],
        mask=row_ok[:, None] & (offs_dk < HEAD_DK)[None, :], other=0.0,
    )
    k_base = K + b * stride_kb + g * stride_kh
    v_base = V + b * stride_vb + g * stride_vh

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    lo, mid_start, mid_end, hi = _query_tile_key_ranges(
        m0, T, S, key_stride, key_offset, window, BLOCK_M, BLOCK_N)
    for start_n in range(lo, mid_start, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(
            acc, m_i, l_i, q, t, k_base, v_base, start_n, S, stride_kt, stride_vt,
            key_stride, key_offset, window, qk_scale,
            HEAD_DK, HEAD_DV, BLOCK_N, BLOCK_DK, BLOCK_DV, True, PRECISION)
    for start_n in range(mid_start, mid_end, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(
            acc, m_i, l_i, q, t, k_base, v_base, start_n, S, stride_kt, stride_vt,
            key_stride, key_offset, window, qk_scale,
            HEAD_DK, HEAD_DV, BLOCK_N, BLOCK_DK, BLOCK_DV, False, PRECISION)
    for start_n in range(mid_end, hi, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(
            acc, m_i, l_i, q, t, k_base, v_base, start_n, S, stride_kt, stride_vt,
            key_stride, key_offset, window, qk_scale,
            HEAD_DK, HEAD_DV, BLOCK_N, BLOCK_DK, BLOCK_DV, True, PRECISION)

    seen = l_i > 0.0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(tl.where(seen, l_i, 1.0))) * _LN2, float("-inf"))
    o_base = O + b * stride_ob + h * stride_oh + m0.to(tl.int64) * stride_ot
    tl.store(
        o_base + offs_m[:, None] * stride_ot + offs_dv[None, :], o.to(O.dtype.element_ty),
        mask=row_ok[:, None] & (offs_dv < HEAD_DV)[None, :],
    )
    lse_base = LSE + (b * H + h) * T + m0
    tl.store(lse_base + offs_m, lse, mask=row_ok)


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
def _load_row_stats(LSE, DELTA, row_base, t, T):
    """``lse`` in base 2 with empty and out-of-range rows as ``+inf`` (so ``p = 0``), and ``delta``."""
    row_ok = t < T
    lse = tl.load(LSE + row_base + t, mask=row_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)
    delta = tl.load(DELTA + row_base + t, mask=row_ok, other=0.0)
    return lse2, delta


@triton.jit
def _dq_tile(
    dq, q, do, lse2, delta, t, k_base, v_base, start_n, S, stride_kt, stride_vt,
    key_stride, key_offset, window, qk_scale,
    HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASKED: tl.constexpr, PRECISION: tl.constexpr,
):
    offs_n = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    key_idx = start_n + offs_n
    in_range = key_idx < S
    k = tl.load(
        k_base + tl.cast(start_n, tl.int64) * stride_kt + offs_n[:, None] * stride_kt + offs_dk[None, :],
        mask=in_range[:, None] & (offs_dk < HEAD_DK)[None, :], other=0.0,
    )
    v = tl.load(
        v_base + tl.cast(start_n, tl.int64) * stride_vt + offs_n[:, None] * stride_vt + offs_dv[None, :],
        mask=in_range[:, None] & (offs_dv < HEAD_DV)[None, :], other=0.0,
    )
    p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse2[:, None])
    if MASKED:
        p = tl.where(_visible(t, key_idx, key_stride, key_offset, window) & in_range[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)


@triton.jit
def _dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    T, S, H, key_stride, key_offset, window, scale, qk_scale,
    GROUP: tl.constexpr, HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    m0 = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    g = h // GROUP
    offs_m = tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    t = m0 + offs_m
    row_ok = t < T
    q_mask = row_ok[:, None] & (offs_dk < HEAD_DK)[None, :]

    q_base = Q + b * stride_qb + h * stride_qh + m0.to(tl.int64) * stride_qt
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_dk[None, :], mask=q_mask, other=0.0)
    do_base = DO + b * stride_ob + h * stride_oh + m0.to(tl.int64) * stride_ot
    do = tl.load(
        do_base + offs_m[:, None] * stride_ot + offs_dv[None, :],
        mask=row_ok[:, None] & (offs_dv < HEAD_DV)[None, :], other=0.0,
    )
    lse2, delta = _load_row_stats(LSE, DELTA, (b * H + h) * T, t, T)
    k_base = K + b * stride_kb + g * stride_kh
    v_base = V + b * stride_vb + g * stride_vh

    dq = tl.zeros([BLOCK_M, BLOCK_DK], dtype=tl.float32)
    lo, mid_start, mid_end, hi = _query_tile_key_ranges(
        m0, T, S, key_stride, key_offset, window, BLOCK_M, BLOCK_N)
    for start_n in range(lo, mid_start, BLOCK_N):
        dq = _dq_tile(
            dq, q, do, lse2, delta, t, k_base, v_base, start_n, S, stride_kt, stride_vt,
            key_stride, key_offset, window, qk_scale,
            HEAD_DK, HEAD_DV, BLOCK_N, BLOCK_DK, BLOCK_DV, True, PRECISION)
    for start_n in range(mid_start, mid_end, BLOCK_N):
        dq = _dq_tile(
            dq, q, do, lse2, delta, t, k_base, v_base, start_n, S, stride_kt, stride_vt,
            key_stride, key_offset, window, qk_scale,
            HEAD_DK, HEAD_DV, BLOCK_N, BLOCK_DK, BLOCK_DV, False, PRECISION)
    for start_n in range(mid_end, hi, BLOCK_N):
        dq = _dq_tile(
            dq, q, do, lse2, delta, t, k_base, v_base, start_n, S, stride_kt, stride_vt,
            key_stride, key_offset, window, qk_scale,
            HEAD_DK, HEAD_DV, BLOCK_N, BLOCK_DK, BLOCK_DV, True, PRECISION)

    dq_base = DQ + b * stride_qb + h * stride_qh + m0.to(tl.int64) * stride_qt
    tl.store(
        dq_base + offs_m[:, None] * stride_qt + offs_dk[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=q_mask,
    )


@triton.jit
def _dkdv_tile(
    dk, dv, k, v, key_pos, q_base, do_base, LSE, DELTA, row_base, start_m, T,
    stride_qt, stride_ot, window, qk_scale,
    HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASKED: tl.constexpr, PRECISION: tl.constexpr,
):
    offs_m = tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    t = start_m + offs_m
    row_ok = t < T
    q = tl.load(
        q_base + tl.cast(start_m, tl.int64) * stride_qt + offs_m[:, None] * stride_qt + offs_dk[None, :],
        mask=row_ok[:, None] & (offs_dk < HEAD_DK)[None, :], other=0.0,
    )
    do = tl.load(
        do_base + tl.cast(start_m, tl.int64) * stride_ot + offs_m[:, None] * stride_ot + offs_dv[None, :],
        mask=row_ok[:, None] & (offs_dv < HEAD_DV)[None, :], other=0.0,
    )
    lse2, delta = _load_row_stats(LSE, DELTA, row_base, t, T)
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
    T, S, H, key_stride, key_offset, window, scale, qk_scale,
    GROUP: tl.constexpr, HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    n0 = tl.program_id(0) * BLOCK_N
    g = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    key_ok = (n0 + offs_n) < S
    k_mask = key_ok[:, None] & (offs_dk < HEAD_DK)[None, :]
    v_mask = key_ok[:, None] & (offs_dv < HEAD_DV)[None, :]
    n0_64 = n0.to(tl.int64)
    k_offs = b * stride_kb + g * stride_kh + n0_64 * stride_kt + offs_n[:, None] * stride_kt + offs_dk[None, :]
    v_offs = b * stride_vb + g * stride_vh + n0_64 * stride_vt + offs_n[:, None] * stride_vt + offs_dv[None, :]
    k = tl.load(K + k_offs, mask=k_mask, other=0.0)
    v = tl.load(V + v_offs, mask=v_mask, other=0.0)
    key_pos = (n0 + offs_n) * key_stride + key_offset

    # Queries that see some key of the tile: [first position, last position + window);
    # those in [last position, first position + window) see all of them.
    pos_first = n0 * key_stride + key_offset
    pos_last = (tl.minimum(n0 + BLOCK_N, S) - 1) * key_stride + key_offset
    lo = tl.minimum(pos_first, T)
    hi = tl.minimum(pos_last + window, T)
    full_lo = tl.minimum(pos_last, hi)
    full_hi = tl.minimum(pos_first + window, T)
    mid_start = lo + tl.cdiv(tl.maximum(full_lo - lo, 0), BLOCK_M) * BLOCK_M
    mid_end = mid_start + tl.maximum(full_hi - mid_start, 0) // BLOCK_M * BLOCK_M

    dk = tl.zeros([BLOCK_N, BLOCK_DK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for j in range(GROUP):
        h = g * GROUP + j
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_ob + h * stride_oh
        row_base = (b * H + h) * T
        for start_m in range(lo, mid_start, BLOCK_M):
            dk, dv = _dkdv_tile(
                dk, dv, k, v, key_pos, q_base, do_base, LSE, DELTA, row_base, start_m, T,
                stride_qt, stride_ot, window, qk_scale,
                HEAD_DK, HEAD_DV, BLOCK_M, BLOCK_DK, BLOCK_DV, True, PRECISION)
        for start_m in range(mid_start, mid_end, BLOCK_M):
            dk, dv = _dkdv_tile(
                dk, dv, k, v, key_pos, q_base, do_base, LSE, DELTA, row_base, start_m, T,
                stride_qt, stride_ot, window, qk_scale,
                HEAD_DK, HEAD_DV, BLOCK_M, BLOCK_DK, BLOCK_DV, False, PRECISION)
        for start_m in range(mid_end, hi, BLOCK_M):
            dk, dv = _dkdv_tile(
                dk, dv, k, v, key_pos, q_base, do_base, LSE, DELTA, row_base, start_m, T,
                stride_qt, stride_ot, window, qk_scale,
                HEAD_DK, HEAD_DV, BLOCK_M, BLOCK_DK, BLOCK_DV, True, PRECISION)

    tl.store(DK + k_offs, (dk * scale).to(DK.dtype.element_ty), mask=k_mask)
    tl.store(DV + v_offs, dv.to(DV.dtype.element_ty), mask=v_mask)


# --- launch configuration ------------------------------------------------------


@dataclass(frozen=True)
class _Tiles:
    """One launch's tile: ``m`` queries by ``n`` keys."""

    m: int
    n: int
    num_warps: int
    num_stages: int


# Under the interpreter programs run one after another on the CPU: small tiles keep
# the tests quick and cover many tile boundaries. m != n catches mixed-up bounds.
_INTERPRETER_TILES = _Tiles(m=32, n=16, num_warps=4, num_stages=1)


def _gpu_tiles(kernel: str, dtype: torch.dtype, block_d: int) -> _Tiles:
    """H100 tiles by kernel, element size and padded head dim (the larger of dk, dv)."""
    wide = block_d > 128
    if dtype == torch.float32:  # IEEE fp32 dots: a correctness path, sized for shared memory
        return _Tiles(32, 32, 4, 1 if wide else 2)
    if kernel == "fwd":
        return _Tiles(64, 64, 4, 2) if wide else _Tiles(128, 64, 8, 3)
    if kernel == "dq":
        return _Tiles(64, 32, 8, 2) if wide else _Tiles(128, 32, 8, 2)
    # dkdv: dK and dV accumulators of n rows live in registers for the whole program.
    return _Tiles(32, 64, 8, 2) if wide else _Tiles(64, 64, 8, 2)


def _tiles(kernel: str, dtype: torch.dtype, block_d: int, seq_len: int, keys_per_row: int) -> _Tiles:
    """Tile for ``kernel`` ("fwd", "dq" or "dkdv"), no larger than the rows and keys need."""
    base = _INTERPRETER_TILES if os.environ.get("TRITON_INTERPRET") == "1" else _gpu_tiles(kernel, dtype, block_d)
    m = min(base.m, max(16, triton.next_power_of_2(seq_len)))
    n = min(base.n, max(16, triton.next_power_of_2(keys_per_row)))
    return _Tiles(m, n, base.num_warps, base.num_stages)


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

    def tiles(self, kernel: str, dtype: torch.dtype) -> _Tiles:
        return _tiles(kernel, dtype, max(self.block_dk, self.block_dv), self.seq_len, self.keys_per_row)

    def scalars(self) -> tuple:
        return (self.seq_len, self.num_keys, self.num_heads, self.key_stride, self.key_offset, self.window)

    def kernel_kwargs(self, tiles: _Tiles, dtype: torch.dtype) -> dict:
        return dict(
            GROUP=self.group, HEAD_DK=self.head_dk, HEAD_DV=self.head_dv,
            BLOCK_M=tiles.m, BLOCK_N=tiles.n, BLOCK_DK=self.block_dk, BLOCK_DV=self.block_dv,
            PRECISION="ieee" if dtype == torch.float32 else "tf32",
            num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        )


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _forward(q, k, v, p: _Launch) -> tuple[torch.Tensor, torch.Tensor]:
    o_shape, lse_shape = (p.batch, p.seq_len, p.num_heads, p.head_dv), (p.batch, p.num_heads, p.seq_len)
    if p.num_keys == 0:
        return q.new_zeros(o_shape), torch.full(lse_shape, float("-inf"), dtype=torch.float32, device=q.device)
    # The kernel writes every row, so no memset.
    o = q.new_empty(o_shape)
    lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    tiles = p.tiles("fwd", q.dtype)
    grid = (triton.cdiv(p.seq_len, tiles.m), p.num_heads, p.batch)
    _fwd_kernel[grid](
        q, k, v, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
        *p.scalars(), p.scale * _LOG2E.value, **p.kernel_kwargs(tiles, q.dtype),
    )
    return o, lse


def _backward(q, k, v, o, lse, do, p: _Launch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if p.num_keys == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(o))
    delta = torch.empty_like(lse)
    block_m = 64
    _delta_kernel[(triton.cdiv(p.seq_len, block_m), p.num_heads, p.batch)](
        o, do, delta, *_strides(o), p.seq_len, p.num_heads,
        HEAD_DV=p.head_dv, BLOCK_M=block_m, BLOCK_DV=p.block_dv,
    )
    tiles = p.tiles("dkdv", q.dtype)
    _dkdv_kernel[(triton.cdiv(p.num_keys, tiles.n), p.num_heads // p.group, p.batch)](
        q, k, v, do, dk, dv, lse, delta, *strides,
        *p.scalars(), p.scale, p.scale * _LOG2E.value, **p.kernel_kwargs(tiles, q.dtype),
    )
    tiles = p.tiles("dq", q.dtype)
    _dq_kernel[(triton.cdiv(p.seq_len, tiles.m), p.num_heads, p.batch)](
        q, k, v, do, dq, lse, delta, *strides,
        *p.scalars(), p.scale, p.scale * _LOG2E.value, **p.kernel_kwargs(tiles, q.dtype),
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
    position is ``<= t`` and (``window is None`` or ``> t - window``). Query head ``h``
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
    if key_stride < 1 or key_offset < 0 or (window is not None and window < 1):
        raise ValueError(f"need key_stride >= 1, key_offset >= 0, window >= 1 or None; got "
                         f"{key_stride}, {key_offset}, {window}")
    params = _Launch(
        batch=batch, seq_len=seq_len, num_keys=num_keys, num_heads=num_heads,
        group=num_heads // num_groups, head_dk=head_dk, head_dv=head_dv,
        key_stride=key_stride, key_offset=key_offset,
        # Any window >= T hides nothing (positions are >= 0 > t - T); capping keeps int32 sums small.
        window=seq_len if window is None else min(window, seq_len),
        scale=float(scale),
    )
    return _BandedAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), params)
