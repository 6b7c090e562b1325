"""``NSASelfAttention``: NSA as a Megatron-core self-attention module (``[seq, batch, hidden]``).

It follows Megatron's ``Attention``: every submodule comes from the layer spec (the linear layers
from Megatron's backend spec provider, local or Transformer Engine; NSA's core in
``core_attention``), projections are column-parallel in and row-parallel out, and selective
recomputation of ``core_attn`` recomputes the core. Every ``TransformerConfig`` field that changes
attention is honoured or refused by name (:func:`check_nsa_config`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import deprecate_inference_params

from .. import ops
from ..core import KV, BranchKV, Bounds, token_positions
from ..layer import NUM_BRANCHES
from ..rotary import Rotary, rotary_angles
from .documents import check_causal_rows, mask_documents, packed_documents
from .inference import cached_core_attention, static_step_offset


@dataclass
class NSASelfAttentionSubmodules:
    """What :class:`NSASelfAttention` is built of: column-parallel ``linear_q`` (``H*dk``), ``linear_kv``
    (``G*3*2*dk``, the three branches' keys and values), ``linear_gate`` (``3*H``), the core
    (:class:`~nsa_parallel.megatron.NSACoreAttention`), row-parallel ``linear_proj``, and the per-head
    norms of queries and keys (``IdentityOp`` unless ``qk_layernorm``)."""

    linear_q: ModuleSpec | type | None = None
    linear_kv: ModuleSpec | type | None = None
    linear_gate: ModuleSpec | type | None = None
    core_attention: ModuleSpec | type | None = None
    linear_proj: ModuleSpec | type | None = None
    q_layernorm: ModuleSpec | type = IdentityOp
    k_layernorm: ModuleSpec | type = IdentityOp


def _refuse(field: str, value: Any, why: str) -> None:
    raise ValueError(f"{field} ({value!r}) {why}")


def check_nsa_config(config: TransformerConfig, tp_size: int, submodules: NSASelfAttentionSubmodules,
                     attn_mask_type: AttnMaskType = AttnMaskType.causal) -> None:
    """Raises ``ValueError`` naming the ``TransformerConfig`` field NSA cannot honour (before any allocation).

    Honoured elsewhere: ``softmax_scale`` (default ``1/sqrt(kv_channels)``), ``qk_layernorm`` (the spec's
    norms), ``init_method`` / ``perform_initialization`` / ``use_cpu_initialization`` (``phi`` too),
    ``add_bias_linear`` / ``add_qkv_bias``, ``sequence_parallel``, ``context_parallel_size``.
    ``attention_softmax_in_fp32``: NSA's kernels take every softmax in fp32, so False (Megatron-LM's
    default, which asks for no more than the input precision) gets at least what it asks for.
    ``apply_query_key_layer_scaling`` only rescales scores that are unscaled again before the softmax,
    to keep fp16 in range, which fp32 softmax does not need: the attention is unchanged.
    """
    if attn_mask_type != AttnMaskType.causal:
        _refuse("attn_mask_type", attn_mask_type, "must be AttnMaskType.causal: NSA is causal")
    heads = config.num_attention_heads
    groups = config.num_query_groups or heads
    if heads % groups:
        _refuse("num_attention_heads", heads, f"must be a multiple of num_query_groups ({groups})")
    if heads % tp_size:
        _refuse("num_attention_heads", heads, f"must be divisible by tensor_model_parallel_size ({tp_size})")
    if groups % tp_size:
        _refuse("num_query_groups", groups, f"must be divisible by tensor_model_parallel_size ({tp_size}) for "
                "NSA: each rank owns whole KV groups with their compression weights")
    if config.kv_channels is None or config.kv_channels % 2:
        _refuse("kv_channels", config.kv_channels, "must be even for rotary embeddings")
    if config.attention_dropout:
        _refuse("attention_dropout", config.attention_dropout, "must be 0: NSA's kernels have no dropout on "
                "attention probabilities")
    if config.window_size is not None:
        _refuse("window_size", config.window_size, "must be None: NSA's sliding window is NSAConfig.window_size")
    if config.softmax_type != "vanilla":
        _refuse("softmax_type", config.softmax_type, "must be 'vanilla': NSA's softmax has no offset")
    if config.rotary_interleaved:
        _refuse("rotary_interleaved", True, "must be False: NSA rotates halves (rotate-half rotary)")
    if getattr(config, "no_rope_freq", None) is not None:
        _refuse("no_rope_freq", config.no_rope_freq, "must be None: NSA rotates every layer's queries and keys")
    for field, why in (
        ("apply_rope_fusion", "NSA rotates queries and keys itself (compressed keys at their block's last token)"),
        ("fused_single_qkv_rope", "NSA rotates queries and keys itself"),
        ("multi_latent_attention", "NSA is not multi-latent attention"),
        ("qk_l2_norm", "NSA's query/key norm is qk_layernorm"),
        ("qk_clip", "NSA's kernels do not return attention logits"),
        ("log_max_attention_logit", "NSA's kernels do not return attention logits"),
        ("attention_output_gate", "NSA has its own branch gates"),
        ("flash_decode", "NSA generates with its own KV cache and decode kernels"),
    ):
        if getattr(config, field, False):
            _refuse(field, True, f"must be False: {why}")
    if config.qk_layernorm and submodules.q_layernorm is IdentityOp:
        _refuse("qk_layernorm", True, "needs query/key norms in the layer spec: build it with "
                "get_gpt_layer_nsa_spec(qk_layernorm=True)")


class NSASelfAttention(MegatronModule):
    """Native Sparse Attention with Megatron's tensor/sequence parallel linear layers.

    Each TP rank owns ``H/tp`` query heads and ``G/tp`` KV groups (and, in ``core_attention``, the
    compression ``phi`` of those groups). Projection outputs are laid out head/group-major
    (``linear_kv``: ``[G, branch, dk + dv]``, ``linear_gate``: ``[H, branch]``) so that concatenating
    the ranks' shards along dim 0 gives the TP=1 layout, which is what lets checkpoints change TP size.
    Keys and values use ``kv_channels`` for both head dims. Rotary: Megatron's ``rotary_pos_emb`` when
    the model passes one (``position_embedding_type="rope"``), otherwise NSA's own with base
    ``rotary_base``; attention is always causal. Documents: packed sequences (``packed_seq_params`` in
    ``thd`` format, ``[tokens, 1, hidden]``; under CP each rank holds its zigzag share of every
    document) or, without CP, a causal mask with document resets (Megatron-LM's
    ``--reset-attention-mask``); each document is NSA on its own, positions from 0. Generation: with
    Megatron's ``StaticInferenceContext`` each layer keeps an ``NSAKVCache`` in it (:mod:`.inference`).
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: NSASelfAttentionSubmodules,
        layer_number: int,
        attn_mask_type: AttnMaskType = AttnMaskType.causal,
        rotary_base: float = 10000.0,
        cp_comm_type: str | None = None,
        pg_collection: Any = None,
        pp_layer_offset: int | None = None,  # passed by TransformerLayer in megatron-core >= 0.19; unused
        name: str | None = None,  # passed by TransformerLayer in megatron-core >= 0.19; unused
    ):
        super().__init__(config=config)
        self.tp_group = pg_collection.tp if pg_collection is not None else \
            parallel_state.get_tensor_model_parallel_group()
        tp_size = self.tp_group.size()
        check_nsa_config(config, tp_size, submodules, attn_mask_type)
        self.layer_number, self.attn_mask_type, self.rotary_base = layer_number, attn_mask_type, rotary_base
        self.head_dim = dk = config.kv_channels
        heads, groups = config.num_attention_heads, config.num_query_groups or config.num_attention_heads
        self.heads_local, self.groups_local = heads // tp_size, groups // tp_size
        column = dict(config=config, init_method=config.init_method, gather_output=False, skip_bias_add=False,
                      is_expert=False, tp_group=self.tp_group)
        qkv_bias = config.add_bias_linear or config.add_qkv_bias
        self.linear_q = build_module(submodules.linear_q, config.hidden_size, heads * dk, bias=qkv_bias,
                                     tp_comm_buffer_name="nsa_q", **column)
        self.linear_kv = build_module(submodules.linear_kv, config.hidden_size, groups * NUM_BRANCHES * 2 * dk,
                                      bias=qkv_bias, tp_comm_buffer_name="nsa_kv", **column)
        self.linear_gate = build_module(submodules.linear_gate, config.hidden_size, heads * NUM_BRANCHES, bias=True,
                                        tp_comm_buffer_name="nsa_gate", **column)
        norm = dict(hidden_size=dk, config=config, eps=config.layernorm_epsilon)
        self.q_layernorm = build_module(submodules.q_layernorm, **norm)
        self.k_layernorm = build_module(submodules.k_layernorm, **norm)
        self.core_attention = build_module(
            submodules.core_attention, config=config, layer_number=layer_number, attn_mask_type=attn_mask_type,
            attention_type="self", cp_comm_type=cp_comm_type, softmax_scale=config.softmax_scale,
            pg_collection=pg_collection)
        self.linear_proj = build_module(
            submodules.linear_proj, heads * dk, config.hidden_size, config=config,
            init_method=config.output_layer_init_method, bias=config.add_bias_linear, input_is_parallel=True,
            skip_bias_add=True, is_expert=False, tp_comm_buffer_name="proj", tp_group=self.tp_group)
        self.checkpoint_core_attention = (config.recompute_granularity == "selective"
                                          and "core_attn" in (config.recompute_modules or ()))

    def _documents(self, attention_mask: torch.Tensor | None, packed_seq_params: Any, seq: int,
                   batch: int) -> list[Bounds] | None:
        """Per batch row, the documents it packs; ``None``: one causal sequence per row."""
        cp = self.core_attention.cp
        if packed_seq_params is not None:  # documents by their boundaries, whatever mask comes with them
            return [packed_documents(packed_seq_params, seq * (1 if cp is None else cp.world_size), batch)]
        if cp is None:
            return mask_documents(attention_mask, seq, batch)
        if attention_mask is not None:
            check_causal_rows(attention_mask, token_positions(seq, cp=cp), seq * cp.world_size,
                              "under context parallelism")
        return None

    def _rotary(self, seq: int, documents: list[Bounds] | None, rotary_pos_emb: Any, device: torch.device,
                packed: bool) -> Rotary:
        """cos/sin of the ``seq`` local tokens: NSA's own at their positions, or Megatron's
        ``rotary_pos_emb`` (``[s, 1, 1, dim]``, row ``p`` for position ``p``; under context parallelism,
        except for packed sequences, Megatron already kept this rank's rows, in local order)."""
        cp = self.core_attention.cp
        positions = token_positions(seq, cp=cp, documents=documents, device=device)
        if rotary_pos_emb is None:
            return rotary_angles(positions, self.head_dim, self.rotary_base)
        if isinstance(rotary_pos_emb, tuple):
            raise NotImplementedError("NSASelfAttention takes one rotary_pos_emb tensor, not a (q, k) pair")
        freqs = rotary_pos_emb.reshape(rotary_pos_emb.shape[0], -1)
        needed = seq if documents is None else max(b - a for bounds in documents for a, b in bounds)
        if freqs.shape[-1] != self.head_dim or freqs.shape[0] < needed:
            raise NotImplementedError(
                f"rotary_pos_emb of shape {tuple(rotary_pos_emb.shape)} must cover all {needed} positions and all "
                f"{self.head_dim} channels of a head (rotary_percent < 1 is not supported)")
        freqs = freqs[:seq] if documents is None or (cp is not None and not packed) else freqs[positions]
        return Rotary(freqs.cos(), freqs.sin())

    def _core(self, q: torch.Tensor, kv: BranchKV, gate_logits: torch.Tensor, rotary: Rotary,
              documents: list[Bounds] | None) -> torch.Tensor:
        if not (self.checkpoint_core_attention and self.training):
            return self.core_attention(q, kv, gate_logits, rotary=rotary, documents=documents)

        def run(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gate_logits, cos, sin):
            kv = BranchKV(KV(k_cmp, v_cmp), KV(k_slc, v_slc), KV(k_win, v_win))
            return self.core_attention(q, kv, gate_logits, rotary=Rotary(cos, sin), documents=documents)

        # Megatron's selective recomputation of core_attn. Reentrant, as Megatron's own: backward first
        # reruns the whole forward (under context parallelism its collectives in forward order on every
        # rank), then its backward. No random state to restore: NSA has no dropout. torch's checkpoint
        # rather than Megatron's tensor_parallel.checkpoint, which saves CUDA RNG states (none on a CPU).
        return torch.utils.checkpoint.checkpoint(run, q, *(t for pair in kv for t in pair), gate_logits, *rotary,
                                                 use_reentrant=True, preserve_rng_state=False)

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
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``hidden_states [s, b, h]`` (``[s/tp, b, h]`` with sequence parallelism) -> ``(output, bias)``.
        With a static ``inference_context`` (``inference_params``: its old name) the ``s`` tokens sit at
        ``sequence_len_offset`` and attend to the layer's cache there too."""
        if key_value_states is not None:
            raise ValueError("NSASelfAttention is self-attention; key_value_states (cross attention) is not supported")
        inference_context = deprecate_inference_params(inference_context, inference_params)
        if sequence_len_offset is not None:
            raise NotImplementedError("sequence_len_offset comes only with Megatron's flash decode or CUDA graphs, "
                                      "which NSA does not use: it reads the offset from inference_context")
        if attention_bias is not None:
            raise NotImplementedError("NSASelfAttention does not support attention_bias")
        if any(t is not None for t in (rotary_pos_cos, rotary_pos_sin, rotary_pos_cos_sin)):
            raise NotImplementedError("NSASelfAttention takes rotary_pos_emb, not precomputed rotary cos/sin")
        ops.resolve_backend(getattr(self.core_attention, "backend", "auto"), hidden_states)  # before any projection
        seq = hidden_states.shape[0] * (self.tp_group.size() if self.config.sequence_parallel else 1)
        if inference_context is None:
            offset, documents = 0, self._documents(attention_mask, packed_seq_params, seq, hidden_states.shape[1])
        else:
            needs_grad = torch.is_grad_enabled() and hidden_states.requires_grad
            offset, documents = static_step_offset(inference_context, self.config, seq, hidden_states.shape[1],
                                                   attention_mask, packed_seq_params, needs_grad), None

        q, _ = self.linear_q(hidden_states)  # column-parallel: gathers the sequence under SP
        kv, _ = self.linear_kv(hidden_states)
        gate_logits, _ = self.linear_gate(hidden_states)
        batch, dk = q.shape[1], self.head_dim
        q = self.q_layernorm(q.view(seq, batch, self.heads_local, dk))
        kv = kv.view(seq, batch, self.groups_local, NUM_BRANCHES, 2 * dk)
        kv = BranchKV(*(KV(self.k_layernorm(kv[..., i, :dk]), kv[..., i, dk:]) for i in range(NUM_BRANCHES)))
        gate_logits = gate_logits.view(seq, batch, self.heads_local, NUM_BRANCHES)
        # In generation: positions 0 .. offset+seq-1, the cache's and this step's
        rotary = self._rotary(offset + seq, documents, rotary_pos_emb, q.device, packed_seq_params is not None)
        if inference_context is None:
            out = self._core(q, kv, gate_logits, rotary, documents)
        else:
            out = cached_core_attention(inference_context, self.layer_number, self.core_attention, q, kv, gate_logits,
                                        rotary)
        return self.linear_proj(out)  # row-parallel: reduce(-scatter under SP), bias returned apart
