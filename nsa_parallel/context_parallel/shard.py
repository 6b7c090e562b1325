"""One rank's shard of a sequence under context parallelism: the exchanges NSA needs (design brief, section 3).

:func:`nsa_parallel.core.nsa_core` runs the same steps on one GPU and under context
parallelism; a shard supplies what differs, the exchanges:

1. halo: the ``w-1`` window and ``l-d`` compression keys/values before each owned chunk;
2. compressed tokens: each rank compresses the blocks that end in its chunks, then all
   ranks exchange them (differentiable: gradients go back to their owners);
3. (compression attention and top-n selection run locally, over global block ids);
4. only the remote blocks some local query selected are fetched (per batch row and KV
   group), asynchronously while the window branch runs; they are placed in front of the
   local tokens and the block ids remapped into that cache;
5. (selection attention and the gated combination run locally).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

from ..config import NSAConfig
from .comm_stats import CommStats
from .exchange import Exchanger, RowRequests, known_requests
from .layout import DEFAULT_LAYOUT, Segment, ShardLayout, check_layout

KVPair = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class ContextParallel:
    """The context-parallel group a sequence is sharded over, its layout, and where to count bytes."""

    group: dist.ProcessGroup
    layout: str = DEFAULT_LAYOUT
    stats: CommStats | None = None

    def __post_init__(self) -> None:
        check_layout(self.layout)

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    def layout_of(self, seq_len: int) -> ShardLayout:
        """How a sequence of ``seq_len`` tokens (all ranks together) is spread over the group."""
        return ShardLayout(self.layout, self.world_size, seq_len)


class SelectedKV(NamedTuple):
    """Keys/values the selection branch reads: keys at positions ``0 ..``, the queries from ``query_offset``."""

    k: torch.Tensor
    v: torch.Tensor
    block_ids: torch.Tensor
    query_offset: int


def check_same_shape(q: torch.Tensor, group: dist.ProcessGroup) -> None:
    """Every rank must hold the same local shape; compared collectively so all ranks raise together."""
    mine = torch.tensor(q.shape, dtype=torch.int64, device=q.device)
    shapes = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shapes, mine, group=group)
    shapes = [tuple(s.tolist()) for s in shapes]
    if len(set(shapes)) > 1:
        raise ValueError(f"context-parallel ranks hold differently shaped local queries {shapes}: every rank "
                         "must hold seq_len / context_parallel_size tokens of the same batch")


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


def _compressed_ids(layout: ShardLayout, rank: int, config: NSAConfig, device: torch.device) -> torch.Tensor:
    """Global ids of the compressed tokens whose blocks end in ``rank``'s chunks."""
    ids = []
    for segment in layout.segments(rank):
        first = max(0, segment.start - (config.compress_block_size - config.compress_stride))
        ids.append(torch.arange(config.num_compressed(segment.stop - first), device=device)
                   + first // config.compress_stride)
    return torch.cat(ids)


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

    def cache(self, send: torch.Tensor, kv: torch.Tensor) -> Callable[[], torch.Tensor]:
        """Starts sending ``send``; the returned call waits and gives ``[B, slots*l' + C, G, D]``: the
        fetched blocks (``slots`` per batch row and group) then the local tokens ``kv``."""
        pending = self.exchanger.start(send, self.requests, "blocks")

        def finish() -> torch.Tensor:
            batch, groups = self.shape
            received = self.exchanger.finish(send, pending, self.requests, "blocks")
            dest = self.cache_row[self.requests.order]
            remote = received.new_zeros(batch * groups * self.slots, self.block, kv.shape[-1])
            remote = remote.index_put((dest,), received)
            remote = remote.view(batch, groups, self.slots * self.block, kv.shape[-1]).transpose(1, 2)
            return torch.cat([remote, kv], dim=1)
        return finish


def _split(x: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, ...]:
    """Keys and values back apart: views, made contiguous (copied) only where a kernel reads them."""
    return tuple(x.split(sizes, dim=-1))


class ContextParallelShard:
    """This rank's share of a sequence of ``local_len * P`` tokens; each exchange packs keys and
    values into one tensor so that a path costs one all-to-all."""

    def __init__(self, cp: ContextParallel, local_len: int, config: NSAConfig):
        self.exchanger = Exchanger(cp.group, cp.stats)
        self.layout = cp.layout_of(local_len * self.exchanger.world_size)
        self.layout.check_divisible(config.select_block_size)
        self.segments: list[Segment] = self.layout.segments(self.exchanger.rank)
        self.config = config

    def halo(self, kv: KVPair, length: int) -> list[KVPair | None]:
        sizes = [t.shape[-1] for t in kv]
        parts = fetch_halo(torch.cat(kv, dim=-1), self.layout, length, self.exchanger)
        return [_split(part, sizes) for part in parts]

    def gather_compressed(self, k: torch.Tensor, v: torch.Tensor) -> KVPair:
        kv = all_gather_compressed(torch.cat([k, v], dim=-1), self.layout, self.config, self.exchanger)
        return _split(kv, [k.shape[-1], v.shape[-1]])

    def fetch_blocks(self, block_ids: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[[], SelectedKV]:
        fetch = BlockFetch(block_ids, self.layout, self.config, self.exchanger)
        kv = torch.cat([k, v], dim=-1)
        finish = fetch.cache(fetch.rows_to_send(kv), kv)

        def selected() -> SelectedKV:
            k_cache, v_cache = _split(finish(), [k.shape[-1], v.shape[-1]])
            return SelectedKV(k_cache, v_cache, fetch.cache_ids, fetch.slots * fetch.block)
        return selected

    def attach(self, out: torch.Tensor) -> torch.Tensor:
        return self.exchanger.attach(out)
