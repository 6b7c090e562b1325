"""Selection-branch attention of NSA: each query attends to the key blocks its GQA group selected.

Query ``t`` of head ``h`` (KV group ``g = h // (H/G)``) attends, with
``softmax(scale * q k^T)``, to the keys ``s <= t`` whose block ``s // l'`` is
listed in ``block_indices[b, t, g]`` (``-1`` entries unused, order free).
Semantics: ``nsa_parallel.reference.selection_attention``.

Why it is shaped so (design brief, section 2):

- Forward, group-centric. A program owns one query position and one GQA group:
  every head of the group shares the selection, so the program loads the
  group's queries ``[H/G, dk]`` once, walks the ``n`` selected blocks and loads
  each K/V block ``[l', d]`` once for all of those heads (online softmax in
  float32, ``exp2``). K/V traffic, the real cost, is one load per selected
  block. ``tl.dot`` needs at least 16 rows on Hopper, so when ``H/G < 16`` the
  head rows are padded to 16 with masked (zero) queries: it wastes tensor-core
  rows, not memory traffic. Groups wider than 32 heads are split over a grid
  axis. Position is grid axis 0 so that neighbouring queries, which share most
  blocks, run together and hit L2. The loop over the ``n`` entries has no
  branch (unused entries are masked loads), so the compiler can pipeline it.
- Backward, dQ: query-outer like the forward; the same program also computes
  ``delta = rowsum(dO * O)`` and stores it for the dK/dV pass.
- Backward, dK/dV: block-outer through a reverse index built once per call
  with torch ops (stable sort, ``searchsorted``; no host sync): for every
  ``(b, g, block j)`` the ascending list of queries that selected it. Lists
  are cut into chunks of at most ``BACKWARD_CHUNK_ROWS`` (query, head) rows so
  that block 0 (selected by every query) is spread over many programs. A
  program loads ``K_j, V_j`` once, then walks its chunk ``ROWS`` (query, head)
  pairs at a time, gathering their Q / dO rows, ``lse`` and ``delta``; the
  rows of one step mix queries and heads, so even ``H/G = 1`` fills the
  16-row minimum of ``tl.dot``. Partial dK/dV live in float32 registers and
  are combined by one float32 ``atomic_add`` per element per chunk into
  float32 buffers (cast to the input dtype at the end). The summation order
  of the few chunks of a block is therefore not deterministic; per-(query,
  block) atomics are avoided. With wide heads (``dk`` or ``dv`` 192, padded to
  256) a block's keys are split over two programs so dK/dV fit in registers.

K/V tiles of the query-outer kernels (forward, dQ) arrive by TMA on sm_90+ when the inputs are
16-bit and dk, dv powers of two: a block is ``l'`` rows of the ``[B*S, G*d]`` view, one bulk copy
issued by the copy engine, so warps do no address math and the pipeliner overlaps the next block's
copy with this block's dots (H200, 64k, d=128: forward 17.2 -> 13.7 ms). The copy reads the whole
block, including keys after the query inside its own block; those are masked in the scores (real
keys of the same tensor: finite). Otherwise (float32, dk = 192, older GPUs) the tiles are masked
gathers.

Tiles were chosen so the sm_90 build (16-bit inputs, d <= 128) does not spill
registers; warps and stages come from ``benchmarks/tune_selection.py`` (H200). float32 inputs use IEEE
dots (no tensor cores): a correctness path, not a fast one. Offsets are int64
so long sequences do not overflow.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tma

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)

# Most (query, head) rows one dK/dV program handles. Long lists (block 0) are
# split into chunks of this size; tests lower it to exercise the split.
BACKWARD_CHUNK_ROWS = 4096

# Launch settings for sm_90 with 16-bit inputs, from benchmarks/tune_selection.py (H200,
# T=64k, 16 heads per group, d=128): 4 warps beat 8 by 30% forward, 10% dQ, 25% dK/dV.
FWD_LAUNCH = {"num_warps": 4, "num_stages": 2}
DQ_LAUNCH = {"num_warps": 4, "num_stages": 2}
# With TMA tiles (same sweep): 2 warps beat 4 forward (13.9 vs 14.7 ms) and in dQ (backward
# 28.5 vs 30.8 ms); 3+ stages do not pay.
FWD_LAUNCH_TMA = {"num_warps": 2, "num_stages": 2}
DQ_LAUNCH_TMA = {"num_warps": 2, "num_stages": 2}
DKDV_LAUNCH = {"num_warps": 4, "num_stages": 2}
DKDV_ROWS = 64  # gathered (query, head) rows per dK/dV step; halved for wide heads and float32


@triton.jit
def _kv_tile(ptr, desc, b, S, G, g, j, kpos, kv_ok, offs_d, D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
             TMA: tl.constexpr):
    """Block ``j``'s K or V tile ``[l', d]`` of group ``g``: one TMA copy, or a masked gather."""
    if TMA:
        # Unused entries (j = -1) copy block 0; the caller masks them out.
        return desc.load([(b * S + tl.maximum(j, 0) * BLOCK_SIZE).to(tl.int32), g * D])
    else:
        kv_row = (b * S + kpos) * G + g
        return tl.load(ptr + kv_row[:, None] * D + offs_d[None, :],
                       mask=kv_ok[:, None] & (offs_d < D)[None, :], other=0.0)


@triton.jit
def _program_rows(T, H, heads_per_group, head_chunks, BLOCK_H: tl.constexpr):
    """This query-outer program's position ``t``, group ``g``, batch ``b`` and its head rows:
    ``h_ok`` (real heads), ``head`` (global head ids) and ``row`` (flat ``[B, T, H]`` rows)."""
    t = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1) // head_chunks
    b = tl.program_id(2).to(tl.int64)
    h = (tl.program_id(1) % head_chunks) * BLOCK_H + tl.arange(0, BLOCK_H)
    head = g * heads_per_group + h
    return t, g, b, h < heads_per_group, head, (b * T + t) * H + head


@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr, k_desc, v_desc, idx_ptr, o_ptr, lse_ptr,
    T, S, query_offset, H, G, heads_per_group, head_chunks, num_selected, scale,
    BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, DK_P: tl.constexpr, DV_P: tl.constexpr,
    PRECISION: tl.constexpr, TMA: tl.constexpr,
):
    t, g, b, h_ok, head, row = _program_rows(T, H, heads_per_group, head_chunks, BLOCK_H)
    offs_dk = tl.arange(0, DK_P)
    offs_dv = tl.arange(0, DV_P)
    q = tl.load(q_ptr + row[:, None] * DK + offs_dk[None, :],
                mask=h_ok[:, None] & (offs_dk < DK)[None, :], other=0.0)

    qk_scale = scale * LOG2E  # scores in log2 units: exp2 instead of exp
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)  # running max, log2 units
    l = tl.full([BLOCK_H], 0.0, tl.float32)
    acc = tl.full([BLOCK_H, DV_P], 0.0, tl.float32)
    idx_row = idx_ptr + ((b * T + t) * G + g) * num_selected
    pos = t + query_offset  # the query's position among the S keys
    for i in range(num_selected):
        j = tl.load(idx_row + i).to(tl.int64)
        # Unused (-1: negative positions) and future blocks become fully masked
        # steps; kpos <= pos is also the causal mask inside the own block, and pos < S.
        kpos = j * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        kv_ok = (kpos >= 0) & (kpos <= pos)
        k = _kv_tile(k_ptr, k_desc, b, S, G, g, j, kpos, kv_ok, offs_dk, DK, BLOCK_SIZE, TMA)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(kv_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        # Rows that have seen nothing yet keep m = -inf; shift by 0 there so no inf - inf.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - shift)
        p = tl.exp2(s - shift[:, None])
        l = l * alpha + tl.sum(p, 1)
        v = _kv_tile(v_ptr, v_desc, b, S, G, g, j, kpos, kv_ok, offs_dv, DV, BLOCK_SIZE, TMA)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new

    seen = l > 0.0
    o = acc / tl.where(seen, l, 1.0)[:, None]  # rows that see nothing give 0
    tl.store(o_ptr + row[:, None] * DV + offs_dv[None, :], o.to(o_ptr.dtype.element_ty),
             mask=h_ok[:, None] & (offs_dv < DV)[None, :])
    lse = tl.where(seen, (m + tl.log2(tl.where(seen, l, 1.0))) * LN2, float("-inf"))
    tl.store(lse_ptr + (b * H + head) * T + t, lse, mask=h_ok)


@triton.jit
def _bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, k_desc, v_desc, idx_ptr, o_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    T, S, query_offset, H, G, heads_per_group, head_chunks, num_selected, scale,
    BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, DK_P: tl.constexpr, DV_P: tl.constexpr,
    PRECISION: tl.constexpr, TMA: tl.constexpr,
):
    t, g, b, h_ok, head, row = _program_rows(T, H, heads_per_group, head_chunks, BLOCK_H)
    offs_dk = tl.arange(0, DK_P)
    offs_dv = tl.arange(0, DV_P)
    q_mask = h_ok[:, None] & (offs_dk < DK)[None, :]
    v_mask = h_ok[:, None] & (offs_dv < DV)[None, :]
    q = tl.load(q_ptr + row[:, None] * DK + offs_dk[None, :], mask=q_mask, other=0.0)
    do = tl.load(do_ptr + row[:, None] * DV + offs_dv[None, :], mask=v_mask, other=0.0)
    o = tl.load(o_ptr + row[:, None] * DV + offs_dv[None, :], mask=v_mask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(delta_ptr + (b * H + head) * T + t, delta, mask=h_ok)
    lse2 = tl.load(lse_ptr + (b * H + head) * T + t, mask=h_ok, other=0.0) * LOG2E

    qk_scale = scale * LOG2E
    dq = tl.full([BLOCK_H, DK_P], 0.0, tl.float32)
    idx_row = idx_ptr + ((b * T + t) * G + g) * num_selected
    pos = t + query_offset
    for i in range(num_selected):
        j = tl.load(idx_row + i).to(tl.int64)
        kpos = j * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        kv_ok = (kpos >= 0) & (kpos <= pos)
        k = _kv_tile(k_ptr, k_desc, b, S, G, g, j, kpos, kv_ok, offs_dk, DK, BLOCK_SIZE, TMA)
        v = _kv_tile(v_ptr, v_desc, b, S, G, g, j, kpos, kv_ok, offs_dv, DV, BLOCK_SIZE, TMA)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        # A row with nothing visible has lse = -inf but never an unmasked key here.
        p = tl.where(kv_ok[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)

    tl.store(dq_ptr + row[:, None] * DK + offs_dk[None, :], (dq * scale).to(dq_ptr.dtype.element_ty),
             mask=q_mask)


@triton.jit
def _chunk_positions(query_ptr, start, end, r0, offs_r, heads_per_group, query_offset, HPG_P: tl.constexpr):
    """Query positions of the flat rows ``r0 + offs_r`` of a dK/dV chunk (``query_offset`` where masked)."""
    r = r0 + offs_r
    qi = start + r // HPG_P
    r_ok = (qi < end) & (r % HPG_P < heads_per_group)
    return tl.load(query_ptr + qi, mask=r_ok, other=query_offset).to(tl.int64)


@triton.jit
def _bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, query_ptr, chunk_ptr, dk_ptr, dv_ptr,
    T, S, query_offset, H, G, heads_per_group, num_blocks, scale,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HPG_P: tl.constexpr, ROWS: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, DK_P: tl.constexpr, DV_P: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # chunk table row: (segment = (b*G + g)*num_blocks + j, start, end) into query_ptr.
    chunk = chunk_ptr + tl.program_id(0) * 3
    start = tl.load(chunk + 1)
    end = tl.load(chunk + 2)
    if start >= end:  # the grid is an upper bound on the number of chunks
        return
    segment = tl.load(chunk)
    b = (segment // (G * num_blocks)).to(tl.int64)
    g = (segment // num_blocks) % G
    j = (segment % num_blocks).to(tl.int64)

    offs_dk = tl.arange(0, DK_P)
    offs_dv = tl.arange(0, DV_P)
    # Wide heads split the block's keys over grid axis 1 (BLOCK_N < BLOCK_SIZE) to fit registers.
    kpos = j * BLOCK_SIZE + tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = kpos < S  # the last block may be partial
    kv_row = (b * S + kpos) * G + g
    dk_mask = k_ok[:, None] & (offs_dk < DK)[None, :]
    dv_mask = k_ok[:, None] & (offs_dv < DV)[None, :]
    k = tl.load(k_ptr + kv_row[:, None] * DK + offs_dk[None, :], mask=dk_mask, other=0.0)
    v = tl.load(v_ptr + kv_row[:, None] * DV + offs_dv[None, :], mask=dv_mask, other=0.0)

    dk = tl.full([BLOCK_N, DK_P], 0.0, tl.float32)
    dv = tl.full([BLOCK_N, DV_P], 0.0, tl.float32)
    qk_scale = scale * LOG2E
    offs_r = tl.arange(0, ROWS)
    # The lists hold query positions pos = query_offset + t; the offset is folded into the
    # row bases (scalars, outside the loop) so that t = pos - query_offset costs nothing per row.
    b_t = b * T - query_offset
    stat_lse = lse_ptr - query_offset
    stat_delta = delta_ptr - query_offset
    # Flat (query of the chunk, head of the group) rows, ROWS at a time. Each step's query
    # positions are loaded one step ahead (a small int vector), so its Q/dO gathers do not
    # wait on a dependent global load.
    pos_next = _chunk_positions(query_ptr, start, end, 0, offs_r, heads_per_group, query_offset, HPG_P)
    for r0 in range(0, (end - start) * HPG_P, ROWS):
        r = r0 + offs_r
        qi = start + r // HPG_P
        h = r % HPG_P
        r_ok = (qi < end) & (h < heads_per_group)
        pos = pos_next
        pos_next = _chunk_positions(query_ptr, start, end, r0 + ROWS, offs_r, heads_per_group, query_offset, HPG_P)
        head = g * heads_per_group + h
        row = (b_t + pos) * H + head
        q = tl.load(q_ptr + row[:, None] * DK + offs_dk[None, :],
                    mask=r_ok[:, None] & (offs_dk < DK)[None, :], other=0.0)
        do = tl.load(do_ptr + row[:, None] * DV + offs_dv[None, :],
                     mask=r_ok[:, None] & (offs_dv < DV)[None, :], other=0.0)
        stat = (b * H + head) * T + pos
        lse2 = tl.load(stat_lse + stat, mask=r_ok, other=0.0) * LOG2E
        delta = tl.load(stat_delta + stat, mask=r_ok, other=0.0)

        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        visible = r_ok[:, None] & (kpos[None, :] <= pos[:, None])
        p = tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)

    tl.atomic_add(dk_ptr + kv_row[:, None] * DK + offs_dk[None, :], dk * scale, mask=dk_mask, sem="relaxed")
    tl.atomic_add(dv_ptr + kv_row[:, None] * DV + offs_dv[None, :], dv, mask=dv_mask, sem="relaxed")


def _pow2(x: int, minimum: int = 16) -> int:
    return max(minimum, triton.next_power_of_2(x))


def _kv_descriptors(k: torch.Tensor, v: torch.Tensor, block_size: int) -> tuple | None:
    """TMA descriptors of K and V with one selected block per copy, or None where TMA does not
    apply (``nsa_kernels.tma``)."""
    if block_size > tma.MAX_BOX or not tma.applies(k, v):
        return None
    return tma.row_tiles(k, block_size), tma.row_tiles(v, block_size)


def _reverse_index(
    block_indices: torch.Tensor, block_size: int, chunk_queries: int, query_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries per selected block, cut into chunks.

    Query ``t`` sits at position ``query_offset + t``, among ``query_offset + T`` keys
    in ``ceil((query_offset + T) / block_size)`` blocks. Returns ``queries`` (int32:
    for each segment ``(b, g, j)`` in turn, the ascending positions ``query_offset + t``
    of the queries that selected block ``j``) and the chunk table (int32
    ``[max_chunks, 3]``: segment, start, end into ``queries``). ``max_chunks``
    is an upper bound known from shapes alone, so nothing waits on the device;
    surplus rows are empty (``start == end``).
    """
    batch, seq_len, groups, n = block_indices.shape
    num_blocks = triton.cdiv(query_offset + seq_len, block_size)
    num_segments = batch * groups * num_blocks
    device = block_indices.device

    j = block_indices.permute(0, 2, 1, 3).long()  # [B, G, T, n]: flat order is (b, g, t)
    t = torch.arange(seq_len, device=device).view(1, 1, seq_len, 1)
    used = (j >= 0) & (j * block_size <= t + query_offset)
    segment = torch.arange(batch * groups, device=device).view(batch, groups, 1, 1) * num_blocks + j
    key = torch.where(used, segment, num_segments).flatten()
    key, order = torch.sort(key, stable=True)  # stable: each list stays in ascending t
    queries = ((order // n) % seq_len + query_offset).to(torch.int32)

    seg_ids = torch.arange(num_segments, device=device)
    seg_start = torch.searchsorted(key, seg_ids)
    seg_end = torch.searchsorted(key, seg_ids, right=True)
    seg_chunks = (seg_end - seg_start + chunk_queries - 1) // chunk_queries
    chunk_stop = torch.cumsum(seg_chunks, 0)

    # sum(ceil(len / c)) <= total / c + num_segments
    chunk_ids = torch.arange(key.numel() // chunk_queries + num_segments, device=device)
    owner = torch.searchsorted(chunk_stop, chunk_ids, right=True)
    real = owner < num_segments
    owner = owner.clamp(max=num_segments - 1)
    start = seg_start[owner] + (chunk_ids - chunk_stop[owner] + seg_chunks[owner]) * chunk_queries
    end = torch.minimum(start + chunk_queries, seg_end[owner])
    table = torch.stack([owner, torch.where(real, start, 0), torch.where(real, end, 0)], dim=1)
    return queries, table.to(torch.int32).contiguous()


def _group_tiles(heads_per_group: int) -> tuple[int, int]:
    """Head rows per forward/dQ program (>= 16 for tl.dot; <= 32 keeps the sm_90 build spill-free
    at d = 128) and the number of head chunks a wider group is split into."""
    block_h = min(_pow2(heads_per_group), 32)
    return block_h, triton.cdiv(heads_per_group, block_h)


def _dkdv_keys_per_program(block_size: int, dk_p: int, dv_p: int) -> int:
    """Keys of a block per dK/dV program: float32 dK, dV [keys, d] must fit in registers (8 warps,
    32 gathered rows a step; sm_90 build). Wide heads (192 -> 256) take half a 64-key block, at the
    price of gathering Q / dO twice."""
    return block_size if dk_p + dv_p <= 256 else min(block_size, 32)


class _SelectionAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, block_indices, block_size: int, scale: float, query_offset: int):
        batch, seq_len, num_heads, dk = q.shape
        groups, dv, n = k.shape[2], v.shape[3], block_indices.shape[3]
        num_keys = k.shape[1]
        hpg = num_heads // groups
        block_h, head_chunks = _group_tiles(hpg)
        precision = "ieee" if q.dtype == torch.float32 else "tf32"

        o = torch.empty(batch, seq_len, num_heads, dv, device=q.device, dtype=q.dtype)
        lse = torch.empty(batch, num_heads, seq_len, device=q.device, dtype=torch.float32)
        descs = _kv_descriptors(k, v, block_size)
        _fwd_kernel[(seq_len, groups * head_chunks, batch)](
            q, k, v, *(descs or (k, v)), block_indices, o, lse,
            seq_len, num_keys, query_offset, num_heads, groups, hpg, head_chunks, n, scale,
            BLOCK_SIZE=block_size, BLOCK_H=block_h,
            DK=dk, DV=dv, DK_P=_pow2(dk), DV_P=_pow2(dv), PRECISION=precision, TMA=descs is not None,
            **(FWD_LAUNCH_TMA if descs else FWD_LAUNCH),
        )
        ctx.save_for_backward(q, k, v, block_indices, o, lse)
        ctx.block_size, ctx.scale, ctx.query_offset = block_size, scale, query_offset
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, block_indices, o, lse = ctx.saved_tensors
        block_size, scale, query_offset = ctx.block_size, ctx.scale, ctx.query_offset
        do = do.contiguous()
        batch, seq_len, num_heads, dk = q.shape
        groups, dv, n = k.shape[2], v.shape[3], block_indices.shape[3]
        num_keys = k.shape[1]
        hpg = num_heads // groups
        block_h, head_chunks = _group_tiles(hpg)
        dk_p, dv_p = _pow2(dk), _pow2(dv)
        precision = "ieee" if q.dtype == torch.float32 else "tf32"

        dq = torch.empty_like(q)
        delta = torch.empty_like(lse)
        descs = _kv_descriptors(k, v, block_size)
        _bwd_dq_kernel[(seq_len, groups * head_chunks, batch)](
            q, k, v, *(descs or (k, v)), block_indices, o, do, lse, delta, dq,
            seq_len, num_keys, query_offset, num_heads, groups, hpg, head_chunks, n, scale,
            BLOCK_SIZE=block_size, BLOCK_H=block_h,
            DK=dk, DV=dv, DK_P=dk_p, DV_P=dv_p, PRECISION=precision, TMA=descs is not None,
            **(DQ_LAUNCH_TMA if descs else DQ_LAUNCH),
        )

        hpg_p = triton.next_power_of_2(hpg)
        queries, table = _reverse_index(
            block_indices, block_size, max(1, BACKWARD_CHUNK_ROWS // hpg_p), query_offset)
        dk_acc = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
        dv_acc = torch.zeros(v.shape, device=v.device, dtype=torch.float32)
        block_n = _dkdv_keys_per_program(block_size, dk_p, dv_p)
        _bwd_dkdv_kernel[(table.shape[0], block_size // block_n)](
            q, k, v, do, lse, delta, queries, table, dk_acc, dv_acc,
            seq_len, num_keys, query_offset, num_heads, groups, hpg, triton.cdiv(num_keys, block_size), scale,
            BLOCK_SIZE=block_size, BLOCK_N=block_n, HPG_P=hpg_p, ROWS=DKDV_ROWS if dk_p + dv_p <= 256 and q.element_size() == 2 else DKDV_ROWS // 2,
            DK=dk, DV=dv, DK_P=dk_p, DV_P=dv_p, PRECISION=precision,
            **DKDV_LAUNCH,
        )
        return dq, dk_acc.to(k.dtype), dv_acc.to(v.dtype), None, None, None, None


def selection_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_indices: torch.Tensor,
    *,
    select_block_size: int,
    scale: float,
    query_offset: int = 0,
) -> torch.Tensor:
    """NSA selection branch: ``o [B, T, H, dv]`` in ``q``'s dtype, differentiable in q, k, v.

    ``q [B, T, H, dk]``, ``k [B, S, G, dk]``, ``v [B, S, G, dv]`` with
    ``S = query_offset + T`` (keys at positions ``0 .. S-1``, query ``t`` at
    ``query_offset + t``: a shard of a longer sequence), ``block_indices [B, T, G, n]``
    (int ids of blocks of ``k``; ``-1`` unused, distinct ids in any order). Query
    ``t`` sees keys ``s <= query_offset + t`` with ``s // select_block_size`` in its
    group's list; a row that sees nothing gives 0. Blocks no query selected get
    zero dK/dV.
    """
    batch, seq_len, num_heads, dk = q.shape
    groups = k.shape[2]
    if num_heads % groups:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of KV heads ({groups})")
    if query_offset < 0:
        raise ValueError(f"query_offset ({query_offset}) must be >= 0")
    num_keys = query_offset + seq_len
    if k.shape != (batch, num_keys, groups, dk) or v.shape[:3] != (batch, num_keys, groups):
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)} "
                         f"and query_offset {query_offset}")
    if block_indices.shape[:3] != (batch, seq_len, groups):
        raise ValueError(f"block_indices {tuple(block_indices.shape)} does not match [B, T, G, n]")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError("q, k and v must share one dtype")
    return _SelectionAttention.apply(
        q.contiguous(), k.contiguous(), v.contiguous(),
        block_indices.to(torch.int32).contiguous(), int(select_block_size), float(scale), int(query_offset),
    )
