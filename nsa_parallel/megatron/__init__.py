"""Megatron-core integration: NSA self-attention, the SDPA full-attention baseline, GPT layer/block specs
(needs ``megatron-core``)."""
from .attention import NSASelfAttention, NSASelfAttentionSubmodules, check_nsa_config
from .core_attention import NSACoreAttention
from .cpu_rotary import CPURotaryEmbedding
from .sdpa_attention import SDPACoreAttention, choose_backend
from .specs import get_gpt_decoder_block_nsa_spec, get_gpt_layer_nsa_spec, get_gpt_layer_sdpa_spec, nsa_attention_spec

__all__ = ["CPURotaryEmbedding", "NSACoreAttention", "NSASelfAttention", "NSASelfAttentionSubmodules",
           "SDPACoreAttention", "check_nsa_config", "choose_backend", "get_gpt_decoder_block_nsa_spec",
           "get_gpt_layer_nsa_spec", "get_gpt_layer_sdpa_spec", "nsa_attention_spec"]
