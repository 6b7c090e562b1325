"""``NativeSparseAttention``: the full NSA layer as a plain ``torch.nn.Module`` (no Megatron needed)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from . import ops
from .compression import BlockCompressor
from .config import NSAConfig
from .context_parallel import LAYOUTS as CP_LAYOUTS
from .context_parallel import CommStats, ShardLayout, context_parallel_nsa_branches
from .rotary import apply_rotary, rotary_angles

BRANCHES = ("cmp", "slc", "win")


def nsa_branches(
    q: torch.Tensor,
    branch_kv: Sequence[tuple[torch.Tensor, torch.Tensor]],
    gate_logits: torch.Tensor,
    compress_k: BlockCompressor,
    compress_v: BlockCompressor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    config: NSAConfig,
    backend: ops.Backend = "auto",
) -> torch.Tensor:
    """Everything after the projections, shared by every NSA layer (plain torch and Megatron).

    ``q [B, T, H, dk]``; ``branch_kv`` the (key, value) pairs of the compressed,
    selected and window branches, ``[B, T, G, dk]`` / ``[B, T, G, dv]`` (raw keys,
    not yet rotated); ``gate_logits [B, T, H, 3]``; ``cos``/``sin`` rotary tables
    ``[>= T, dk]`` indexed by token position. Compressed keys are rotated at their
    block's last token, the first query that may see them. Returns ``[B, T, H, dv]``.
    """
    (k_raw, v_raw), (k_slc, v_slc), (k_win, v_win) = branch_kv
    seq = q.shape[1]
    cos, sin = cos[:seq], sin[:seq]
    q = apply_rotary(q, cos, sin)
    k_cmp, v_cmp = compress_k(k_raw), compress_v(v_raw)
    block_ends = torch.arange(k_cmp.shape[1], device=q.device) * config.compress_stride + config.compress_block_size - 1
    k_cmp = apply_rotary(k_cmp, cos[block_ends], sin[block_ends])
    k_slc, k_win = apply_rotary(k_slc, cos, sin), apply_rotary(k_win, cos, sin)
    return ops.nsa_attention(
        q, k_cmp.contiguous(), v_cmp.contiguous(), k_slc.contiguous(), v_slc.contiguous(),
        k_win.contiguous(), v_win.contiguous(), torch.sigmoid(gate_logits), config, backend=backend,
    )


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


def packed_nsa_branches(
    q: torch.Tensor,
    branch_kv: Sequence[tuple[torch.Tensor, torch.Tensor]],
    gate_logits: torch.Tensor,
    compress_k: BlockCompressor,
    compress_v: BlockCompressor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    config: NSAConfig,
    cu_seqlens: torch.Tensor,
    backend: ops.Backend = "auto",
    *,
    cp_group: "torch.distributed.ProcessGroup | None" = None,
    cp_layout: str = "zigzag",
    cp_stats: CommStats | None = None,
) -> torch.Tensor:
    """:func:`nsa_branches` on a packed row: each document attends only to itself.

    ``q [1, T, H, dk]`` etc. hold documents back to back, ``cu_seqlens`` their boundaries.
    Every document is NSA on its own sequence: its blocks, windows and rotary positions start at
    its first token (``cos``/``sin`` are indexed by position in a document and must cover the
    longest). Runs document by document, one set of kernel launches each. With ``cp_group``
    (Megatron's packed context parallelism) the tensors hold this rank's ``cp_layout`` share of
    every document, documents back to back, ``cu_seqlens`` the global boundaries, and each
    document runs as a context-parallel sequence; every rank must call it.
    """
    if q.shape[0] != 1:
        raise ValueError(f"a packed sequence is one row: batch must be 1, got {q.shape[0]}")
    world = 1 if cp_group is None else torch.distributed.get_world_size(cp_group)
    bounds = document_bounds(cu_seqlens, q.shape[1] * world)
    layouts = []
    if cp_group is not None:  # every check before the first collective, so no rank waits alone
        for i, (a, b) in enumerate(bounds):
            layout = ShardLayout(cp_layout, world, b - a)
            try:
                layout.check_divisible(config.select_block_size)
            except ValueError as err:
                raise ValueError(f"document {i} (tokens {a} to {b}) under context parallelism: {err}") from None
            layouts.append(layout)
    outs, local = [], 0
    for i, (a, b) in enumerate(bounds):
        rows = slice(local, local + (b - a) // world)
        local = rows.stop
        args = (q[:, rows], [(k[:, rows], v[:, rows]) for k, v in branch_kv], gate_logits[:, rows], compress_k,
                compress_v)
        if cp_group is None:
            outs.append(nsa_branches(*args, cos, sin, config, backend))
        else:
            pos = layouts[i].local_positions(torch.distributed.get_rank(cp_group), q.device)
            outs.append(context_parallel_nsa_branches(*args, cos[pos], sin[pos], config, cp_group, cp_layout,
                                                      backend, cp_stats))
    return torch.cat(outs, dim=1)


class NativeSparseAttention(nn.Module):
    """Self-attention with NSA's compressed, selected and sliding-window branches.

    Each branch has its own key/value projection (the paper's default: shared
    K/V lets branches learn shortcuts); ``shared_kv=True`` uses one for all.
    Rotary embeddings rotate queries and keys by global token position; a
    compressed token is rotated by the position of its block's last token, the
    first query that may see it. Gates are ``sigmoid(Linear(x))``, one per head
    and branch. Under context parallelism ``comm_stats`` accumulates the bytes
    this rank exchanged (reset it per step). ``forward(x, cu_seqlens=...)`` takes
    packed documents, each attending only to itself.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        v_head_dim: int | None = None,
        config: NSAConfig = NSAConfig(),
        backend: ops.Backend = "auto",
        *,
        shared_kv: bool = False,
        rotary_base: float = 10000.0,
        compress_hidden_size: int | None = None,
        bias: bool = False,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("num_heads", num_heads),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if value <= 0:
                raise ValueError(f"{name} ({value}) must be positive")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if head_dim % 2:
            raise ValueError(f"head_dim ({head_dim}) must be even for rotary embeddings")
        ops.resolve_backend(backend, torch.empty(0))
        self.config, self.backend = config, backend
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim, self.v_head_dim = head_dim, v_head_dim or head_dim
        self.rotary_base = rotary_base
        self.num_kv_projections = 1 if shared_kv else len(BRANCHES)
        factory = {"device": device, "dtype": dtype}

        kv_width = num_kv_heads * (self.head_dim + self.v_head_dim)
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias, **factory)
        self.kv_proj = nn.Linear(hidden_size, self.num_kv_projections * kv_width, bias=bias, **factory)
        self.compress_k = BlockCompressor(num_kv_heads, self.head_dim, config, compress_hidden_size, **factory)
        self.compress_v = BlockCompressor(num_kv_heads, self.v_head_dim, config, compress_hidden_size, **factory)
        self.gate_proj = nn.Linear(hidden_size, num_heads * len(BRANCHES), bias=True, **factory)
        self.o_proj = nn.Linear(num_heads * self.v_head_dim, hidden_size, bias=bias, **factory)
        self.comm_stats = CommStats()

    def _branch_kv(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values per branch, each ``[B, T, G, dim]``."""
        batch, seq = x.shape[:2]
        kv = self.kv_proj(x).view(batch, seq, self.num_kv_projections, self.num_kv_heads,
                                  self.head_dim + self.v_head_dim)
        pairs = [(kv[:, :, i, :, : self.head_dim], kv[:, :, i, :, self.head_dim:])
                 for i in range(self.num_kv_projections)]
        return pairs * (len(BRANCHES) // self.num_kv_projections)

    def forward(
        self,
        x: torch.Tensor,
        *,
        cp_group: "torch.distributed.ProcessGroup | None" = None,
        cp_layout: str = "contiguous",
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x [B, T, hidden] -> [B, T, hidden]``.

        With ``cp_group``, ``x`` is this rank's shard ``[B, T/P, hidden]`` of a
        sequence laid out by ``cp_layout`` (``"contiguous"`` or Megatron's
        ``"zigzag"``); every rank of the group must call forward together.
        With ``cu_seqlens``, ``x [1, T, hidden]`` packs documents back to back
        (boundaries ``[0, ..., T]``) and each attends only to itself; with ``cp_group``
        too, ``x`` holds this rank's ``cp_layout`` share of every document, back to back.
        """
        if cp_layout not in CP_LAYOUTS:
            raise ValueError(f"cp_layout ({cp_layout!r}) must be one of {CP_LAYOUTS}")
        if x.dim() != 3:
            raise ValueError(f"x must be [batch, seq, hidden], got shape {tuple(x.shape)}")
        batch, seq = x.shape[:2]
        if cu_seqlens is not None:
            if batch != 1:
                raise ValueError(f"a packed sequence (cu_seqlens) is one row: batch must be 1, got {batch}")
            world = 1 if cp_group is None else torch.distributed.get_world_size(cp_group)
            # Each document's positions start at 0: the table covers the longest.
            longest = max((b - a for a, b in document_bounds(cu_seqlens, seq * world)), default=0)
            positions = torch.arange(longest, device=x.device)
        elif cp_group is None:
            positions = torch.arange(seq, device=x.device)
        else:
            world = torch.distributed.get_world_size(cp_group)
            layout = ShardLayout(cp_layout, world, seq * world)
            layout.check_divisible(self.config.select_block_size)
            positions = layout.local_positions(torch.distributed.get_rank(cp_group), x.device)
        cos, sin = rotary_angles(positions, self.head_dim, self.rotary_base)
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim)
        gate_logits = self.gate_proj(x).view(batch, seq, self.num_heads, len(BRANCHES))
        if cu_seqlens is not None:
            out = packed_nsa_branches(q, self._branch_kv(x), gate_logits, self.compress_k, self.compress_v,
                                      cos, sin, self.config, cu_seqlens, self.backend,
                                      cp_group=cp_group, cp_layout=cp_layout, cp_stats=self.comm_stats)
        elif cp_group is None:
            out = nsa_branches(q, self._branch_kv(x), gate_logits, self.compress_k, self.compress_v,
                               cos, sin, self.config, self.backend)
        else:
            out = context_parallel_nsa_branches(
                q, self._branch_kv(x), gate_logits, self.compress_k, self.compress_v, cos, sin, self.config,
                cp_group, cp_layout, self.backend, self.comm_stats)
        return self.o_proj(out.reshape(batch, seq, self.num_heads * self.v_head_dim))
