"""Megatron-core layer and block specs whose self-attention is NSA, or torch's fused SDPA (the baseline).

Everything but attention comes from Megatron's own GPT specs
(``get_gpt_layer_local_spec`` / ``get_gpt_layer_with_transformer_engine_spec``),
so norms (apex fused when apex is present, torch otherwise; TE with
``use_transformer_engine``) and the MLP are exactly those of a stock model.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from .. import ops
from ..config import NSAConfig
from .attention import NSASelfAttention, NSASelfAttentionSubmodules
from .core_attention import NSACoreAttention
from .sdpa_attention import SDPACoreAttention

# phi lives in core_attention; its checkpoint keys stay where they were before it moved there.
PHI_KEYS_MAP = {"self_attention.core_attention.compress_": "self_attention.compress_"}


def _backend(use_transformer_engine: bool) -> BackendSpecProvider:
    if not use_transformer_engine:
        return LocalSpecProvider()
    if not gpt_layer_specs.HAVE_TE:
        raise ValueError("use_transformer_engine=True needs transformer_engine installed")
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

    return TESpecProvider()


def _dense_layer_spec(use_transformer_engine: bool, **kwargs: Any) -> ModuleSpec:
    if use_transformer_engine:
        _backend(True)
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(**kwargs)
    return gpt_layer_specs.get_gpt_layer_local_spec(**kwargs)


def nsa_attention_spec(backend: BackendSpecProvider, nsa_config: NSAConfig | None = None,
                       kernel_backend: ops.Backend = "auto", rotary_base: float = 10000.0, qk_layernorm: bool = False,
                       rms_norm: bool = False) -> ModuleSpec:
    """``NSASelfAttention`` built of ``backend``'s linear layers (and query/key norms with ``qk_layernorm``),
    with :class:`NSACoreAttention` (``nsa_config``, ``kernel_backend``) as its core."""
    if nsa_config is not None and not isinstance(nsa_config, NSAConfig):
        raise ValueError(f"nsa_config must be an NSAConfig, got {type(nsa_config).__name__}")
    ops.resolve_backend(kernel_backend, torch.empty(0))
    qk_norm = backend.layer_norm(rms_norm=rms_norm, for_qk=True) if qk_layernorm else IdentityOp
    core = ModuleSpec(module=NSACoreAttention,
                      params={"nsa_config": nsa_config or NSAConfig(), "backend": kernel_backend})
    return ModuleSpec(
        module=NSASelfAttention,
        params={"attn_mask_type": AttnMaskType.causal, "rotary_base": rotary_base},
        submodules=NSASelfAttentionSubmodules(
            linear_q=backend.column_parallel_linear(), linear_kv=backend.column_parallel_linear(),
            linear_gate=backend.column_parallel_linear(), core_attention=core,
            linear_proj=backend.row_parallel_linear(), q_layernorm=qk_norm, k_layernorm=qk_norm),
    )


def get_gpt_layer_nsa_spec(
    nsa_config: NSAConfig | None = None,
    backend: ops.Backend = "auto",
    rotary_base: float = 10000.0,
    use_transformer_engine: bool = False,
    **kwargs: Any,
) -> ModuleSpec:
    """A ``TransformerLayer`` spec like Megatron's GPT layer spec, with NSA self-attention.

    ``kwargs`` go to Megatron's ``get_gpt_layer_local_spec`` (or the Transformer Engine spec with
    ``use_transformer_engine``), e.g. ``normalization="RMSNorm"``, ``qk_layernorm=True`` or
    ``num_experts``; NSA's linear layers and norms come from the same backend spec provider. NSA
    hyper-parameters travel in ``nsa_config`` (the core attention's spec params) and ``backend`` picks
    its kernels; ``rotary_base`` is used when the model passes no ``rotary_pos_emb``
    (``position_embedding_type="none"``).
    """
    if kwargs.get("multi_latent_attention"):
        raise ValueError("multi_latent_attention cannot be combined with NSA attention")
    provider = _backend(use_transformer_engine)
    dense = _dense_layer_spec(use_transformer_engine, **kwargs)
    rms_norm = kwargs.get("normalization") == "RMSNorm"
    attention = nsa_attention_spec(provider, nsa_config, backend, rotary_base, bool(kwargs.get("qk_layernorm")),
                                   rms_norm)
    # Megatron maps input_layernorm onto linear_qkv's fused norm for TE checkpoints; NSA has no linear_qkv.
    keys_map = {k: v for k, v in dense.submodules.sharded_state_dict_keys_map.items() if "linear_qkv" not in v}
    submodules = dataclasses.replace(
        dense.submodules,
        # The TE spec fuses the input norm into linear_qkv; NSA's projections need it apart.
        input_layernorm=provider.layer_norm(rms_norm=rms_norm),
        self_attention=attention,
        sharded_state_dict_keys_map={**keys_map, **PHI_KEYS_MAP},
    )
    return ModuleSpec(module=dense.module, params=dict(dense.params), submodules=submodules)


def get_gpt_decoder_block_nsa_spec(
    config: TransformerConfig,
    nsa_layers: Sequence[bool | int],
    nsa_config: NSAConfig | None = None,
    backend: ops.Backend = "auto",
    rotary_base: float = 10000.0,
    use_transformer_engine: bool = False,
    **kwargs: Any,
) -> TransformerBlockSubmodules:
    """A decoder block mixing NSA layers (``nsa_layers[i]`` true) with Megatron's standard attention.

    ``nsa_layers`` has one entry per layer of the whole model (``config.num_layers``);
    with pipeline parallelism this stage's slice is built, as Megatron's
    ``get_gpt_decoder_block_spec`` does. ``kwargs`` go to both layer specs.
    """
    if len(nsa_layers) != config.num_layers:
        raise ValueError(f"nsa_layers has {len(nsa_layers)} entries; num_layers is {config.num_layers}")
    nsa = get_gpt_layer_nsa_spec(nsa_config, backend, rotary_base, use_transformer_engine, **kwargs)
    dense = _dense_layer_spec(use_transformer_engine, **kwargs)
    offset = get_transformer_layer_offset(config)
    layers = [nsa if flag else dense for flag in nsa_layers]
    layers = layers[offset:offset + get_num_layers_to_build(config)]
    return TransformerBlockSubmodules(layer_specs=layers, layer_norm=nsa.submodules.input_layernorm)


def get_gpt_layer_sdpa_spec(**kwargs: Any) -> ModuleSpec:
    """Megatron's ``get_gpt_layer_local_spec(**kwargs)`` with :class:`SDPACoreAttention` as the
    self-attention's ``core_attention``: norms, QKV and output projections, rotary and MLP stay Megatron's,
    so full attention and NSA differ only in attention."""
    if kwargs.get("multi_latent_attention"):
        raise ValueError("multi_latent_attention cannot be combined with SDPACoreAttention (its key and value "
                         "head dims differ)")
    local = gpt_layer_specs.get_gpt_layer_local_spec(**kwargs)
    attention = local.submodules.self_attention
    # Megatron calls core_attention(config=..., layer_number=..., ...) directly: a class, not a ModuleSpec.
    attention = dataclasses.replace(
        attention, submodules=dataclasses.replace(attention.submodules, core_attention=SDPACoreAttention))
    return ModuleSpec(module=local.module, params=dict(local.params),
                      submodules=dataclasses.replace(local.submodules, self_attention=attention))
