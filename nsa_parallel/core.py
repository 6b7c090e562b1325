"""NSA after the projections, once for every path: one GPU, context parallelism, packed documents.

:func:`nsa_core` rotates queries and keys, compresses the compression branch's keys and values
with ``phi``, runs the three branches and combines them with the gates. Where the sequence lives
is a *shard*: :class:`WholeSequence` (one rank holds it all: every exchange is the identity, at no
cost) or :class:`~nsa_parallel.context_parallel.ContextParallelShard` (halo, compressed-token and
selected-block exchanges). Packed documents run as sequences of their own, one after another.
The modules (:class:`~nsa_parallel.NativeSparseAttention`, the Megatron ``NSASelfAttention``)
only project, build rotary tables (:func:`token_positions` says where each token sits) and call it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

import torch

from . import ops
from .compression import compressed_positions
from .config import NSAConfig
from .context_parallel import ContextParallel, ContextParallelShard, Segment
from .context_parallel.shard import KVPair, SelectedKV, check_same_shape
from .rotary import Rotary, apply_rotary

# One batch row's documents: (start, end) token ranges of the whole sequence, back to back, covering it.
Bounds = Sequence[tuple[int, int]]


class KV(NamedTuple):
    """Keys ``[B, T, G, dk]`` and values ``[B, T, G, dv]`` of one branch."""

    k: torch.Tensor
    v: torch.Tensor


class BranchKV(NamedTuple):
    """The raw (not yet rotated) keys and values of the compressed, selected and window branches."""

    cmp: KV
    slc: KV
    win: KV

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> BranchKV:
        return BranchKV(*(KV(fn(pair.k), fn(pair.v)) for pair in self))


class Compressors(NamedTuple):
    """``phi`` of keys and of values: ``[B, T, G, d] -> [B, Tc, G, d]``, one token per compression block."""

    k: Callable[[torch.Tensor], torch.Tensor]
    v: Callable[[torch.Tensor], torch.Tensor]


class Shard(Protocol):
    """Where one sequence lives and how its pieces travel (see :mod:`nsa_parallel.context_parallel.shard`)."""

    segments: list[Segment]

    def halo(self, kv: KVPair, length: int) -> list[KVPair | None]:
        """Per segment, the ``min(length, start)`` tokens before it (``None``: there are none)."""

    def gather_compressed(self, k: torch.Tensor, v: torch.Tensor) -> KVPair:
        """Every compressed token of the sequence, from the ones whose blocks end in this shard."""

    def fetch_blocks(self, block_ids: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[[], SelectedKV]:
        """Starts fetching what the selection branch reads; the returned call finishes it."""

    def attach(self, out: torch.Tensor) -> torch.Tensor:
        """Ties the output to the exchanges, so backward runs them on every rank alike."""


class WholeSequence:
    """One rank holds all ``seq_len`` tokens: context parallelism over a group of one."""

    def __init__(self, seq_len: int):
        self.segments = [Segment(0, seq_len, 0)]

    def halo(self, kv: KVPair, length: int) -> list[KVPair | None]:
        return [None]

    def gather_compressed(self, k: torch.Tensor, v: torch.Tensor) -> KVPair:
        return k, v

    def fetch_blocks(self, block_ids: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[[], SelectedKV]:
        return lambda: SelectedKV(k, v, block_ids, 0)

    def attach(self, out: torch.Tensor) -> torch.Tensor:
        return out


def document_bounds(cu_seqlens: torch.Tensor, total: int) -> list[tuple[int, int]]:
    """``(start, end)`` of each non-empty document of a packed row of ``total`` tokens.

    ``cu_seqlens`` is Megatron's / flash-attn's: cumulative document lengths, ``[0, ..., total]``.
    Raises ``ValueError`` naming the rule it breaks (checked before any work; one host sync).
    """
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 \
            or cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype.is_complex:
        raise ValueError("cu_seqlens must be a 1-D integer tensor [0, end of document 1, ..., total tokens], "
                         f"got {cu_seqlens!r}")
    ends = cu_seqlens.tolist()
    if ends[0] != 0 or ends[-1] != total:
        raise ValueError(f"cu_seqlens must start at 0 and end at the number of tokens ({total}), "
                         f"got {ends[0]} ... {ends[-1]}")
    if any(b < a for a, b in zip(ends, ends[1:])):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {ends}")
    return [(a, b) for a, b in zip(ends, ends[1:]) if b > a]


def token_positions(seq_len: int, *, cp: ContextParallel | None = None, documents: Sequence[Bounds] | None = None,
                    device: torch.device | None = None) -> torch.Tensor:
    """Position of each of this rank's ``seq_len`` tokens: ``[T]``, or ``[B, T]`` for documents per row.

    Under ``cp`` this rank holds its layout's share of the sequence (of every document, back to
    back); in a document positions count from its first token, as Megatron's rotary does for packed
    sequences. Rotary tables of these positions are what :func:`nsa_core` takes.
    """
    world = 1 if cp is None else cp.world_size

    def share(length: int) -> torch.Tensor:
        if cp is None:
            return torch.arange(length, device=device)
        return cp.layout_of(length).local_positions(cp.rank, device)

    if documents is None:
        return share(seq_len * world)
    rows = [torch.cat([share(b - a) for a, b in bounds]) for bounds in documents]
    return rows[0] if len(rows) == 1 else torch.stack(rows)


def _rows(x: torch.Tensor, segment: Segment) -> torch.Tensor:
    """The tokens of ``segment``: ``x`` itself when the segment is all of it."""
    if segment.local_start == 0 and segment.length == x.shape[1]:
        return x
    return x[:, segment.local_start:segment.local_start + segment.length]


def _with_halo(before: KVPair | None, kv: KV, segment: Segment) -> KV:
    """The segment's keys and values, after its halo (the tokens before it) when it has one."""
    own = KV(_rows(kv.k, segment), _rows(kv.v, segment))
    return own if before is None else KV(*(torch.cat([b, o], dim=1) for b, o in zip(before, own)))


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _compress(kv: KV, halo: list[KVPair | None], phi: Compressors, rotary: Rotary | None, shard: Shard,
              config: NSAConfig) -> KVPair:
    """The compressed tokens of the blocks ending in this shard; a key is rotated at its block's last
    token, the first query that may see it."""
    keys, values = [], []
    for segment, before in zip(shard.segments, halo):
        k, v = _with_halo(before, kv, segment)
        k_cmp, v_cmp = phi.k(k), phi.v(v)
        if rotary is not None:
            first_id = (segment.start - (k.shape[1] - segment.length)) // config.compress_stride
            ids = torch.arange(k_cmp.shape[1], device=k.device) + first_id
            rows = compressed_positions(ids, config) - segment.start + segment.local_start
            k_cmp = apply_rotary(k_cmp, *rotary.rows(rows))
        keys.append(k_cmp)
        values.append(v_cmp)
    return shard.gather_compressed(_cat(keys), _cat(values))


def rotate_keys(kv: BranchKV, rotary: Rotary | None) -> BranchKV:
    """The selection and window keys rotated at their tokens; the compression branch's stay raw
    (``phi`` reads them raw and its outputs are rotated at their blocks' last tokens)."""
    if rotary is None:
        return kv
    return BranchKV(kv.cmp, KV(apply_rotary(kv.slc.k, *rotary), kv.slc.v),
                    KV(apply_rotary(kv.win.k, *rotary), kv.win.v))


def compress_sequence(kv: KV, phi: Compressors, config: NSAConfig, rotary: Rotary | None = None) -> KV:
    """The compressed keys and values of one whole sequence ``[B, T, G, d]``, each key rotated at its
    block's last token: what :func:`nsa_core`'s compression branch attends to (a KV cache keeps them)."""
    return KV(*_compress(kv, [None], phi, rotary, WholeSequence(kv.k.shape[1]), config))


def _attend(q: torch.Tensor, kv: BranchKV, gate_logits: torch.Tensor, phi: Compressors, config: NSAConfig,
            rotary: Rotary | None, scale: float | None, shard: Shard, backend: ops.Backend) -> torch.Tensor:
    """One sequence (or this rank's shard of it): ``[B, T, H, dv]``."""
    q = q.contiguous() if rotary is None else apply_rotary(q, *rotary)  # every kernel reads it contiguous
    kv = rotate_keys(kv, rotary)
    # Collectives run in this order on every rank.
    win_halo = shard.halo(kv.win, config.window_size - 1)
    cmp_halo = shard.halo(kv.cmp, config.compress_block_size - config.compress_stride)
    k_cmp, v_cmp = _compress(kv.cmp, cmp_halo, phi, rotary, shard, config)

    q_segs = [_rows(q, segment).contiguous() for segment in shard.segments]  # copies only for two chunks
    o_cmp, block_ids = [], []
    for segment, q_seg in zip(shard.segments, q_segs):
        visible = config.num_compressed(segment.stop)  # the blocks ending before the segment does
        k_seg, v_seg = k_cmp[:, :visible].contiguous(), v_cmp[:, :visible].contiguous()
        out, lse = ops.compressed_attention(q_seg, k_seg, v_seg, config, scale, backend, query_offset=segment.start,
                                            return_lse=True)
        o_cmp.append(out)
        block_ids.append(ops.select_blocks(q_seg.detach(), k_seg.detach(), config, scale, backend, lse=lse,
                                           query_offset=segment.start))
    selected = shard.fetch_blocks(_cat(block_ids), kv.slc.k, kv.slc.v)  # in flight while the window runs

    o_win = []
    for segment, q_seg, before in zip(shard.segments, q_segs, win_halo):
        k, v = _with_halo(before, kv.win, segment)
        o_win.append(ops.window_attention(q_seg, k.contiguous(), v.contiguous(), config.window_size, scale, backend,
                                          query_offset=k.shape[1] - segment.length))

    k_slc, v_slc, ids, offset = selected()
    o_slc = ops.selection_attention(q, k_slc.contiguous(), v_slc.contiguous(), ids, config, scale, backend,
                                    query_offset=offset, check_ids=False)  # made by select_blocks: valid
    out = ops.combine_branches(_cat(o_cmp), o_slc, _cat(o_win), torch.sigmoid(gate_logits), backend)
    return shard.attach(out)


def _shard(cp: ContextParallel | None, local_len: int, config: NSAConfig) -> Shard:
    return WholeSequence(local_len) if cp is None else ContextParallelShard(cp, local_len, config)


def nsa_core(
    q: torch.Tensor,
    kv: BranchKV,
    gate_logits: torch.Tensor,
    phi: Compressors,
    config: NSAConfig,
    *,
    rotary: Rotary | None = None,
    scale: float | None = None,
    documents: Sequence[Bounds] | None = None,
    cp: ContextParallel | None = None,
    backend: ops.Backend = "auto",
) -> torch.Tensor:
    """Native Sparse Attention of ``q [B, T, H, dk]`` over ``kv`` (raw keys/values per branch, ``[B, T, G, d]``)
    with ``gate_logits [B, T, H, 3]`` (compressed, selected, window; the sigmoid is applied here).

    ``rotary``: cos/sin of each token (:func:`token_positions`), applied to queries and keys;
    ``None`` rotates nothing. ``scale`` defaults to ``1/sqrt(dk)``. ``documents``: per batch row,
    the documents it packs (each attends only to itself: its own blocks and window, one set of
    kernel launches each). ``cp``: ``q`` etc. hold this rank's share of the sequence (of every
    document) and every rank of ``cp.group`` must call it. Returns ``[B, T, H, dv]``.
    """
    ops.resolve_backend(backend, q)  # a backend that cannot run fails before any work
    if cp is not None:
        check_same_shape(q, cp.group)
    if documents is None:
        return _attend(q, kv, gate_logits, phi, config, rotary, scale, _shard(cp, q.shape[1], config), backend)
    if len(documents) != q.shape[0]:
        raise ValueError(f"documents has {len(documents)} rows; the batch has {q.shape[0]}")
    world = 1 if cp is None else cp.world_size
    plans = []  # every check before the first collective, so that no rank waits alone
    for r, bounds in enumerate(documents):
        local = 0
        for i, (a, b) in enumerate(bounds):
            rows = slice(local, local + (b - a) // world)
            local = rows.stop
            try:
                plans.append((r, rows, _shard(cp, rows.stop - rows.start, config)))
            except ValueError as err:
                raise ValueError(f"document {i} (tokens {a} to {b}) under context parallelism: {err}") from None
    outs: list[list[torch.Tensor]] = [[] for _ in documents]
    for r, rows, shard in plans:
        one = slice(r, r + 1)
        outs[r].append(_attend(q[one, rows], kv.map(lambda t: t[one, rows]), gate_logits[one, rows], phi, config,
                               None if rotary is None else rotary.rows(rows, r), scale, shard, backend))
    return torch.cat([_cat(row) for row in outs])
