"""Megatron-core integration: NSA self-attention and GPT layer/block specs (needs ``megatron-core``)."""
from .attention import NSASelfAttention, NSASelfAttentionSubmodules
from .specs import get_gpt_decoder_block_nsa_spec, get_gpt_layer_nsa_spec

__all__ = ["NSASelfAttention", "NSASelfAttentionSubmodules", "get_gpt_decoder_block_nsa_spec",
           "get_gpt_layer_nsa_spec"]
