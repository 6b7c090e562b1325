"""Triton kernels for Native Sparse Attention. They know nothing of Megatron or ranks."""
from .banded_attention import banded_attention
from .block_selection import select_blocks
from .selection_attention import selection_attention

__all__ = ["banded_attention", "select_blocks", "selection_attention"]
