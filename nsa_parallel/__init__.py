"""nsa-parallel: Native Sparse Attention for Megatron-core, with context parallelism."""
from . import ops
from .config import NSAConfig
from .core import KV, BranchKV, Compressors, nsa_core
from .layer import NativeSparseAttention

__all__ = ["KV", "BranchKV", "Compressors", "NSAConfig", "NativeSparseAttention", "nsa_core", "ops"]
