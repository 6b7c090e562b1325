"""Top-n selection blocks per query and KV group, from the compression branch's probabilities.

Semantics: ``nsa_parallel.reference.select_blocks`` given the compression branch's
``lse``. Two kernels, because a row's top-n needs all of its ``Ns`` scores while
the scores are produced one selection-block tile at a time:

1. ``_group_scores_kernel``, one program per (query tile, KV group, batch), shaped
   like a flash-attention forward: the rows of its q.k dot are ``BLOCK_T`` positions
   x all heads of the group (256 rows for 16 heads), so q is loaded once and stays
   (in shared memory on the GPU) while the compressed keys stream past it; reloading
   q for every key tile and head made the L2 traffic the bottleneck. It walks the
   selection blocks in tiles of ``BLOCK_J``, up to the last one its last position
   sees; a tile's *own* compressed blocks are those starting inside it, so each is
   scored exactly once. Per tile: ``p = exp2(q.k * scale*log2e - lse*log2e)``,
   causally masked only on tiles that cross the diagonal, summed over heads by a
   reshape (rows ordered so that sum stays mostly inside threads, see
   ``_row_digits``). Then the overlap mapping, in segments of ``d`` tokens: a
   compressed block covers ``l/d`` of them, a selection block ``l'/d``, so the block
   starting at segment ``m`` of selection block ``j`` gives block ``j + k`` the
   small integer weight ``c_k[m]``: weighted sums over ``m`` and a shift by ``k``
   (a gather), float32 and exact but for the sums' rounding, since near-equal
   scores decide the selection. What passes the tile's end is carried in registers
   into the next tile: each score is stored once, with no read-modify-write and no
   atomics, so results are bit-reproducible. On the GPU two programs share an SM,
   one's q.k dot running under the other's exponentials.
2. ``_top_n_kernel``, one program per (rows, KV group, batch): a row of scores,
   ineligible blocks at ``-inf``; forced blocks are taken first, then rounds of max
   fill the ``n`` slots. Score bits and the reversed block id form one int64 key, so
   a round is a single max and the lowest id wins ties (the reference's stable
   descending sort). Chosen ids are written ascending via a cumulative sum of the
   chosen mask, the rest of the row padded with ``-1``. Rows are launched in runs by
   causal width (rows that see at most 16, 32, 64, ... blocks), so early rows do not
   pay for the whole ``Ns``.

The float32 score buffer ``[B, G, T_chunk, Ns]`` is bounded by processing the
queries in chunks (``SCORE_BUFFER_BYTES``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Upper bound on the float32 score buffer; queries are processed in chunks under it.
SCORE_BUFFER_BYTES = 512 * 2**20

_MAX_DOT_ROWS = 256  # (position, head) rows per scoring program: the q.k dot's M
_MAX_LOGITS = 256 * 64  # float32 [rows, BLOCK_I] logits: 64 registers a thread at 8 warps
_MAX_Q_TILE_BYTES = 64 * 2**10  # the stationary 16-bit q tile, in shared memory for the tensor cores
_MAX_Q_TILE_BYTES_FP32 = 8 * 2**10  # float32 (IEEE) dots run on the FMA units, q in registers
_BLOCK_J = 16  # selection blocks per scoring tile: 64 keys a tile at l'/d = 4
_MIN_DOT_SIZE = 16  # Hopper's smallest tl.dot M, N and K
# Top-n programs: at most this many rows and (row, block) entries, one warp per 1024 entries.
# benchmarks/tune_top_n.py (H200, T=64k): 1024 entries, 1-32 rows: 1.67 ms; 4096: 1.9-2.1 ms.
TOP_N_ROWS = 8
TOP_N_ELEMENTS = 1024
_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _score_tile(
    q, lse, p_rows, k_base, stride_kt, s_rows, store_t, j0, num_cmp, num_blocks, qk_scale, carry, d_valid,
    CMP_SIZE: tl.constexpr,
    CMP_STRIDE: tl.constexpr,
    SEL_SIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_J: tl.constexpr,
    R_PAD: tl.constexpr,
    H0: tl.constexpr,
    H1: tl.constexpr,
    H2: tl.constexpr,
    T1: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Stores the scores of selection blocks ``j0 .. j0+BLOCK_J-1`` and returns the carry
    into the next tile. ``p_rows`` are the rows' positions. ``CAUSAL=False`` only for tiles
    every row sees whole."""
    # In units of d: a compressed block spans L segments, a selection block R.
    L: tl.constexpr = CMP_SIZE // CMP_STRIDE
    R: tl.constexpr = SEL_SIZE // CMP_STRIDE
    # Column a holds the compressed block starting at segment m = a % R_PAD of the tile's
    # block a // R_PAD (padding where m >= R): the tile owns the blocks starting in it.
    offs_a = tl.arange(0, BLOCK_J * R_PAD)
    own = offs_a % R_PAD < R
    offs_i = (j0 + offs_a // R_PAD) * R + offs_a % R_PAD
    i_valid = own & (offs_i < num_cmp)
    k = tl.load(k_base + offs_i[None, :].to(tl.int64) * stride_kt,
                mask=d_valid[:, None] & i_valid[None, :], other=0.0)
    logits = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale - lse[:, None]
    # Masking the exponent (not the result) keeps exp2 finite where lse is -inf, and
    # on padding columns where lse is very negative.
    if CAUSAL:
        visible = i_valid[None, :] & (offs_i[None, :] * CMP_STRIDE + (CMP_SIZE - 1) <= p_rows[:, None])
        logits = tl.where(visible, logits, float("-inf"))
    elif R_PAD != R:
        logits = tl.where(own[None, :], logits, float("-inf"))
    p = tl.exp2(logits)
    # Sum over the head digits of the rows (see _row_digits), in-thread ones first.
    p = tl.reshape(p, [H2, BLOCK_T // T1, H1, T1, H0, BLOCK_J * R_PAD])
    p = tl.reshape(tl.sum(tl.sum(tl.sum(p, axis=0), axis=1), axis=2), [BLOCK_T, BLOCK_J, R_PAD])

    # Overlap weights: the block starting at segment m of block j covers c[m] segments
    # of block j + shift, shift <= K. Sum per block and shift, then move by the shift
    # (a gather, exact); what passes the tile's end is the next tile's carry.
    K: tl.constexpr = (L + R - 2) // R
    offs_m = tl.arange(0, R_PAD)
    scores = carry
    next_carry = tl.zeros_like(carry)
    for shift in tl.static_range(K + 1):
        c = tl.minimum(offs_m + L, (shift + 1) * R) - tl.maximum(offs_m, shift * R)
        c = tl.where(offs_m < R, tl.maximum(c, 0), 0).to(tl.float32)
        part = tl.sum(p * c[None, None, :], axis=2)
        if shift == 0:
            scores += part
        else:
            src = tl.arange(0, BLOCK_J)[None, :] - shift + tl.zeros_like(carry).to(tl.int32)
            scores += tl.where(src >= 0, tl.gather(part, tl.maximum(src, 0), axis=1), 0.0)
            next_carry += tl.where(src < 0, tl.gather(part, tl.minimum(src + BLOCK_J, BLOCK_J - 1), axis=1), 0.0)
    offs_j = j0 + tl.arange(0, BLOCK_J)
    tl.store(s_rows + offs_j[None, :], scores, mask=store_t[:, None] & (offs_j[None, :] < num_blocks))
    return next_carry


@triton.jit
def _group_scores_kernel(
    q_ptr, k_ptr, lse_ptr, s_ptr,
    t_begin, t_end, query_offset, num_cmp, num_blocks,
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
    BLOCK_H: tl.constexpr,
    BLOCK_J: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    H0: tl.constexpr,
    H1: tl.constexpr,
    H2: tl.constexpr,
    T1: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Later query tiles see more blocks: launch them first to shorten the tail.
    num_t_tiles = tl.cdiv(t_end - t_begin, BLOCK_T)
    t0 = t_begin + (num_t_tiles - 1 - tl.program_id(0)) * BLOCK_T
    g = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)

    # The q.k dot's rows are (position, head) pairs in the digit order of _row_digits;
    # q stays loaded while the compressed keys stream past it.
    offs_r = tl.arange(0, BLOCK_T * BLOCK_H)
    h0 = offs_r % H0
    t1 = offs_r // H0 % T1
    h1 = offs_r // (H0 * T1) % H1
    t2 = offs_r // (H0 * T1 * H1) % (BLOCK_T // T1)
    h2 = offs_r // (H0 * BLOCK_T * H1)
    t_rows = t0 + t2 * T1 + t1
    h_rows = (h2 * H1 + h1) * H0 + h0
    head = g * HEADS_PER_GROUP + h_rows
    row_valid = (t_rows < t_end) & (h_rows < HEADS_PER_GROUP)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    q = tl.load(q_ptr + b * stride_qb + t_rows[:, None].to(tl.int64) * stride_qt
                + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_valid[:, None] & d_valid[None, :], other=0.0)
    # lse = +inf on padding rows (q = 0 there) zeroes their p without a mask.
    lse = tl.load(lse_ptr + b * stride_lb + head * stride_lh + t_rows, mask=row_valid, other=float("inf"))
    lse *= _LOG2E

    k_base = k_ptr + b * stride_kb + g * stride_kg + offs_d[:, None]
    offs_t = t0 + tl.arange(0, BLOCK_T)
    store_t = offs_t < t_end
    s_rows = s_ptr + b * stride_sb + g * stride_sg + (offs_t - t_begin)[:, None].to(tl.int64) * stride_st

    # Query t sits at position query_offset + t (a shard of a longer sequence); block
    # ids and the causal rule are in positions.
    p_rows = t_rows + query_offset
    p0 = t0 + query_offset
    # Blocks up to the tile's last row are eligible for some row: all must be written.
    num_tiles = (tl.minimum(t0 + BLOCK_T, t_end) - 1 + query_offset) // SEL_SIZE // BLOCK_J + 1
    # Tile jt's last own compressed block ends at (jt+1) * BLOCK_J*l' - d + l - 1:
    # tiles ending by the first row are whole for every row and skip the causal mask.
    num_whole = tl.maximum(p0 + 1 + CMP_STRIDE - CMP_SIZE, 0) // (BLOCK_J * SEL_SIZE)
    carry = tl.zeros([BLOCK_T, BLOCK_J], dtype=tl.float32)
    for jt in range(0, num_whole):
        carry = _score_tile(
            q, lse, p_rows, k_base, stride_kt, s_rows, store_t, jt * BLOCK_J, num_cmp, num_blocks, qk_scale,
            carry, d_valid, CMP_SIZE, CMP_STRIDE, SEL_SIZE, BLOCK_T, BLOCK_J, R_PAD,
            H0, H1, H2, T1, False, DOT_PRECISION)
    for jt in range(num_whole, num_tiles):
        carry = _score_tile(
            q, lse, p_rows, k_base, stride_kt, s_rows, store_t, jt * BLOCK_J, num_cmp, num_blocks, qk_scale,
            carry, d_valid, CMP_SIZE, CMP_STRIDE, SEL_SIZE, BLOCK_T, BLOCK_J, R_PAD,
            H0, H1, H2, T1, True, DOT_PRECISION)


@triton.jit
def _top_n_kernel(
    s_ptr, out_ptr,
    t_begin, t_first, t_end, query_offset, num_blocks,
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
    # Rows t_first .. t_end of the chunk whose scores start at row t_begin.
    offs_t = t_first + tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    t_valid = offs_t < t_end
    offs_j = tl.arange(0, BLOCK_NS)
    own_block = ((offs_t + query_offset) // SEL_SIZE)[:, None]
    # j*l' <= p, i.e. j <= p // l' (p = query_offset + t, the row's position); only these
    # entries were written by the scoring kernel. The launch makes BLOCK_NS cover them.
    eligible = t_valid[:, None] & (offs_j[None, :] <= own_block) & (offs_j[None, :] < num_blocks)
    s_rows = s_ptr + b * stride_sb + g * stride_sg + (offs_t - t_begin)[:, None].to(tl.int64) * stride_st
    score = tl.load(s_rows + offs_j[None, :], mask=eligible, other=float("-inf"))
    forced = (offs_j[None, :] == 0) | (offs_j[None, :] == own_block) | (offs_j[None, :] == own_block - 1)
    chosen = top_n_mask(score, eligible, forced, offs_j[None, :], NUM_SELECTED, BLOCK_NS)
    out_rows = out_ptr + b * stride_ob + offs_t[:, None].to(tl.int64) * stride_ot + g * stride_og
    store_chosen(out_rows, chosen, offs_j[None, :], t_valid, NUM_SELECTED, BLOCK_R, BLOCK_NS, BLOCK_N)


@triton.jit
def top_n_mask(score, eligible, forced, offs_j, NUM_SELECTED: tl.constexpr, BLOCK_NS: tl.constexpr):
    """Which entries of the rows ``score [R, BLOCK_NS]`` (block ids ``offs_j [1, BLOCK_NS]``) are
    chosen: the eligible forced blocks, then the best eligible scores (``>= 0``), ties to the
    lowest id; ``NUM_SELECTED`` in all, or every eligible block when there are fewer.
    Shared with the decode kernels (``decode.py``) so both select alike."""
    # One int64 key orders by score, then by lowest id (the reference's stable descending
    # sort): scores are >= 0, whose float bits order as integers, and -inf's bits are
    # negative. Each round is then a single max. CHOSEN is below every key.
    CHOSEN: tl.constexpr = -(2**63)
    score = tl.where(eligible, score, float("-inf"))
    key = (score.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (BLOCK_NS - 1 - offs_j).to(tl.int64)
    # With n >= 3 every forced block is chosen (a row has three, or no other eligible
    # block), leaving n - 3 rounds; fewer slots go to the lowest forced ids (+inf ties).
    NUM_FORCED: tl.constexpr = 3 if NUM_SELECTED >= 3 else 0
    if NUM_FORCED:
        key = tl.where(eligible & forced, CHOSEN, key)
    else:
        key = tl.where(eligible & forced, (0x7F800000 << 32) | (BLOCK_NS - 1 - offs_j).to(tl.int64), key)
    for _ in range(NUM_SELECTED - NUM_FORCED):
        # Keys are distinct, so the maximum names one entry; on an exhausted row it is
        # an ineligible one, which the final mask drops.
        best = tl.max(key, axis=1)
        key = tl.where(key == best[:, None], CHOSEN, key)
    return eligible & (key == CHOSEN)


@triton.jit
def store_chosen(out_rows, chosen, offs_j, row_ok, NUM_SELECTED: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_NS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Writes the ids of each row's ``chosen [BLOCK_R, BLOCK_NS]`` entries ascending from
    ``out_rows [BLOCK_R, 1]``, then ``-1`` up to ``NUM_SELECTED`` (rows where ``row_ok``)."""
    position = tl.cumsum(chosen.to(tl.int32), axis=1) - 1
    tl.store(out_rows + position, offs_j + tl.zeros([BLOCK_R, BLOCK_NS], tl.int32), mask=chosen)
    count = tl.sum(chosen.to(tl.int32), axis=1)
    offs_n = tl.arange(0, BLOCK_N)[None, :]
    padding = row_ok[:, None] & (offs_n >= count[:, None]) & (offs_n < NUM_SELECTED)
    tl.store(out_rows + offs_n, tl.full([BLOCK_R, BLOCK_N], -1, tl.int32), mask=padding)


def _top_n(scores: torch.Tensor, out: torch.Tensor, t_begin: int, t_end: int, query_offset: int, num_blocks: int,
           ls: int, n: int) -> None:
    """Launches ``_top_n_kernel`` over rows ``t_begin .. t_end``, in runs of rows that see
    at most 16, 32, 64, ... blocks, so that a row's width follows its causal prefix."""
    t = t_begin
    while t < t_end:
        width = max(16, triton.next_power_of_2((query_offset + t) // ls + 1))
        run_end = min(t_end, width * ls - query_offset)  # rows whose own block is < width
        rows = max(1, min(TOP_N_ROWS, TOP_N_ELEMENTS // width))
        _top_n_kernel[(triton.cdiv(run_end - t, rows), scores.shape[1], scores.shape[0])](
            scores, out,
            t_begin, t, run_end, query_offset, num_blocks,
            scores.stride(0), scores.stride(1), scores.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            SEL_SIZE=ls, NUM_SELECTED=n,
            BLOCK_R=rows, BLOCK_NS=width, BLOCK_N=triton.next_power_of_2(n),
            num_warps=min(16, max(1, rows * width // 1024)),
        )
        t = run_end


def _row_digits(block_h: int, block_t: int, num_warps: int) -> dict:
    """Digit sizes of the q.k dot's row index ``r = [h2, t2, h1, t1, h0]`` (most
    significant first): position ``t2*T1 + t1``, head ``(h2*H1 + h1)*H0 + h0``.

    Any order is correct; this one makes the head sum cheap in the tensor-core
    accumulator, whose warps hold 16-row slabs: row bits 0-2 on lanes, bit 3 in a
    register, the next bits on warps, the rest (slab repeats) in registers again.
    Heads take bit 3 (h1) and the repeat bits (h2), summed inside a thread, then low
    lane bits (h0): 2 shuffle rounds for 16 heads instead of 3; positions take warps.
    """
    repeats = max(1, block_t * block_h // (16 * num_warps))
    h1 = min(2, block_h)
    h2 = min(repeats, block_h // h1)
    h0 = block_h // (h1 * h2)
    return dict(H0=h0, H1=h1, H2=h2, T1=max(1, min(8 // h0, block_t)))


def _scoring_meta(
    dtype: torch.dtype, head_dim: int, heads_per_group: int, l: int, d: int, ls: int,
) -> tuple[int, dict]:
    """Query positions per scoring program and the scoring kernel's tile and launch parameters."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    r_pad = triton.next_power_of_2(ls // d)
    block_i = _BLOCK_J * r_pad
    block_h = triton.next_power_of_2(heads_per_group)
    elem_bytes = torch.finfo(dtype).bits // 8
    # Dot rows: the q tile and the [rows, BLOCK_I] float32 logits bound them; a group
    # is never split, so a wide one may exceed the bound with a single position.
    q_tile_bytes = _MAX_Q_TILE_BYTES if elem_bytes == 2 else _MAX_Q_TILE_BYTES_FP32
    rows = min(_MAX_DOT_ROWS, _MAX_LOGITS // block_i, q_tile_bytes // (block_d * elem_bytes))
    block_t = max(1, max(_MIN_DOT_SIZE, rows) // block_h)
    rows = block_t * block_h
    num_warps = 8 if rows * block_i >= _MAX_LOGITS else 4
    # Two programs per SM let one's q.k dot run under the other's exponentials: at 8
    # warps that takes <= 128 registers a thread, and 2 k stages keep both q tiles and
    # their stages in shared memory. Only for tensor-core dots with full tiles, and
    # groups of 2..32 heads: one head leaves 256 positions whose sums spill, and over
    # 32 the head sum crosses warps through shared memory.
    two_per_sm = elem_bytes == 2 and rows * block_i == _MAX_LOGITS and 2 <= block_h <= 32
    return block_t, dict(
        HEAD_DIM=head_dim, HEADS_PER_GROUP=heads_per_group, CMP_SIZE=l, CMP_STRIDE=d, SEL_SIZE=ls,
        BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_J=_BLOCK_J, R_PAD=r_pad, BLOCK_D=block_d,
        **_row_digits(block_h, block_t, num_warps),
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=2, maxnreg=128 if two_per_sm else None,
    )


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
    query_offset: int = 0,
) -> torch.Tensor:
    """Chosen selection blocks ``int32 [B, T, G, n]``, ascending and ``-1`` padded.

    ``q [B, T, H, dk]``, ``k_cmp [B, Tc, G, dk]`` (compressed block ``i`` covers
    tokens ``[i*d, i*d + l)``), ``lse [B, H, T]``: the compression branch's
    log-sum-exp (``-inf`` where a row sees no compressed key). Query ``t`` sits at
    position ``query_offset + t`` (a shard of a longer sequence): ``k_cmp`` holds
    the compressed blocks of positions ``0 .. query_offset + T - 1``, ``lse`` is
    the compression branch's at those positions, and block ids are global (block
    ``j`` covers positions ``[j*l', (j+1)*l')``, ``ceil((query_offset + T) / l')``
    blocks).
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
    if query_offset < 0:
        raise ValueError(f"query_offset ({query_offset}) must be >= 0")
    if l - d > _BLOCK_J * ls:
        # A compressed block must not reach past the next tile (one carried tile).
        raise ValueError(f"compress_block_size {l} too large for select_block_size {ls}")

    num_blocks = -(-(query_offset + seq_len) // ls)
    out = torch.empty(batch, seq_len, num_groups, n, dtype=torch.int32, device=q.device)
    if out.numel() == 0:
        return out
    q, k_cmp = q.contiguous(), k_cmp.contiguous()
    lse = lse.to(torch.float32).contiguous()

    # A chunk need not be whole query tiles: a partial one is masked.
    chunk = min(seq_len, max(1, SCORE_BUFFER_BYTES // (batch * num_groups * num_blocks * 4)))
    # With no compressed key every score is 0 and only forcing and block ids decide.
    alloc = torch.empty if num_cmp else torch.zeros
    scores = alloc(batch, num_groups, chunk, num_blocks, dtype=torch.float32, device=q.device)

    block_t, meta = _scoring_meta(q.dtype, head_dim, num_heads // num_groups, l, d, ls)
    for t_begin in range(0, seq_len, chunk):
        t_end = min(seq_len, t_begin + chunk)
        if num_cmp:
            _group_scores_kernel[(triton.cdiv(t_end - t_begin, block_t), num_groups, batch)](
                q, k_cmp, lse, scores,
                t_begin, t_end, query_offset, num_cmp, num_blocks,
                q.stride(0), q.stride(1), q.stride(2),
                k_cmp.stride(0), k_cmp.stride(1), k_cmp.stride(2),
                lse.stride(0), lse.stride(1),
                scores.stride(0), scores.stride(1), scores.stride(2),
                scale * _LOG2E.value,
                **meta,
            )
        _top_n(scores, out, t_begin, t_end, query_offset, num_blocks, ls, n)
    return out
