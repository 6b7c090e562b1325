"""nsa-parallel: Native Sparse Attention for Megatron-core, with context parallelism."""
from .config import NSAConfig

__all__ = ["NSAConfig"]
