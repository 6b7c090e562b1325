"""Differentiable variable-size all-to-all of rows: the one primitive all CP paths share.

A rank asks owners for rows (halo tokens, compressed tokens, selected blocks);
:class:`RowRequests` records who sends which rows where. Forward moves the rows,
backward moves their gradients back the same way, so owners accumulate the
gradient of every copy of their rows they gave away.

Collectives must run in the same order on every rank, in backward too, but the
autograd engine orders independent branches by what is ready, which differs
between ranks whose graphs differ (say, one fetched no blocks). An
:class:`Exchanger` therefore chains its exchanges with scalar tokens so that
backward runs them exactly in reverse forward order on every rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .comm_stats import CommStats


@dataclass(frozen=True)
class RowRequests:
    """One exchange: ``send_index`` are this rank's rows for each destination (grouped by
    destination rank, ``send_counts`` each); ``recv_counts`` rows arrive from each
    source. Received row ``i`` is the requester's wanted row ``order[i]``."""

    send_index: torch.Tensor
    send_counts: list[int]
    recv_counts: list[int]
    order: torch.Tensor

    def to_wanted_order(self, received: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Rows in the order they were wanted instead of grouped by source."""
        return received.index_select(dim, torch.argsort(self.order))


def _group_by_owner(owner: torch.Tensor, world_size: int) -> tuple[torch.Tensor, list[int]]:
    order = torch.argsort(owner, stable=True)
    return order, torch.bincount(owner, minlength=world_size).tolist()


def known_requests(
    wanted: list[tuple[torch.Tensor, torch.Tensor]], rank: int
) -> RowRequests:
    """Requests every rank can compute alone: ``wanted[r] = (owner, owner_row)`` of the rows rank ``r`` needs."""
    world_size = len(wanted)
    owner, _ = wanted[rank]
    order, recv_counts = _group_by_owner(owner, world_size)
    sends = [rows[who == rank] for who, rows in wanted]
    return RowRequests(torch.cat(sends), [len(s) for s in sends], recv_counts, order)


def _exchange_requests(
    owner: torch.Tensor, owner_row: torch.Tensor, group: dist.ProcessGroup, stats: CommStats | None,
) -> RowRequests:
    """Data-dependent requests: tells each owner which of its rows this rank needs (two small all-to-alls)."""
    world_size = dist.get_world_size(group)
    order, recv_counts = _group_by_owner(owner, world_size)
    counts = torch.tensor(recv_counts, dtype=torch.int64, device=owner.device)
    send_counts = torch.empty_like(counts)
    dist.all_to_all_single(send_counts, counts, group=group)
    send_counts = send_counts.tolist()
    wanted_rows = owner_row[order].to(torch.int64).contiguous()
    send_index = wanted_rows.new_empty(sum(send_counts))
    dist.all_to_all_single(send_index, wanted_rows, output_split_sizes=send_counts,
                           input_split_sizes=recv_counts, group=group)
    if stats is not None:
        me = dist.get_rank(group)
        item = wanted_rows.element_size()
        stats.record("forward", "requests",
                     (sum(recv_counts) - recv_counts[me] + world_size - 1) * item,
                     (sum(send_counts) - send_counts[me] + world_size - 1) * item)
    return RowRequests(send_index, send_counts, recv_counts, order)


def _all_to_all(send: torch.Tensor, send_counts: list[int], recv_counts: list[int],
                group: dist.ProcessGroup, async_op: bool = False):
    send = send.contiguous()
    recv = send.new_empty((sum(recv_counts), *send.shape[1:]))
    work = dist.all_to_all_single(recv, send, output_split_sizes=recv_counts, input_split_sizes=send_counts,
                                  group=group, async_op=async_op)
    return recv, work


def _record(stats: CommStats | None, phase: str, category: str, rows: torch.Tensor,
            send_counts: list[int], recv_counts: list[int], group: dist.ProcessGroup) -> None:
    if stats is None:
        return
    me = dist.get_rank(group)
    row_bytes = math.prod(rows.shape[1:]) * rows.element_size()
    stats.record(phase, category, (sum(send_counts) - send_counts[me]) * row_bytes,
                 (sum(recv_counts) - recv_counts[me]) * row_bytes)


class PendingExchange:
    """An all-to-all in flight; :meth:`Exchanger.finish` waits for it inside autograd."""

    def __init__(self, received: torch.Tensor, work) -> None:
        self.received, self.work = received, work

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.received


class _AllToAllRows(torch.autograd.Function):
    """``(send, token) -> (received, next token)``; backward sends gradients back to the senders."""

    @staticmethod
    def forward(ctx, send, token, requests, group, stats, category, pending):
        ctx.requests, ctx.group, ctx.stats, ctx.category = requests, group, stats, category
        if pending is not None:
            received = pending.wait()
        else:
            _record(stats, "forward", category, send, requests.send_counts, requests.recv_counts, group)
            received = _all_to_all(send, requests.send_counts, requests.recv_counts, group)[0]
        return received, send.new_zeros(())

    @staticmethod
    def backward(ctx, grad, _grad_token):
        req = ctx.requests
        _record(ctx.stats, "backward", ctx.category, grad, req.recv_counts, req.send_counts, ctx.group)
        grad_send, _ = _all_to_all(grad, req.recv_counts, req.send_counts, ctx.group)
        grad_token = grad.new_zeros(()) if ctx.needs_input_grad[1] else None
        return grad_send, grad_token, None, None, None, None, None


class _Attach(torch.autograd.Function):
    """Identity on ``x`` whose backward also feeds ``token``: it starts the exchange chain's backward."""

    @staticmethod
    def forward(ctx, x, token):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, grad.new_zeros(())


class Exchanger:
    """The exchanges of one layer's forward over ``group``, counted in ``stats``, with a pinned backward order."""

    def __init__(self, group: dist.ProcessGroup, stats: CommStats | None = None):
        self.group, self.stats = group, stats
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self._token: torch.Tensor | None = None

    def requests(self, owner: torch.Tensor, owner_row: torch.Tensor) -> RowRequests:
        """Tells each owner which of its rows this rank needs (two small all-to-alls, no gradient)."""
        return _exchange_requests(owner, owner_row, self.group, self.stats)

    def rows(self, send: torch.Tensor, requests: RowRequests, category: str) -> torch.Tensor:
        """Sends ``send`` (rows grouped by destination, as ``requests.send_counts``); returns the
        received rows grouped by source. Differentiable in ``send``."""
        return self._apply(send, requests, category, None)

    def start(self, send: torch.Tensor, requests: RowRequests, category: str) -> PendingExchange:
        """Starts :meth:`rows` asynchronously so that compute can overlap it; :meth:`finish` completes it."""
        _record(self.stats, "forward", category, send, requests.send_counts, requests.recv_counts, self.group)
        received, work = _all_to_all(send.detach(), requests.send_counts, requests.recv_counts, self.group,
                                     async_op=True)
        return PendingExchange(received, work)

    def finish(self, send: torch.Tensor, pending: PendingExchange, requests: RowRequests,
               category: str) -> torch.Tensor:
        return self._apply(send, requests, category, pending)

    def attach(self, out: torch.Tensor) -> torch.Tensor:
        """Ties the layer output to the last exchange, so backward walks the chain from there."""
        return out if self._token is None else _Attach.apply(out, self._token)

    def _apply(self, send, requests, category, pending):
        received, self._token = _AllToAllRows.apply(send, self._token, requests, self.group, self.stats,
                                                    category, pending)
        return received
