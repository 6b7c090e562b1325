"""Generation with NSA: the per-layer KV cache, prefill and one-token decode steps."""
from .attention import decode_attention, reference_decode
from .cache import NSAKVCache
from .step import decode, prefill

__all__ = ["NSAKVCache", "decode", "decode_attention", "prefill", "reference_decode"]
