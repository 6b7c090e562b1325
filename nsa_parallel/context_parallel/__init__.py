"""Context parallelism for NSA: one sequence sharded over ranks, exchanging only what NSA reads."""
from .attention import context_parallel_nsa_branches
from .comm_stats import CommStats, ring_attention_bytes
from .layout import LAYOUTS, Segment, ShardLayout

__all__ = ["LAYOUTS", "CommStats", "Segment", "ShardLayout", "context_parallel_nsa_branches", "ring_attention_bytes"]
