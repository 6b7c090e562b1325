"""Triton kernels for Native Sparse Attention. They know nothing of Megatron or ranks."""
