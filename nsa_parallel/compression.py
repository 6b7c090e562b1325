"""The learned compression ``phi``: one token per block of ``l`` keys (or values), stride ``d``."""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import NSAConfig


def compressed_positions(ids: torch.Tensor | int, config: NSAConfig) -> torch.Tensor | int:
    """Position of compressed token ``i``: the last token of its block ``[i*d, i*d + l)``, ``i*d + l - 1``.

    Its key is rotated at this position and query ``t`` sees it iff it is ``<= t`` (design brief 1.1).
    """
    return ids * config.compress_stride + config.compress_block_size - 1


class BlockCompressor(nn.Module):
    """Per-KV-head MLP over a flattened block with a learned intra-block position encoding.

    ``phi(block) = W2 · act(W1 · flatten(block + pos) + b1) + b2``, mapping ``l*dim -> dim``.
    Each KV head has its own weights, so tensor parallelism can shard them with the heads.
    """

    BIASES = ("b1", "b2")  # 2-D (one row per KV head), so named for the optimizer to skip weight decay

    def __init__(self, num_kv_heads: int, head_dim: int, config: NSAConfig, hidden_size: int | None = None,
                 device: torch.device | None = None, dtype: torch.dtype | None = None, *, reset: bool = True):
        """``reset=False`` leaves the weights unset (biases zero) and the random generator untouched,
        for callers that initialise them their own way (Megatron's ``init_method``)."""
        super().__init__()
        self.block_size, self.stride = config.compress_block_size, config.compress_stride
        hidden_size = hidden_size or head_dim
        fan_in = self.block_size * head_dim
        factory = {"device": device, "dtype": dtype}
        self.position = nn.Parameter(torch.empty(num_kv_heads, self.block_size, head_dim, **factory))
        self.w1 = nn.Parameter(torch.empty(num_kv_heads, fan_in, hidden_size, **factory))
        self.b1 = nn.Parameter(torch.zeros(num_kv_heads, hidden_size, **factory))
        self.w2 = nn.Parameter(torch.empty(num_kv_heads, hidden_size, head_dim, **factory))
        self.b2 = nn.Parameter(torch.zeros(num_kv_heads, head_dim, **factory))
        if reset:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.position, std=0.02)
        nn.init.normal_(self.w1, std=1.0 / math.sqrt(self.w1.shape[1]))
        nn.init.normal_(self.w2, std=1.0 / math.sqrt(self.w2.shape[1]))
        nn.init.zeros_(self.b1)
        nn.init.zeros_(self.b2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, T, G, D]`` -> compressed tokens ``[B, Tc, G, D]``, ``Tc = (T - l)//d + 1`` (0 if ``T < l``).

        Computes ``reference.compress_tokens`` without materialising the overlapping
        blocks: a block is ``L = l/d`` consecutive segments of ``d`` tokens, so
        ``W1 · flatten(block_i) = sum_m W1_m · segment_{i+m}``. One matmul over the
        ``S = Tc + L - 1`` segments gives every ``W1_m · segment``, the shifted sum
        assembles the blocks, and ``W1 · pos`` is one vector per head.
        """
        batch, seq_len, groups, dim = x.shape
        l, d = self.block_size, self.stride
        num_segments_per_block = l // d
        num_blocks = (seq_len - l) // d + 1 if seq_len >= l else 0
        num_segments = num_blocks + num_segments_per_block - 1 if num_blocks else 0
        segments = x[:, :num_segments * d].reshape(batch, num_segments, d, groups, dim)
        w1 = self.w1.view(groups, num_segments_per_block, d, dim, -1)
        per_segment = torch.einsum("bsugk,gmukh->bsgmh", segments, w1)  # [B, S, G, L, h]
        pre = sum(per_segment[:, m:m + num_blocks, :, m] for m in range(num_segments_per_block))
        bias = torch.einsum("gi,gih->gh", self.position.flatten(1), self.w1) + self.b1
        # Biases take the matmuls' dtype, as in nn.Linear under autocast.
        hidden = nn.functional.gelu(pre + bias.to(pre.dtype))
        out = torch.einsum("btgh,ghd->btgd", hidden, self.w2)
        return out + self.b2.to(out.dtype)
