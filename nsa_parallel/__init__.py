"""nsa-parallel: Native Sparse Attention for Megatron-core, with context parallelism."""
from . import ops
from .config import NSAConfig
from .layer import NativeSparseAttention

__all__ = ["NSAConfig", "NativeSparseAttention", "ops"]
