"""NSA over a sequence sharded across a context-parallel group (design brief, section 3).

Each rank holds its tokens' projections and runs the single-GPU ops on local
tensors; only this module knows about ranks:

1. halo: the ``w-1`` window and ``l-d`` compression keys/values before each owned chunk;
2. compressed tokens: each rank compresses the blocks that end in its tokens, then
   all ranks exchange them (differentiable: gradients go back to their owners);
3. compression attention and top-n selection locally, over global block ids;
4. only the remote blocks some local query selected are fetched (per batch row and
   KV group), asynchronously while the window branch runs; they are placed in front
   of the local tokens and the block ids remapped into that cache;
5. selection attention and the gated combination locally.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from .. import ops
from ..compression import BlockCompressor
from ..config import NSAConfig
from ..rotary import apply_rotary
from .comm_stats import CommStats
from .exchange import Exchanger, PendingExchange, RowRequests, known_requests
from .layout import Segment, ShardLayout


def _tokens_first(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(0, 1).contiguous()


def _halo_requests(layout: ShardLayout, rank: int, halo: int, device: torch.device) -> tuple[RowRequests, list[int]]:
    """Who sends which of the ``halo`` tokens before every chunk; also this rank's halo length per chunk."""
    wanted, lengths = [], []
    for r in range(layout.world_size):
        positions = [torch.arange(max(0, s.start - halo), s.start, device=device) for s in layout.segments(r)]
        if r == rank:
            lengths = [len(p) for p in positions]
        wanted.append(layout.owner(torch.cat(positions)))
    return known_requests(wanted, rank), lengths


def fetch_halo(x: torch.Tensor, layout: ShardLayout, halo: int, exchanger: Exchanger) -> list[torch.Tensor]:
    """``x [B, C, ...]`` local rows -> per owned chunk, the ``min(halo, start)`` rows before it."""
    requests, lengths = _halo_requests(layout, exchanger.rank, halo, x.device)
    send = _tokens_first(x.index_select(1, requests.send_index))
    rows = requests.to_wanted_order(exchanger.rows(send, requests, "halo"))
    return [part.transpose(0, 1) for part in rows.split(lengths)]


def _compressed_span(segment: Segment, config: NSAConfig) -> tuple[int, int]:
    """First token and count of the compression blocks ending in ``segment``."""
    first = max(0, segment.start - (config.compress_block_size - config.compress_stride))
    return first, config.num_compressed(segment.stop - first)


def _compressed_ids(layout: ShardLayout, rank: int, config: NSAConfig, device: torch.device) -> torch.Tensor:
    ids = []
    for segment in layout.segments(rank):
        first, count = _compressed_span(segment, config)
        ids.append(torch.arange(count, device=device) + first // config.compress_stride)
    return torch.cat(ids)


def compress_local(
    k_raw: torch.Tensor, v_raw: torch.Tensor, halo: list[torch.Tensor], compress_k: BlockCompressor,
    compress_v: BlockCompressor, cos: torch.Tensor, sin: torch.Tensor, segments: list[Segment], config: NSAConfig,
) -> torch.Tensor:
    """Compressed tokens of the blocks ending in this rank's chunks, keys rotated at their block's
    last token: ``[B, n_local, G, dk + dv]``."""
    dk, out = k_raw.shape[-1], []
    for segment, before in zip(segments, halo):
        rows = slice(segment.local_start, segment.local_start + segment.length)
        k_ext = torch.cat([before[..., :dk], k_raw[:, rows]], dim=1)
        v_ext = torch.cat([before[..., dk:], v_raw[:, rows]], dim=1)
        k_cmp, v_cmp = compress_k(k_ext), compress_v(v_ext)
        first, count = _compressed_span(segment, config)
        ends = first + torch.arange(count, device=k_raw.device) * config.compress_stride + config.compress_block_size - 1
        local_rows = ends - segment.start + segment.local_start
        out.append(torch.cat([apply_rotary(k_cmp, cos[local_rows], sin[local_rows]), v_cmp], dim=-1))
    return torch.cat(out, dim=1)


def all_gather_compressed(
    local: torch.Tensor, layout: ShardLayout, config: NSAConfig, exchanger: Exchanger
) -> torch.Tensor:
    """Every rank's compressed tokens in global order ``[B, Tc, G, D]``; gradients return to owners."""
    world = layout.world_size
    ids = [_compressed_ids(layout, r, config, local.device) for r in range(world)]
    count = local.shape[1]
    requests = RowRequests(local.new_empty(0, dtype=torch.long), [count] * world, [len(i) for i in ids],
                           torch.arange(sum(len(i) for i in ids), device=local.device))
    send = _tokens_first(local).repeat(world, *([1] * (local.dim() - 1)))
    rows = exchanger.rows(send, requests, "compressed")
    return rows.index_select(0, torch.argsort(torch.cat(ids))).transpose(0, 1)


class BlockFetch:
    """Remote selected blocks: which (batch row, KV group, block) to fetch, where they go in the cache."""

    def __init__(self, block_ids: torch.Tensor, layout: ShardLayout, config: NSAConfig, exchanger: Exchanger):
        batch, _, groups, _ = block_ids.shape
        rank = exchanger.rank
        self.block, self.exchanger = config.select_block_size, exchanger
        self.local_blocks = layout.local_len // self.block
        num_blocks = layout.seq_len // self.block
        device = block_ids.device

        ids = block_ids.long()
        valid = ids >= 0
        owner, owner_row = layout.owner(ids.clamp(min=0) * self.block)
        remote = valid & (owner != rank)
        row_group = (torch.arange(batch, device=device)[:, None, None, None] * groups
                     + torch.arange(groups, device=device)[None, None, :, None])  # b*G + g
        key = (row_group * num_blocks + ids).expand_as(ids)
        self.unique = torch.unique(key[remote])  # sorted: grouped by (b, g), then block
        unique_group, unique_block = self.unique // num_blocks, self.unique % num_blocks
        per_group = torch.bincount(unique_group, minlength=batch * groups)
        group_start = torch.cumsum(per_group, 0) - per_group
        self.slots = int(per_group.max()) if len(self.unique) else 0
        slot = torch.arange(len(self.unique), device=device) - group_start[unique_group]
        self.cache_row = unique_group * self.slots + slot

        u_owner, u_row = layout.owner(unique_block * self.block)
        u_b, u_g = unique_group // groups, unique_group % groups
        self.requests = exchanger.requests(u_owner, (u_b * groups + u_g) * self.local_blocks + u_row // self.block)

        remote_slot = torch.searchsorted(self.unique, key.contiguous()) - group_start[row_group.expand_as(ids)]
        local_slot = self.slots + owner_row // self.block
        remapped = torch.where(valid, torch.where(remote, remote_slot, local_slot), -1)
        # Keep the kernels' contract: ascending ids, -1 padding last.
        sentinel = torch.iinfo(torch.int32).max
        ordered = torch.sort(torch.where(remapped < 0, sentinel, remapped), dim=-1).values
        self.cache_ids = torch.where(ordered == sentinel, -1, ordered).to(torch.int32)
        self.shape = (batch, groups)

    def rows_to_send(self, kv: torch.Tensor) -> torch.Tensor:
        """The requested blocks of local ``kv [B, C, G, D]``: ``[n, l', D]``, grouped by requester."""
        batch, groups = self.shape
        index = self.requests.send_index
        b, g = index // (groups * self.local_blocks), (index // self.local_blocks) % groups
        blocks = kv.view(batch, self.local_blocks, self.block, groups, kv.shape[-1])
        return blocks[b, index % self.local_blocks, :, g]

    def start(self, send: torch.Tensor) -> PendingExchange:
        return self.exchanger.start(send, self.requests, "blocks")

    def cache(self, send: torch.Tensor, pending: PendingExchange, kv: torch.Tensor) -> torch.Tensor:
        """``[B, slots*l' + C, G, D]``: fetched blocks (``slots`` per batch row and group) then local tokens."""
        batch, groups = self.shape
        received = self.exchanger.finish(send, pending, self.requests, "blocks")
        dest = self.cache_row[self.requests.order]
        remote = received.new_zeros(batch * groups * self.slots, self.block, kv.shape[-1])
        remote = remote.index_put((dest,), received)
        remote = remote.view(batch, groups, self.slots * self.block, kv.shape[-1]).transpose(1, 2)
        return torch.cat([remote, kv], dim=1)


def _check_shapes(q: torch.Tensor, group: dist.ProcessGroup) -> None:
    """Every rank must hold the same local shape; compared collectively so all ranks raise together."""
    mine = torch.tensor(q.shape, dtype=torch.int64, device=q.device)
    shapes = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shapes, mine, group=group)
    shapes = [tuple(s.tolist()) for s in shapes]
    if len(set(shapes)) > 1:
        raise ValueError(f"context-parallel ranks hold differently shaped local queries {shapes}: every rank "
                         "must hold seq_len / context_parallel_size tokens of the same batch")


def context_parallel_nsa_branches(
    q: torch.Tensor,
    branch_kv: Sequence[tuple[torch.Tensor, torch.Tensor]],
    gate_logits: torch.Tensor,
    compress_k: BlockCompressor,
    compress_v: BlockCompressor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    config: NSAConfig,
    group: dist.ProcessGroup,
    layout: str = "contiguous",
    backend: ops.Backend = "auto",
    stats: CommStats | None = None,
) -> torch.Tensor:
    """:func:`nsa_parallel.layer.nsa_branches` on this rank's shard of the sequence.

    Shapes as there, with ``T`` the local length ``C`` (``seq_len / P``, the rank's
    chunks in ``layout`` order) and ``cos``/``sin`` ``[C, dk]`` the rotary tables
    of the local tokens' global positions. Collective: every rank of ``group``
    must call it. Returns ``[B, C, H, dv]``.
    """
    exchanger = Exchanger(group, stats)
    _check_shapes(q, group)
    layout = ShardLayout(layout, exchanger.world_size, q.shape[1] * exchanger.world_size)
    layout.check_divisible(config.select_block_size)
    segments = layout.segments(exchanger.rank)
    (k_raw, v_raw), (k_slc, v_slc), (k_win, v_win) = branch_kv
    dk = q.shape[-1]

    q = apply_rotary(q, cos, sin)
    kv_slc = torch.cat([apply_rotary(k_slc, cos, sin), v_slc], dim=-1)
    kv_win = torch.cat([apply_rotary(k_win, cos, sin), v_win], dim=-1)
    win_halo = fetch_halo(kv_win, layout, config.window_size - 1, exchanger)
    cmp_halo = fetch_halo(torch.cat([k_raw, v_raw], dim=-1), layout,
                          config.compress_block_size - config.compress_stride, exchanger)
    kv_cmp = all_gather_compressed(
        compress_local(k_raw, v_raw, cmp_halo, compress_k, compress_v, cos, sin, segments, config),
        layout, config, exchanger)

    o_cmp, block_ids = [], []
    for segment in segments:
        q_seg = q[:, segment.local_start:segment.local_start + segment.length].contiguous()
        visible = kv_cmp[:, :config.num_compressed(segment.stop)]
        k_cmp, v_cmp = visible[..., :dk].contiguous(), visible[..., dk:].contiguous()
        out, lse = ops.compressed_attention(q_seg, k_cmp, v_cmp, config, backend=backend,
                                            query_offset=segment.start, return_lse=True)
        o_cmp.append(out)
        block_ids.append(ops.select_blocks(q_seg.detach(), k_cmp.detach(), config, backend=backend, lse=lse,
                                           query_offset=segment.start))

    fetch = BlockFetch(torch.cat(block_ids, dim=1), layout, config, exchanger)
    send = fetch.rows_to_send(kv_slc)
    pending = fetch.start(send)

    o_win = []
    for segment, before in zip(segments, win_halo):
        q_seg = q[:, segment.local_start:segment.local_start + segment.length].contiguous()
        kv = torch.cat([before, kv_win[:, segment.local_start:segment.local_start + segment.length]], dim=1)
        o_win.append(ops.window_attention(q_seg, kv[..., :dk].contiguous(), kv[..., dk:].contiguous(),
                                          config.window_size, backend=backend, query_offset=before.shape[1]))

    cache = fetch.cache(send, pending, kv_slc)
    o_slc = ops.selection_attention(q, cache[..., :dk].contiguous(), cache[..., dk:].contiguous(), fetch.cache_ids,
                                    config, backend=backend, query_offset=fetch.slots * fetch.block)
    out = ops.combine_branches(torch.cat(o_cmp, dim=1), o_slc, torch.cat(o_win, dim=1),
                               torch.sigmoid(gate_logits), backend)
    return exchanger.attach(out)
