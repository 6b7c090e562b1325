"""``NativeSparseAttention``: the full NSA layer as a plain ``torch.nn.Module`` (no Megatron needed)."""
from __future__ import annotations

import torch
from torch import nn

from . import ops
from .compression import BlockCompressor
from .config import NSAConfig
from .context_parallel import DEFAULT_LAYOUT, CommStats, ContextParallel, check_layout
from .core import KV, BranchKV, Compressors, document_bounds, nsa_core, token_positions
from .rotary import rotary_angles

NUM_BRANCHES = len(BranchKV._fields)


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
        self.num_kv_projections = 1 if shared_kv else NUM_BRANCHES
        factory = {"device": device, "dtype": dtype}

        kv_width = num_kv_heads * (self.head_dim + self.v_head_dim)
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias, **factory)
        self.kv_proj = nn.Linear(hidden_size, self.num_kv_projections * kv_width, bias=bias, **factory)
        self.compress_k = BlockCompressor(num_kv_heads, self.head_dim, config, compress_hidden_size, **factory)
        self.compress_v = BlockCompressor(num_kv_heads, self.v_head_dim, config, compress_hidden_size, **factory)
        self.gate_proj = nn.Linear(hidden_size, num_heads * NUM_BRANCHES, bias=True, **factory)
        self.o_proj = nn.Linear(num_heads * self.v_head_dim, hidden_size, bias=bias, **factory)
        self.comm_stats = CommStats()

    def _branch_kv(self, x: torch.Tensor) -> BranchKV:
        """Keys and values per branch, each ``[B, T, G, dim]``."""
        batch, seq = x.shape[:2]
        kv = self.kv_proj(x).view(batch, seq, self.num_kv_projections, self.num_kv_heads,
                                  self.head_dim + self.v_head_dim)
        pairs = [KV(kv[:, :, i, :, : self.head_dim], kv[:, :, i, :, self.head_dim:])
                 for i in range(self.num_kv_projections)]
        return BranchKV(*pairs * (NUM_BRANCHES // self.num_kv_projections))

    def forward(
        self,
        x: torch.Tensor,
        *,
        cp_group: torch.distributed.ProcessGroup | None = None,
        cp_layout: str = DEFAULT_LAYOUT,
        cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x [B, T, hidden] -> [B, T, hidden]``.

        With ``cp_group``, ``x`` is this rank's shard ``[B, T/P, hidden]`` of a
        sequence laid out by ``cp_layout`` (Megatron's ``"zigzag"``, or ``"contiguous"``);
        every rank of the group must call forward together.
        With ``cu_seqlens``, ``x [1, T, hidden]`` packs documents back to back
        (boundaries ``[0, ..., T]``) and each attends only to itself; with ``cp_group``
        too, ``x`` holds this rank's ``cp_layout`` share of every document, back to back.
        """
        check_layout(cp_layout)
        ops.resolve_backend(self.backend, x)  # before the projections: the backend may not take x
        cp = None if cp_group is None else ContextParallel(cp_group, cp_layout, self.comm_stats)
        if x.dim() != 3:
            raise ValueError(f"x must be [batch, seq, hidden], got shape {tuple(x.shape)}")
        batch, seq = x.shape[:2]
        documents = None
        if cu_seqlens is not None:
            if batch != 1:
                raise ValueError(f"a packed sequence (cu_seqlens) is one row: batch must be 1, got {batch}")
            documents = [document_bounds(cu_seqlens, seq * (1 if cp is None else cp.world_size))]
        rotary = rotary_angles(token_positions(seq, cp=cp, documents=documents, device=x.device), self.head_dim,
                               self.rotary_base)
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim)
        gate_logits = self.gate_proj(x).view(batch, seq, self.num_heads, NUM_BRANCHES)
        out = nsa_core(q, self._branch_kv(x), gate_logits, Compressors(self.compress_k, self.compress_v),
                       self.config, rotary=rotary, documents=documents, cp=cp, backend=self.backend)
        return self.o_proj(out.reshape(batch, seq, self.num_heads * self.v_head_dim))
