"""``CPURotaryEmbedding``: Megatron's rotary embedding with its table on the CPU."""
from __future__ import annotations

from functools import lru_cache

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from ..context_parallel import ShardLayout


class CPURotaryEmbedding(RotaryEmbedding):
    """Megatron's ``RotaryEmbedding``, the same ``[s, 1, 1, dim]`` table, for models on the CPU.

    Megatron's insists on CUDA twice: ``get_emb`` moves ``inv_freq`` to the current CUDA device on the
    first call, and under context parallelism ``forward`` slices the table with
    ``rope_utils.get_pos_emb_on_this_cp_rank``, which pins memory and copies its indices to CUDA. Here
    ``inv_freq`` stays where it was made and the slice is the same zigzag share, taken on the CPU.
    Construct with ``use_cpu_initialization=True``.
    """

    def get_emb(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)
        # Megatron's layouts: [f0..fn, f0..fn], or interleaved [f0, f0, f1, f1, ...]
        emb = freqs.repeat_interleave(2, dim=-1) if self.rotary_interleaved else torch.cat((freqs, freqs), dim=-1)
        return emb[:, None, None, :]

    @lru_cache(maxsize=32)  # noqa: B019 (as Megatron's: one table per length, kept with the module)
    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False,
                cp_group: torch.distributed.ProcessGroup | None = None) -> torch.Tensor:
        emb = self.get_emb(max_seq_len, offset)
        cp_group = self.cp_group if cp_group is None else cp_group
        if cp_group is not None and cp_group.size() > 1 and not packed_seq:
            # This rank's positions of Megatron's load-balanced (zigzag) split: chunks r and 2*cp-1-r.
            emb = ShardLayout("zigzag", cp_group.size(), max_seq_len).shard(emb, cp_group.rank(), dim=0)
        return emb
