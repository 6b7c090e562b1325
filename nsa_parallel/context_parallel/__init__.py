"""Context parallelism for NSA: one sequence sharded over ranks, exchanging only what NSA reads."""
from .comm_stats import CommStats, ring_attention_bytes
from .layout import DEFAULT_LAYOUT, LAYOUTS, Segment, ShardLayout, check_layout
from .shard import ContextParallel, ContextParallelShard

__all__ = ["DEFAULT_LAYOUT", "LAYOUTS", "CommStats", "ContextParallel", "ContextParallelShard", "Segment",
           "ShardLayout", "check_layout",
           "ring_attention_bytes"]
