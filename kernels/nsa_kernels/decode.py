"""NSA decode attention: one new query per sequence against the KV cache.

Semantics: ``nsa_parallel.inference.attention.reference_decode``. Sequence ``b`` holds
``lengths[b]`` tokens and its query sits at position ``lengths[b] - 1``; what each branch sees is
computed in the kernels from ``lengths``, a device tensor, so nothing here synchronises with the
host and every launch's grid depends only on shapes: a decode step can be captured in a CUDA graph.

Decoding reads each cached key/value once per step and does little arithmetic with it, so the
kernels are shaped for memory traffic and parallelism:

- **Group-centric.** Every program owns one (sequence, KV group) and loads the queries of all the
  group's heads ``[H/G, dk]`` (rows padded to 16, Hopper's smallest dot), so each K/V tile is
  loaded once for all of them, as in the training selection kernel.
- **Split-K.** One sequence has only ``G`` groups, too few programs to draw the GPU's bandwidth,
  so each branch's keys are split over programs (``target_programs``: about 4 per SM): compressed and
  window keys in runs of ``BLOCK_N``-row tiles, selected blocks a few per program. Each writes its
  online-softmax partial (``m``, ``l``, ``acc``, in log2 units, float32), and one combine program
  per (sequence, head) merges every branch's partials and applies the gates (the gated sum fused).
- **Scores from the compressed pass.** Block scores need the compression probabilities
  ``exp(s - lse)``, and ``lse`` is known only once every split is done. Rather than reading the
  compressed keys a second time, the compressed pass maps each tile's unnormalised
  ``exp2(s - m)`` to selection blocks through the overlap weights (a small dot with the exact
  integer weights, IEEE float32) and stores that per head, with ``m``. The selection program of a
  (sequence, group) then forms ``lse`` from the splits' ``(m, l)``, rescales every tile's partial
  by ``exp2(m - lse)``, sums the group's heads and takes the top ``n`` with the training kernel's
  rule (``block_selection.top_n_mask``: forced blocks first, ties to the lower id).

Launches per step: compressed partials, selection (scores and top-n), selected-block partials,
window partials, combine. Window partials work on any cache addressed by rows
``0 .. min(lengths, rows)-1``, so a dense cache with the same kernel is a split-K dense decode
(``dense_decode``, the benchmark's like-for-like baseline).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tma
from .block_selection import store_chosen, top_n_mask

LOG2E = 1.4426950408889634
BLOCK_N = 64  # cache rows per tile of the compressed and window passes
COMBINE_CHUNK = 32  # partials merged per step of the combine
# Not yet timed on a GPU. ptxas (sm_90, H/G = 16, d = 128; benchmarks/ptxas_decode.py): with bf16
# TMA tiles 8 warps spill nothing (85-254 registers), 4 warps spill in the compressed pass; gathered
# tiles (float32, no TMA) hold a 64-bit address per element and spill some even at 8 warps. The
# loops' bounds are dynamic, so there is no software pipelining (stages change nothing).
LAUNCH = {"num_warps": 8, "num_stages": 1}
_MIN_DOT = 16  # Hopper's smallest tl.dot M, N and K


def target_programs(device: torch.device) -> int:
    """Programs to aim for per branch: enough to keep every SM's loads in flight."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter: few programs, but still several splits


@triton.jit
def _group_queries(q_ptr, b, g, H, heads_per_group, DK: tl.constexpr, HP: tl.constexpr, DK_P: tl.constexpr):
    """The group's query rows ``[HP, DK_P]`` of ``q [B, H, DK]`` (padding rows zero), head ids, validity."""
    h = tl.arange(0, HP)
    h_ok = h < heads_per_group
    head = g * heads_per_group + h
    offs_d = tl.arange(0, DK_P)
    q = tl.load(q_ptr + (b * H + head[:, None]) * DK + offs_d[None, :],
                mask=h_ok[:, None] & (offs_d < DK)[None, :], other=0.0)
    return q, head, h_ok


@triton.jit
def _load_rows(ptr, desc, b, first, rows, ok, g, num_rows, stride_b, stride_r, D: tl.constexpr, D_P: tl.constexpr,
               TMA: tl.constexpr):
    """Rows ``rows = first + arange`` of KV head ``g`` of a ``[B, N, G, D]`` cache (last two dims
    contiguous), ``[len(rows), D_P]``: one TMA box of the ``[B*N, G*D]`` view (rows past the
    sequence, from the next one or zeros, are finite and masked by the caller through ``ok``), or a
    masked gather, whose 64-bit address per element costs registers (255 and spills at 4 warps)."""
    if TMA:
        return desc.load([(b * num_rows + tl.maximum(first, 0)).to(tl.int32), g * D])
    else:
        offs_d = tl.arange(0, D_P)
        return tl.load(ptr + b * stride_b + rows[:, None].to(tl.int64) * stride_r + g * D + offs_d[None, :],
                       mask=ok[:, None] & (offs_d < D)[None, :], other=0.0)


@triton.jit
def _online_step(q, k, v, ok, m, l, acc, qk_scale, PRECISION: tl.constexpr):
    """One K/V tile of an online softmax in log2 units; also returns the tile's ``exp2(s - shift)``
    and ``shift`` (the new running max, 0 while nothing is seen)."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    s = tl.where(ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # no inf - inf on rows that saw nothing
    alpha = tl.exp2(m - shift)
    p = tl.exp2(s - shift[:, None])
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l, acc, p, shift


@triton.jit
def _store_partial(pm_ptr, pl_ptr, pacc_ptr, b, H, head, h_ok, split, num_splits, m, l, acc,
                   DV: tl.constexpr, DV_P: tl.constexpr):
    """A split's ``(m, l, acc)`` per head into ``[B, H, num_splits(, DV)]`` float32 buffers."""
    row = (b * H + head.to(tl.int64)) * num_splits + split
    tl.store(pm_ptr + row, m, mask=h_ok)
    tl.store(pl_ptr + row, l, mask=h_ok)
    offs_d = tl.arange(0, DV_P)
    tl.store(pacc_ptr + row[:, None] * DV + offs_d[None, :], acc, mask=h_ok[:, None] & (offs_d < DV)[None, :])


@triton.jit
def _num_compressed(length, CMP_SIZE: tl.constexpr, CMP_STRIDE: tl.constexpr):
    """Compression blocks finished after ``length`` tokens (block ``i`` ends at ``i*d + l - 1``)."""
    return tl.where(length >= CMP_SIZE, (length - CMP_SIZE) // CMP_STRIDE + 1, 0)


@triton.jit
def _store_tile_scores(ps_ptr, ptm_ptr, b, H, head, h_ok, start, num_tiles, p, shift,
                       CMP_SIZE: tl.constexpr, CMP_STRIDE: tl.constexpr, SEL_SIZE: tl.constexpr,
                       BLOCK_N: tl.constexpr, JT: tl.constexpr):
    """The tile of compressed rows ``start ..`` mapped to the ``JT`` selection blocks from
    ``start*d // l'`` through the overlap weights ``|[i*d, i*d+l) ∩ [j*l', (j+1)*l')| / d``
    (``reference.overlap_weights``): ``p [HP, BLOCK_N] = exp2(s - shift)`` -> ``[HP, JT]``, stored
    with ``shift`` so the selection program can rescale by ``exp2(shift - lse)``."""
    rows = start + tl.arange(0, BLOCK_N)
    j = (start * CMP_STRIDE) // SEL_SIZE + tl.arange(0, JT)
    first = rows[:, None] * CMP_STRIDE
    overlap = tl.minimum(first + CMP_SIZE, (j[None, :] + 1) * SEL_SIZE) - tl.maximum(first, j[None, :] * SEL_SIZE)
    weights = tl.maximum(overlap, 0).to(tl.float32) / CMP_STRIDE
    # IEEE float32: near-equal block scores decide the selection.
    part = tl.dot(p, weights, input_precision="ieee")
    row = (b * H + head.to(tl.int64)) * num_tiles + start // BLOCK_N
    tl.store(ptm_ptr + row, shift, mask=h_ok)
    tl.store(ps_ptr + row[:, None] * JT + tl.arange(0, JT)[None, :], part, mask=h_ok[:, None])


@triton.jit
def _range_partial_kernel(
    q_ptr, k_ptr, v_ptr, k_desc, v_desc, len_ptr, pm_ptr, pl_ptr, pacc_ptr, ps_ptr, ptm_ptr,
    stride_kb, stride_kr, stride_vb, stride_vr,
    num_rows, H, heads_per_group, rows_per_split, split_offset, num_splits, num_tiles, qk_scale,
    COMPRESSED: tl.constexpr, CMP_SIZE: tl.constexpr, CMP_STRIDE: tl.constexpr, SEL_SIZE: tl.constexpr,
    JT: tl.constexpr, BLOCK_N: tl.constexpr, HP: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, DK_P: tl.constexpr, DV_P: tl.constexpr, PRECISION: tl.constexpr,
    TMA: tl.constexpr,
):
    """Split ``program_id(0)`` of the rows ``0 .. count-1`` of a ``[B, num_rows, G, d]`` cache:
    ``count`` is the finished compression blocks (``COMPRESSED``, which also stores block-score
    partials) or ``min(lengths, num_rows)`` (a window ring, or a dense cache)."""
    split = tl.program_id(0)
    g = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    length = tl.load(len_ptr + b).to(tl.int32)
    if COMPRESSED:
        count = _num_compressed(length, CMP_SIZE, CMP_STRIDE)
    else:
        count = tl.minimum(length, num_rows)
    q, head, h_ok = _group_queries(q_ptr, b, g, H, heads_per_group, DK, HP, DK_P)
    m = tl.full([HP], float("-inf"), tl.float32)
    l = tl.zeros([HP], tl.float32)
    acc = tl.zeros([HP, DV_P], tl.float32)
    lo = split * rows_per_split
    hi = tl.minimum(lo + rows_per_split, count)
    for start in range(lo, hi, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        ok = rows < hi
        k = _load_rows(k_ptr, k_desc, b, start, rows, ok, g, num_rows, stride_kb, stride_kr, DK, DK_P, TMA)
        v = _load_rows(v_ptr, v_desc, b, start, rows, ok, g, num_rows, stride_vb, stride_vr, DV, DV_P, TMA)
        m, l, acc, p, shift = _online_step(q, k, v, ok, m, l, acc, qk_scale, PRECISION)
        if COMPRESSED:
            _store_tile_scores(ps_ptr, ptm_ptr, b, H, head, h_ok, start, num_tiles, p, shift,
                               CMP_SIZE, CMP_STRIDE, SEL_SIZE, BLOCK_N, JT)
    _store_partial(pm_ptr, pl_ptr, pacc_ptr, b, H, head, h_ok, split_offset + split, num_splits, m, l, acc, DV, DV_P)


@triton.jit
def _select_kernel(
    len_ptr, pm_ptr, pl_ptr, ps_ptr, ptm_ptr, idx_ptr,
    H, heads_per_group, num_cmp_splits, num_splits, num_tiles, num_blocks,
    CMP_SIZE: tl.constexpr, CMP_STRIDE: tl.constexpr, SEL_SIZE: tl.constexpr, NUM_SELECTED: tl.constexpr,
    BLOCK_N: tl.constexpr, JT: tl.constexpr, SPAN: tl.constexpr, CMP_SPLITS_P: tl.constexpr,
    BLOCK_NS: tl.constexpr, BLOCK_SELECTED: tl.constexpr,
):
    """Block scores ``p_grp[j]`` of one (sequence, group) from the compressed pass's partials, then
    its top ``n`` blocks, ascending, ``-1`` padded, into ``idx [B, G, n]``."""
    g = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    length = tl.load(len_ptr + b).to(tl.int32)
    pos = length - 1
    count = _num_compressed(length, CMP_SIZE, CMP_STRIDE)
    offs_j = tl.arange(0, BLOCK_NS)
    # First tile holding a compressed block that overlaps block j (blocks i > (j*l' - l) / d).
    tile_lo = tl.maximum(offs_j * SEL_SIZE - CMP_SIZE + CMP_STRIDE, 0) // CMP_STRIDE // BLOCK_N
    offs_s = tl.arange(0, CMP_SPLITS_P)
    score = tl.zeros([BLOCK_NS], tl.float32)
    for h in range(heads_per_group):
        head = (g * heads_per_group + h).to(tl.int64)
        m = tl.load(pm_ptr + (b * H + head) * num_splits + offs_s, mask=offs_s < num_cmp_splits, other=float("-inf"))
        l = tl.load(pl_ptr + (b * H + head) * num_splits + offs_s, mask=offs_s < num_cmp_splits, other=0.0)
        # lse of the head (log2 units); with no compressed block seen it is unused (every tile masked),
        # and kept finite so that no inf - inf is computed.
        m_max = tl.max(m, 0)
        m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
        total = tl.sum(tl.exp2(m - m_max) * l, 0)
        lse = m_max + tl.log2(tl.where(total > 0.0, total, 1.0))
        for k in tl.static_range(SPAN):  # every tile whose blocks may overlap j (others add 0)
            tile = tile_lo + k
            local = offs_j - tile * BLOCK_N * CMP_STRIDE // SEL_SIZE
            ok = (tile * BLOCK_N < count) & (local >= 0) & (local < JT) & (offs_j < num_blocks)
            row = (b * H + head) * num_tiles + tile
            part = tl.load(ps_ptr + row * JT + local, mask=ok, other=0.0)
            shift = tl.load(ptm_ptr + row, mask=ok, other=0.0)
            score += tl.where(ok, part * tl.exp2(shift - lse), 0.0)
    own = pos // SEL_SIZE
    eligible = (offs_j <= own) & (offs_j < num_blocks)
    forced = (offs_j == 0) | (offs_j == own) | (offs_j == own - 1)
    chosen = top_n_mask(score[None, :], eligible[None, :], forced[None, :], offs_j[None, :], NUM_SELECTED, BLOCK_NS)
    out_row = idx_ptr + (b * tl.num_programs(0) + g) * NUM_SELECTED + tl.zeros([1, 1], tl.int64)
    store_chosen(out_row, chosen, offs_j[None, :], tl.zeros([1], tl.int32) == 0, NUM_SELECTED, 1, BLOCK_NS,
                 BLOCK_SELECTED)


@triton.jit
def _selected_partial_kernel(
    q_ptr, k_ptr, v_ptr, k_desc, v_desc, idx_ptr, len_ptr, pm_ptr, pl_ptr, pacc_ptr,
    stride_kb, stride_kr, stride_vb, stride_vr,
    num_keys, H, heads_per_group, entries_per_split, split_offset, num_splits, qk_scale,
    SEL_SIZE: tl.constexpr, NUM_SELECTED: tl.constexpr, BLOCK_SEL: tl.constexpr, HP: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, DK_P: tl.constexpr, DV_P: tl.constexpr, PRECISION: tl.constexpr,
    TMA: tl.constexpr,
):
    """Split ``program_id(0)`` of a (sequence, group)'s selected blocks: keys ``j*l' ..`` up to the query."""
    split = tl.program_id(0)
    g = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    pos = tl.load(len_ptr + b).to(tl.int32) - 1
    q, head, h_ok = _group_queries(q_ptr, b, g, H, heads_per_group, DK, HP, DK_P)
    m = tl.full([HP], float("-inf"), tl.float32)
    l = tl.zeros([HP], tl.float32)
    acc = tl.zeros([HP, DV_P], tl.float32)
    idx_row = idx_ptr + (b * tl.num_programs(1) + g) * NUM_SELECTED
    offs = tl.arange(0, BLOCK_SEL)
    lo = split * entries_per_split
    for e in range(lo, tl.minimum(lo + entries_per_split, NUM_SELECTED)):
        j = tl.load(idx_row + e)
        rows = j * SEL_SIZE + offs
        # -1 entries (negative rows) and keys after the query; vector masks only (the interpreter
        # mis-types a scalar & vector mask)
        ok = (rows >= 0) & (offs < SEL_SIZE) & (rows <= pos)
        k = _load_rows(k_ptr, k_desc, b, j * SEL_SIZE, rows, ok, g, num_keys, stride_kb, stride_kr, DK, DK_P, TMA)
        v = _load_rows(v_ptr, v_desc, b, j * SEL_SIZE, rows, ok, g, num_keys, stride_vb, stride_vr, DV, DV_P, TMA)
        m, l, acc, _, _ = _online_step(q, k, v, ok, m, l, acc, qk_scale, PRECISION)
    _store_partial(pm_ptr, pl_ptr, pacc_ptr, b, H, head, h_ok, split_offset + split, num_splits, m, l, acc, DV, DV_P)


@triton.jit
def _combine_kernel(
    pm_ptr, pl_ptr, pacc_ptr, gates_ptr, out_ptr, H, num_splits, slc_offset, win_offset,
    GATED: tl.constexpr, DV: tl.constexpr, DV_P: tl.constexpr, CHUNK: tl.constexpr,
):
    """One (sequence, head): each branch's split partials merged, then the gated sum."""
    h = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    row = (b * H + h) * num_splits
    offs_d = tl.arange(0, DV_P)
    out = tl.zeros([DV_P], tl.float32)
    for branch in tl.static_range(3):
        if branch == 0:
            lo, hi = 0, slc_offset
        elif branch == 1:
            lo, hi = slc_offset, win_offset
        else:
            lo, hi = win_offset, num_splits
        m_run = tl.max(tl.full([CHUNK], float("-inf"), tl.float32), 0)
        l_run = tl.sum(tl.zeros([CHUNK], tl.float32), 0)
        o = tl.zeros([DV_P], tl.float32)
        for c0 in range(lo, hi, CHUNK):
            offs_s = c0 + tl.arange(0, CHUNK)
            ok = offs_s < hi
            m = tl.load(pm_ptr + row + offs_s, mask=ok, other=float("-inf"))
            l = tl.load(pl_ptr + row + offs_s, mask=ok, other=0.0)
            acc = tl.load(pacc_ptr + (row + offs_s)[:, None] * DV + offs_d[None, :],
                          mask=ok[:, None] & (offs_d < DV)[None, :], other=0.0)
            m_new = tl.maximum(m_run, tl.max(m, 0))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_run - shift)
            w = tl.exp2(m - shift)
            l_run = l_run * alpha + tl.sum(w * l, 0)
            o = o * alpha + tl.sum(w[:, None] * acc, 0)
            m_run = m_new
        o = o / tl.where(l_run > 0.0, l_run, 1.0)  # a branch that saw nothing gives 0
        if GATED:
            o *= tl.load(gates_ptr + (b * H + h) * 3 + branch).to(tl.float32)
        out += o
    tl.store(out_ptr + (b * H + h) * DV + offs_d, out.to(out_ptr.dtype.element_ty), mask=offs_d < DV)


def _splits(units: int, pairs: int, target: int, forced: int | None = None) -> tuple[int, int]:
    """``(splits, units per split)`` spreading ``units`` (tiles or blocks) of each of ``pairs``
    (sequence, group) pairs so that about ``target`` programs run (``forced``: that many splits)."""
    units = max(units, 1)
    wanted = forced if forced is not None else triton.cdiv(target, pairs)
    per = triton.cdiv(units, max(1, min(units, wanted)))
    return triton.cdiv(units, per), per


def _tile_meta(q: torch.Tensor, v: torch.Tensor, groups: int) -> dict:
    heads_per_group, dk, dv = q.shape[1] // groups, q.shape[2], v.shape[3]
    return dict(HP=max(_MIN_DOT, triton.next_power_of_2(heads_per_group)), DK=dk, DV=dv,
                DK_P=max(_MIN_DOT, triton.next_power_of_2(dk)), DV_P=max(_MIN_DOT, triton.next_power_of_2(dv)),
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def _kv_tiles(k: torch.Tensor, v: torch.Tensor, rows: int) -> tuple[tuple, dict]:
    """TMA descriptors of ``rows``-high boxes of ``k``/``v`` (``nsa_kernels.tma``) and the launch
    arguments, or ``(k, v)`` (unused) where tiles are gathered."""
    if rows <= tma.MAX_BOX and rows == triton.next_power_of_2(rows) and tma.applies(k, v):
        return (tma.row_tiles(k, rows), tma.row_tiles(v, rows)), dict(TMA=True, **LAUNCH)
    return (k, v), dict(TMA=False, **LAUNCH)


def _check_cache(name: str, t: torch.Tensor, batch: int) -> None:
    if t.dim() != 4 or t.shape[0] < batch or t.stride(3) != 1 or t.stride(2) != t.shape[3]:
        raise ValueError(f"{name} must be [>= {batch}, rows, G, d] with its last two dims contiguous, "
                         f"got shape {tuple(t.shape)} strides {t.stride()}")


def nsa_decode(
    q: torch.Tensor, gates: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, k_slc: torch.Tensor,
    v_slc: torch.Tensor, k_win: torch.Tensor, v_win: torch.Tensor, lengths: torch.Tensor, *,
    compress_block_size: int, compress_stride: int, select_block_size: int, num_selected: int, scale: float,
    splits: tuple[int, int, int] | None = None, return_blocks: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """NSA output ``[B, H, dv]`` (q's dtype) of ``q [B, H, dk]`` (rotated), ``gates [B, H, 3]``.

    Caches ``[>= B, rows, G, d]``: ``k_cmp``/``v_cmp`` compressed tokens, ``k_slc``/``v_slc`` every
    token (``S`` rows: ``ceil(S / l')`` selection blocks), ``k_win``/``v_win`` the window ring;
    ``lengths [>= B]`` tokens per sequence, the query's included. ``splits`` forces the number of
    compressed, selected and window splits (tests); ``return_blocks`` also returns the chosen
    blocks ``int32 [B, G, n]``.
    """
    batch, num_heads, _ = q.shape
    for name, t in (("k_cmp", k_cmp), ("v_cmp", v_cmp), ("k_slc", k_slc), ("v_slc", v_slc), ("k_win", k_win),
                    ("v_win", v_win)):
        _check_cache(name, t, batch)
    groups = k_slc.shape[2]
    l, d, ls, n = compress_block_size, compress_stride, select_block_size, num_selected
    num_cmp, seq_cap, window = k_cmp.shape[1], k_slc.shape[1], k_win.shape[1]
    q, gates, lengths = q.contiguous(), gates.contiguous(), lengths.contiguous()
    target, pairs = target_programs(q.device), batch * groups
    n_cmp, cmp_per = _splits(triton.cdiv(num_cmp, BLOCK_N), pairs, target, splits and splits[0])
    n_slc, slc_per = _splits(n, pairs, target, splits and splits[1])
    n_win, win_per = _splits(triton.cdiv(window, BLOCK_N), pairs, target, splits and splits[2])
    total = n_cmp + n_slc + n_win
    f32 = dict(device=q.device, dtype=torch.float32)
    pm, pl = torch.empty(batch, num_heads, total, **f32), torch.empty(batch, num_heads, total, **f32)
    pacc = torch.empty(batch, num_heads, total, v_slc.shape[3], **f32)
    num_tiles = max(1, triton.cdiv(num_cmp, BLOCK_N))
    # Blocks a tile of BLOCK_N compressed rows overlaps, plus one for alignment.
    jt = max(_MIN_DOT, triton.next_power_of_2(((BLOCK_N - 1) * d + l - 1) // ls + 2))
    ps, ptm = torch.empty(batch, num_heads, num_tiles, jt, **f32), torch.empty(batch, num_heads, num_tiles, **f32)
    meta = _tile_meta(q, v_slc, groups)
    qk_scale = scale * LOG2E
    common = (num_heads, num_heads // groups)
    sizes = dict(CMP_SIZE=l, CMP_STRIDE=d, SEL_SIZE=ls)
    if not num_cmp:  # nothing is read (no block ever finishes), but the pointers must be valid
        k_cmp, v_cmp = k_slc, v_slc

    descs, launch = _kv_tiles(k_cmp, v_cmp, BLOCK_N)
    _range_partial_kernel[(n_cmp, groups, batch)](
        q, k_cmp, v_cmp, *descs, lengths, pm, pl, pacc, ps, ptm,
        k_cmp.stride(0), k_cmp.stride(1), v_cmp.stride(0), v_cmp.stride(1),
        num_cmp, *common, cmp_per * BLOCK_N, 0, total, num_tiles, qk_scale,
        COMPRESSED=True, **sizes, JT=jt, BLOCK_N=BLOCK_N, **meta, **launch)
    blocks = torch.empty(batch, groups, n, dtype=torch.int32, device=q.device)
    num_blocks = triton.cdiv(seq_cap, ls)
    span = ((ls + l - 2) // d + 1) // BLOCK_N + 2  # tiles a block's overlapping compressed rows span
    block_ns = max(_MIN_DOT, triton.next_power_of_2(num_blocks))
    _select_kernel[(groups, batch)](
        lengths, pm, pl, ps, ptm, blocks, *common, n_cmp, total, num_tiles, num_blocks,
        **sizes, NUM_SELECTED=n, BLOCK_N=BLOCK_N, JT=jt, SPAN=span,
        CMP_SPLITS_P=triton.next_power_of_2(n_cmp), BLOCK_NS=block_ns, BLOCK_SELECTED=triton.next_power_of_2(n),
        num_warps=4 if block_ns <= 1024 else 8)  # int64 keys of a whole row: 255 registers at 4 warps for 2048
    block_sel = max(_MIN_DOT, triton.next_power_of_2(ls))
    descs, launch = _kv_tiles(k_slc, v_slc, ls) if block_sel == ls else ((k_slc, v_slc), dict(TMA=False, **LAUNCH))
    _selected_partial_kernel[(n_slc, groups, batch)](
        q, k_slc, v_slc, *descs, blocks, lengths, pm, pl, pacc,
        k_slc.stride(0), k_slc.stride(1), v_slc.stride(0), v_slc.stride(1),
        seq_cap, *common, slc_per, n_cmp, total, qk_scale,
        SEL_SIZE=ls, NUM_SELECTED=n, BLOCK_SEL=block_sel, **meta, **launch)
    descs, launch = _kv_tiles(k_win, v_win, BLOCK_N)
    _range_partial_kernel[(n_win, groups, batch)](
        q, k_win, v_win, *descs, lengths, pm, pl, pacc, ps, ptm,
        k_win.stride(0), k_win.stride(1), v_win.stride(0), v_win.stride(1),
        window, *common, win_per * BLOCK_N, n_cmp + n_slc, total, num_tiles, qk_scale,
        COMPRESSED=False, **sizes, JT=jt, BLOCK_N=BLOCK_N, **meta, **launch)
    out = torch.empty(batch, num_heads, v_slc.shape[3], dtype=q.dtype, device=q.device)
    _combine_kernel[(num_heads, batch)](
        pm, pl, pacc, gates, out, num_heads, total, n_cmp, n_cmp + n_slc,
        GATED=True, DV=meta["DV"], DV_P=meta["DV_P"], CHUNK=COMBINE_CHUNK)
    return (out, blocks) if return_blocks else out


def dense_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, *, scale: float,
                 splits: int | None = None) -> torch.Tensor:
    """Causal attention of ``q [B, H, dk]`` over rows ``0 .. lengths[b]-1`` of a dense cache
    ``[>= B, S, G, d]``: the window pass and the combine alone, a split-K (flash-decoding style)
    dense decode with the same machinery as NSA's, for like-for-like timing."""
    batch, num_heads, _ = q.shape
    _check_cache("k", k, batch)
    _check_cache("v", v, batch)
    groups = k.shape[2]
    q, lengths = q.contiguous(), lengths.contiguous()
    num_splits, per = _splits(triton.cdiv(k.shape[1], BLOCK_N), batch * groups, target_programs(q.device), splits)
    f32 = dict(device=q.device, dtype=torch.float32)
    pm, pl = torch.empty(batch, num_heads, num_splits, **f32), torch.empty(batch, num_heads, num_splits, **f32)
    pacc = torch.empty(batch, num_heads, num_splits, v.shape[3], **f32)
    meta = _tile_meta(q, v, groups)
    descs, launch = _kv_tiles(k, v, BLOCK_N)
    _range_partial_kernel[(num_splits, groups, batch)](
        q, k, v, *descs, lengths, pm, pl, pacc, pm, pm, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k.shape[1], num_heads, num_heads // groups, per * BLOCK_N, 0, num_splits, 1, scale * LOG2E,
        COMPRESSED=False, CMP_SIZE=1, CMP_STRIDE=1, SEL_SIZE=1, JT=_MIN_DOT, BLOCK_N=BLOCK_N, **meta, **launch)
    out = torch.empty(batch, num_heads, v.shape[3], dtype=q.dtype, device=q.device)
    _combine_kernel[(num_heads, batch)](pm, pl, pacc, pm, out, num_heads, num_splits, 0, 0,
                                        GATED=False, DV=meta["DV"], DV_P=meta["DV_P"], CHUNK=COMBINE_CHUNK)
    return out
