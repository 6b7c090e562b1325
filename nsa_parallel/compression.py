"""The learned compression ``phi``: one token per block of ``l`` keys (or values), stride ``d``."""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import NSAConfig


def unfold_blocks(x: torch.Tensor, block_size: int, stride: int) -> torch.Tensor:
    """``[B, T, G, D] -> [B, Tc, G, block_size, D]``: block ``i`` is tokens ``[i*stride, i*stride + block_size)``."""
    if x.shape[1] < block_size:
        return x.new_zeros(x.shape[0], 0, x.shape[2], block_size, x.shape[3])
    return x.unfold(1, block_size, stride).permute(0, 1, 2, 4, 3)


class BlockCompressor(nn.Module):
    """Per-KV-head MLP over a flattened block with a learned intra-block position encoding.

    ``phi(block) = W2 · act(W1 · flatten(block + pos) + b1) + b2``, mapping ``l*dim -> dim``.
    Each KV head has its own weights, so tensor parallelism can shard them with the heads.
    """

    def __init__(self, num_kv_heads: int, head_dim: int, config: NSAConfig, hidden_size: int | None = None,
                 device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.block_size, self.stride = config.compress_block_size, config.compress_stride
        hidden_size = hidden_size or head_dim
        fan_in = self.block_size * head_dim
        factory = {"device": device, "dtype": dtype}
        self.position = nn.Parameter(torch.zeros(num_kv_heads, self.block_size, head_dim, **factory))
        self.w1 = nn.Parameter(torch.empty(num_kv_heads, fan_in, hidden_size, **factory))
        self.b1 = nn.Parameter(torch.zeros(num_kv_heads, hidden_size, **factory))
        self.w2 = nn.Parameter(torch.empty(num_kv_heads, hidden_size, head_dim, **factory))
        self.b2 = nn.Parameter(torch.zeros(num_kv_heads, head_dim, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.position, std=0.02)
        nn.init.normal_(self.w1, std=1.0 / math.sqrt(self.w1.shape[1]))
        nn.init.normal_(self.w2, std=1.0 / math.sqrt(self.w2.shape[1]))
        nn.init.zeros_(self.b1)
        nn.init.zeros_(self.b2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, T, G, D]`` -> compressed tokens ``[B, Tc, G, D]``, ``Tc = (T - l)//d + 1`` (0 if ``T < l``)."""
        blocks = unfold_blocks(x, self.block_size, self.stride) + self.position
        flat = blocks.flatten(-2)  # [B, Tc, G, l*D]
        hidden = nn.functional.gelu(torch.einsum("btgi,gih->btgh", flat, self.w1) + self.b1)
        return torch.einsum("btgh,ghd->btgd", hidden, self.w2) + self.b2
