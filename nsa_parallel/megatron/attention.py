"""``NSASelfAttention``: NSA as a Megatron-core self-attention module (``[seq, batch, hidden]``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from .. import ops
from ..compression import BlockCompressor
from ..config import NSAConfig
from ..context_parallel import DEFAULT_LAYOUT, CommStats, ContextParallel
from ..core import KV, BranchKV, Bounds, Compressors, document_bounds, nsa_core, token_positions
from ..layer import NUM_BRANCHES
from ..rotary import Rotary, rotary_angles


@dataclass
class NSASelfAttentionSubmodules:
    """Linear layers of :class:`NSASelfAttention` (column-parallel in, row-parallel out)."""

    linear_q: ModuleSpec | type | None = None
    linear_kv: ModuleSpec | type | None = None
    linear_gate: ModuleSpec | type | None = None
    linear_proj: ModuleSpec | type | None = None


def check_nsa_parallel_sizes(config: TransformerConfig, tp_size: int) -> None:
    """Raises ``ValueError`` naming the field when heads or KV groups cannot be split over ``tp_size``."""
    heads = config.num_attention_heads
    groups = config.num_query_groups or heads
    if heads % groups:
        raise ValueError(f"num_attention_heads ({heads}) must be a multiple of num_query_groups ({groups})")
    if heads % tp_size:
        raise ValueError(
            f"num_attention_heads ({heads}) must be divisible by tensor_model_parallel_size ({tp_size})")
    if groups % tp_size:
        raise ValueError(
            f"num_query_groups ({groups}) must be divisible by tensor_model_parallel_size ({tp_size}) "
            "for NSA: each rank owns whole KV groups with their compression weights")
    if config.kv_channels is None or config.kv_channels % 2:
        raise ValueError(f"kv_channels ({config.kv_channels}) must be even for rotary embeddings")


class NSASelfAttention(MegatronModule):
    """Native Sparse Attention with Megatron's tensor/sequence parallel linear layers.

    Each TP rank owns ``H/tp`` query heads and ``G/tp`` KV groups, with the
    compression ``phi`` of those groups. Projection outputs are laid out
    head/group-major (``linear_kv``: ``[G, branch, dk + dv]``, ``linear_gate``:
    ``[H, branch]``) so that concatenating the ranks' shards along dim 0 gives
    the TP=1 layout, which is what lets checkpoints change TP size. Keys and
    values use ``kv_channels`` for both head dims. Rotary: Megatron's
    ``rotary_pos_emb`` when the model passes one (``position_embedding_type
    ="rope"``), otherwise NSA's own with base ``rotary_base``; attention is
    always causal. With ``context_parallel_size > 1`` the module runs NSA's own
    context parallelism over Megatron's CP group on Megatron's zigzag layout
    (``cp_comm_type`` is ignored); ``comm_stats`` accumulates the bytes exchanged.
    Documents: packed sequences (``packed_seq_params`` in ``thd`` format, ``[tokens, 1, hidden]``;
    under CP each rank holds its zigzag share of every document) or, without CP, a causal mask with
    document resets (Megatron-LM's ``--reset-attention-mask``); each document is NSA on its own,
    positions from 0.
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: NSASelfAttentionSubmodules,
        layer_number: int,
        attn_mask_type: AttnMaskType = AttnMaskType.causal,
        nsa_config: NSAConfig | None = None,
        backend: ops.Backend = "auto",
        rotary_base: float = 10000.0,
        cp_comm_type: str | None = None,
        pg_collection: Any = None,
        pp_layer_offset: int | None = None,  # passed by TransformerLayer in megatron-core >= 0.19; unused
        name: str | None = None,  # passed by TransformerLayer in megatron-core >= 0.19; unused
    ):
        super().__init__(config=config)
        nsa_config = NSAConfig() if nsa_config is None else nsa_config
        if not isinstance(nsa_config, NSAConfig):
            raise ValueError(f"nsa_config must be an NSAConfig, got {type(nsa_config).__name__}")
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"attn_mask_type ({attn_mask_type}) must be AttnMaskType.causal: NSA is causal")
        ops.resolve_backend(backend, torch.empty(0))
        self.tp_group = pg_collection.tp if pg_collection is not None else \
            parallel_state.get_tensor_model_parallel_group()
        tp_size = torch.distributed.get_world_size(self.tp_group)
        tp_rank = torch.distributed.get_rank(self.tp_group)
        check_nsa_parallel_sizes(config, tp_size)
        self.comm_stats = CommStats()
        self.cp = None  # Megatron's zigzag layout: its batch slicing and rotary embeddings shard that way
        if config.context_parallel_size > 1:
            cp_group = getattr(pg_collection, "cp", None) or parallel_state.get_context_parallel_group()
            self.cp = ContextParallel(cp_group, DEFAULT_LAYOUT, self.comm_stats)

        self.layer_number, self.nsa_config, self.backend = layer_number, nsa_config, backend
        self.rotary_base = rotary_base
        self.head_dim = config.kv_channels
        groups = config.num_query_groups or config.num_attention_heads
        self.heads_local = config.num_attention_heads // tp_size
        self.groups_local = groups // tp_size
        dk = self.head_dim
        nb = NUM_BRANCHES
        column = dict(config=config, init_method=config.init_method, gather_output=False,
                      skip_bias_add=False, is_expert=False, tp_group=self.tp_group)
        qkv_bias = config.add_bias_linear or config.add_qkv_bias
        self.linear_q = build_module(submodules.linear_q, config.hidden_size, config.num_attention_heads * dk,
                                     bias=qkv_bias, tp_comm_buffer_name="nsa_q", **column)
        self.linear_kv = build_module(submodules.linear_kv, config.hidden_size, groups * nb * 2 * dk,
                                      bias=qkv_bias, tp_comm_buffer_name="nsa_kv", **column)
        self.linear_gate = build_module(submodules.linear_gate, config.hidden_size, config.num_attention_heads * nb,
                                        bias=True, tp_comm_buffer_name="nsa_gate", **column)
        self.linear_proj = build_module(
            submodules.linear_proj, config.num_attention_heads * dk, config.hidden_size, config=config,
            init_method=config.output_layer_init_method, bias=config.add_bias_linear, input_is_parallel=True,
            skip_bias_add=True, is_expert=False, tp_comm_buffer_name="proj", tp_group=self.tp_group)

        device = torch.device("cpu") if config.use_cpu_initialization else torch.cuda.current_device()
        factory = {"device": device, "dtype": config.params_dtype}
        self.compress_k = BlockCompressor(self.groups_local, dk, nsa_config, **factory)
        self.compress_v = BlockCompressor(self.groups_local, dk, nsa_config, **factory)
        if tp_size > 1:
            # Initialise as the TP=1 model would, then keep this rank's groups: the
            # default RNG is seeded alike on all TP ranks, so groups would repeat.
            first = tp_rank * self.groups_local
            for local in (self.compress_k, self.compress_v):
                full = BlockCompressor(groups, dk, nsa_config, dtype=config.params_dtype)
                with torch.no_grad():
                    for p, p_full in zip(local.parameters(), full.parameters()):
                        p.copy_(p_full[first:first + self.groups_local])
        # Marks phi as TP-sharded on dim 0, so Megatron's grad-norm and checkpoint
        # utilities count each rank's groups once instead of as duplicates.
        for p in (*self.compress_k.parameters(), *self.compress_v.parameters()):
            set_tensor_model_parallel_attributes(p, is_parallel=True, dim=0, stride=1)

    def _rotary(self, seq: int, documents: list[Bounds] | None, rotary_pos_emb: Any, packed: bool,
                device: torch.device) -> Rotary:
        """cos/sin of the ``seq`` local tokens: NSA's own at their positions, or Megatron's
        ``rotary_pos_emb`` (``[s, 1, 1, dim]``, row ``p`` for position ``p``; under context parallelism,
        except for packed sequences, Megatron already kept this rank's rows, in local order)."""
        positions = token_positions(seq, cp=self.cp, documents=documents, device=device)
        if rotary_pos_emb is None:
            return rotary_angles(positions, self.head_dim, self.rotary_base)
        if isinstance(rotary_pos_emb, tuple):
            raise NotImplementedError("NSASelfAttention takes one rotary_pos_emb tensor, not a (q, k) pair")
        if self.config.rotary_interleaved:
            raise NotImplementedError("NSASelfAttention does not support rotary_interleaved")
        freqs = rotary_pos_emb.reshape(rotary_pos_emb.shape[0], -1)
        local_rows = self.cp is not None and not packed
        needed = seq if documents is None else max(b - a for bounds in documents for a, b in bounds)
        if freqs.shape[-1] != self.head_dim or freqs.shape[0] < needed:
            raise NotImplementedError(
                f"rotary_pos_emb of shape {tuple(rotary_pos_emb.shape)} must cover all {needed} positions and all "
                f"{self.head_dim} channels of a head (rotary_percent < 1 is not supported)")
        freqs = freqs[:seq] if local_rows or documents is None else freqs[positions]
        return Rotary(freqs.cos(), freqs.sin())

    def _packed_documents(self, packed_seq_params: Any, hidden_states: torch.Tensor) -> list[tuple[int, int]]:
        """Document boundaries of a packed (``thd``) batch, checked before any work. With padding
        (``cu_seqlens_q_padded``) a document runs with the pad tokens after it, which its own
        tokens never see (causal), so their outputs are exact."""
        qkv_format = getattr(packed_seq_params, "qkv_format", None)
        if qkv_format != "thd":
            raise NotImplementedError(f"packed_seq_params.qkv_format must be 'thd' for NSA, got {qkv_format!r}")
        if hidden_states.shape[1] != 1:
            raise ValueError(f"packed sequences are one row: hidden_states must be [tokens, 1, hidden], "
                             f"got batch {hidden_states.shape[1]}")
        p = packed_seq_params
        for q_name, kv_name in (("cu_seqlens_q", "cu_seqlens_kv"), ("cu_seqlens_q_padded", "cu_seqlens_kv_padded")):
            cu_q, cu_kv = getattr(p, q_name, None), getattr(p, kv_name, None)
            if cu_q is not None and cu_kv is not None and not torch.equal(cu_q, cu_kv):
                raise ValueError(f"packed_seq_params.{q_name} must equal {kv_name} (self-attention)")
        cu = p.cu_seqlens_q_padded if getattr(p, "cu_seqlens_q_padded", None) is not None else p.cu_seqlens_q
        if cu is None:
            raise ValueError("packed_seq_params.cu_seqlens_q must be set")
        tokens = hidden_states.shape[0]
        if self.config.sequence_parallel:  # each TP rank holds a slice of the sequence
            tokens *= torch.distributed.get_world_size(self.tp_group)
        if self.cp is not None:  # and each CP rank its share of every document
            tokens *= self.cp.world_size
        return document_bounds(cu, tokens)

    def _mask_documents(self, attention_mask: torch.Tensor | None, seq: int, batch: int) -> list[Bounds] | None:
        """``None`` for no mask or a causal one; for a causal mask with document resets (Megatron-LM's
        ``--reset-attention-mask``) the document boundaries of each row; anything else raises.

        Megatron's convention: True = masked out. Telling causal from padding takes O(s) checks;
        only a mask that is not causal is compared whole (O(s^2), as much as building it took).
        """
        if attention_mask is None:
            return None
        if self.cp is not None:
            self._check_causal_shard_mask(attention_mask, seq)
            return None
        if attention_mask.shape[-2:] != (seq, seq):
            raise ValueError(f"attention_mask must be [..., {seq}, {seq}], got shape {tuple(attention_mask.shape)}")
        last_row_sees_all = not attention_mask[..., -1, :].any()
        first_row_sees_self_only = bool(attention_mask[..., 0, 1:].all()) and not attention_mask[..., 0, 0].any()
        if last_row_sees_all and first_row_sees_self_only:
            return None
        rows = attention_mask.reshape(-1, seq, seq)
        if rows.shape[0] not in (1, batch):
            raise ValueError(f"attention_mask must be [1 or {batch}, 1, {seq}, {seq}], got shape "
                             f"{tuple(attention_mask.shape)}")
        t = torch.arange(seq, device=rows.device)
        documents = []
        for mask in rows:
            # A document starts where a token may not see the one before it.
            starts = torch.cat([t[:1], t[1:][mask[t[1:], t[1:] - 1]]])
            doc = torch.zeros(seq, dtype=torch.long, device=rows.device)
            doc[starts] = 1
            doc = doc.cumsum(0)
            expected = (t[None, :] > t[:, None]) | (doc[None, :] != doc[:, None])
            if not torch.equal(mask, expected):
                raise NotImplementedError("NSASelfAttention is causal; attention_mask must be None, causal, or "
                                          "causal with document resets (padding and custom masks are not supported)")
            documents.append(document_bounds(torch.cat([starts, t.new_tensor([seq])]), seq))
        return documents * (batch // len(documents))

    def _check_causal_shard_mask(self, attention_mask: torch.Tensor, seq: int) -> None:
        """Under CP Megatron slices the mask's query rows per rank: ``[..., seq, full]``, row ``j`` at
        global position ``p_j``. Causal iff every row sees token 0 and itself and not ``p_j + 1``."""
        full = seq * self.cp.world_size
        if attention_mask.shape[-2:] != (seq, full):
            raise ValueError(f"attention_mask under context parallelism must be [..., {seq}, {full}], "
                             f"got shape {tuple(attention_mask.shape)}")
        rows = attention_mask.reshape(-1, seq, full)
        pos = token_positions(seq, cp=self.cp, device=rows.device)
        j = torch.arange(seq, device=rows.device)
        has_next = pos + 1 < full
        causal = (not rows[:, :, 0].any() and not rows[:, j, pos].any()
                  and bool(rows[:, j[has_next], pos[has_next] + 1].all()))
        if not causal:
            raise NotImplementedError("NSASelfAttention under context parallelism is causal; attention_mask must "
                                      "be None or causal (document resets, padding and custom masks are not "
                                      "supported)")

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        key_value_states: torch.Tensor | None = None,
        inference_context: Any = None,
        rotary_pos_emb: Any = None,
        rotary_pos_cos: torch.Tensor | None = None,
        rotary_pos_sin: torch.Tensor | None = None,
        rotary_pos_cos_sin: torch.Tensor | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: Any = None,
        sequence_len_offset: Any = None,
        *,
        inference_params: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``hidden_states [s, b, h]`` (``[s/tp, b, h]`` with sequence parallelism) -> ``(output, bias)``."""
        if key_value_states is not None:
            raise ValueError("NSASelfAttention is self-attention; key_value_states (cross attention) is not supported")
        packed = None if packed_seq_params is None else self._packed_documents(packed_seq_params, hidden_states)
        if inference_context is not None or inference_params is not None:
            raise NotImplementedError("NSASelfAttention has no KV cache for inference (inference_context)")
        if attention_bias is not None:
            raise NotImplementedError("NSASelfAttention does not support attention_bias")
        if any(t is not None for t in (rotary_pos_cos, rotary_pos_sin, rotary_pos_cos_sin)):
            raise NotImplementedError("NSASelfAttention takes rotary_pos_emb, not precomputed rotary cos/sin")

        q, _ = self.linear_q(hidden_states)  # column-parallel: gathers the sequence under SP
        kv, _ = self.linear_kv(hidden_states)
        gate_logits, _ = self.linear_gate(hidden_states)
        seq, batch = q.shape[:2]
        # Packed documents are masked by their boundaries, whatever mask comes with them.
        documents = [packed] if packed is not None else self._mask_documents(attention_mask, seq, batch)
        nb, dk = NUM_BRANCHES, self.head_dim
        q = q.view(seq, batch, self.heads_local, dk).transpose(0, 1)
        kv = kv.view(seq, batch, self.groups_local, nb, 2 * dk).transpose(0, 1)
        branch_kv = BranchKV(*(KV(kv[:, :, :, i, :dk], kv[:, :, :, i, dk:]) for i in range(nb)))
        gate_logits = gate_logits.view(seq, batch, self.heads_local, nb).transpose(0, 1)
        rotary = self._rotary(seq, documents, rotary_pos_emb, packed is not None, q.device)
        out = nsa_core(q, branch_kv, gate_logits, Compressors(self.compress_k, self.compress_v), self.nsa_config,
                       rotary=rotary, documents=documents, cp=self.cp, backend=self.backend)
        out = out.transpose(0, 1).reshape(seq, batch, self.heads_local * dk)
        return self.linear_proj(out)  # row-parallel: reduce(-scatter under SP), bias returned apart

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> ShardedStateDict:
        """Linear layers shard as Megatron's do; ``phi`` shards along its KV-group dim 0."""
        # The same data-parallel replica group Megatron's own layers use.
        dp_cp_group = (metadata or {}).get("dp_cp_group") or \
            parallel_state.get_data_parallel_group(with_context_parallel=True)
        sharded = {}
        for name, module in self.named_children():
            if isinstance(module, BlockCompressor):
                state = module.state_dict(prefix="", keep_vars=True)
                sharded.update(make_sharded_tensors_for_checkpoint(
                    state, f"{prefix}{name}.", {key: 0 for key in state}, sharded_offsets,
                    tp_group=self.tp_group, dp_cp_group=dp_cp_group))
            else:
                sharded.update(module.sharded_state_dict(f"{prefix}{name}.", sharded_offsets, metadata))
        return sharded
