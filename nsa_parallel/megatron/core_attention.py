"""``NSACoreAttention``: NSA in Megatron's ``core_attention`` slot, with the compression ``phi`` it owns.

Megatron's attention modules put what comes after the projections (scores, softmax, the weighted sum)
in ``core_attention``; for NSA that is :func:`nsa_parallel.core.nsa_core`: compression, the three
branches, the gates, and context parallelism. Living there, it is what Megatron's selective
recomputation (``recompute_modules`` with ``core_attn``) recomputes.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint

from .. import ops
from ..compression import BlockCompressor
from ..config import NSAConfig
from ..context_parallel import DEFAULT_LAYOUT, CommStats, ContextParallel
from ..core import BranchKV, Bounds, Compressors, nsa_core
from ..rotary import Rotary


def init_compressor_shard(module: BlockCompressor, init_method: Callable[[torch.Tensor], Any], groups: int,
                          tp_rank: int) -> None:
    """Initialises ``module`` (this TP rank's KV groups of ``groups``) as the TP=1 model would: each
    weight is drawn whole, from the generator every TP rank seeds alike, and this rank keeps its
    slice; biases start at zero. So every TP size starts from the same ``phi``, on the CPU and GPU."""
    local = module.w1.shape[0]
    with torch.no_grad():
        for name, p in module.named_parameters():
            full = p.new_empty(groups, *p.shape[1:])
            if name.startswith("b"):
                full.zero_()
            else:
                init_method(full)
            p.copy_(full[tp_rank * local:(tp_rank + 1) * local])


class NSACoreAttention(MegatronModule):
    """``(query, BranchKV, gate_logits)`` of this TP rank's heads and KV groups, ``[s, b, heads, d]``
    -> ``[s, b, heads * dv]``.

    Built as Megatron builds ``core_attention`` (``config``, ``layer_number``, ``attn_mask_type``,
    ``attention_type``, ``cp_comm_type``, ``softmax_scale``, ``pg_collection``) plus the spec's
    ``nsa_config`` and ``backend``. Owns ``phi`` (``compress_k``, ``compress_v``) of its KV groups,
    initialised with ``config.init_method`` (when ``config.perform_initialization``) exactly as at
    TP=1 and marked TP-sharded on dim 0. With ``context_parallel_size > 1`` it runs NSA's own
    context parallelism over Megatron's CP group on Megatron's zigzag layout (``cp_comm_type`` names
    Megatron's exchanges for dense attention and has no meaning here); ``comm_stats`` counts the bytes.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType = AttnMaskType.causal,
        attention_type: str = "self",
        cp_comm_type: str | None = None,
        softmax_scale: float | None = None,
        pg_collection: Any = None,
        nsa_config: NSAConfig | None = None,
        backend: ops.Backend = "auto",
    ):
        super().__init__(config=config)
        nsa_config = NSAConfig() if nsa_config is None else nsa_config
        if not isinstance(nsa_config, NSAConfig):
            raise ValueError(f"nsa_config must be an NSAConfig, got {type(nsa_config).__name__}")
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"attn_mask_type ({attn_mask_type}) must be AttnMaskType.causal: NSA is causal")
        if attention_type != "self":
            raise ValueError(f"attention_type ({attention_type!r}) must be 'self': NSA is self-attention")
        ops.resolve_backend(backend, torch.empty(0))
        self.layer_number, self.nsa_config, self.backend = layer_number, nsa_config, backend
        self.softmax_scale = softmax_scale
        self.tp_group = pg_collection.tp if pg_collection is not None else \
            parallel_state.get_tensor_model_parallel_group()
        tp_size, tp_rank = self.tp_group.size(), self.tp_group.rank()
        self.comm_stats = CommStats()
        self.cp = None  # Megatron's batch slicing and rotary embeddings shard a sequence zigzag
        if config.context_parallel_size > 1:
            cp_group = getattr(pg_collection, "cp", None) or parallel_state.get_context_parallel_group()
            self.cp = ContextParallel(cp_group, DEFAULT_LAYOUT, self.comm_stats)

        groups = config.num_query_groups or config.num_attention_heads
        device = torch.device("cpu") if config.use_cpu_initialization else torch.cuda.current_device()
        factory = {"device": device, "dtype": config.params_dtype}
        self.compress_k = BlockCompressor(groups // tp_size, config.kv_channels, nsa_config, reset=False, **factory)
        self.compress_v = BlockCompressor(groups // tp_size, config.kv_channels, nsa_config, reset=False, **factory)
        for module in (self.compress_k, self.compress_v):
            if config.perform_initialization:
                init_compressor_shard(module, config.init_method, groups, tp_rank)
            # TP-sharded on dim 0: Megatron's grad-norm and checkpoint code count each rank's groups once.
            for p in module.parameters():
                set_tensor_model_parallel_attributes(p, is_parallel=True, dim=0, stride=1)

    def forward(self, query: torch.Tensor, kv: BranchKV, gate_logits: torch.Tensor, *, rotary: Rotary | None,
                documents: list[Bounds] | None) -> torch.Tensor:
        """``rotary``: cos/sin of each local token (``[s, dim]`` or ``[b, s, dim]``); ``documents``: per batch
        row, the documents it packs (each attends only to itself), or ``None``."""
        seq, batch = query.shape[:2]
        out = nsa_core(query.transpose(0, 1), kv.map(lambda t: t.transpose(0, 1)), gate_logits.transpose(0, 1),
                       Compressors(self.compress_k, self.compress_v), self.nsa_config, rotary=rotary,
                       scale=self.softmax_scale, documents=documents, cp=self.cp, backend=self.backend)
        return out.transpose(0, 1).reshape(seq, batch, -1)

    def sharded_state_dict(
        self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
    ) -> ShardedStateDict:
        """``phi`` shards along its KV-group dim 0, so a checkpoint saved at one TP size loads at another."""
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state, prefix, {key: 0 for key in state}, sharded_offsets, tp_group=self.tp_group,
            dp_cp_group=ensure_metadata_has_dp_cp_group(metadata)["dp_cp_group"])
