"""Triton kernels for Native Sparse Attention. They know nothing of Megatron or ranks.

Each op is a module named after it: ``banded_attention`` (compressed and sliding-window
branches), ``block_selection`` and ``selection_attention``; see docs/KERNELS.md.
"""
