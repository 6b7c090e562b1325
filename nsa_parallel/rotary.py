"""Rotary position embedding (rotate-half form, as Megatron and GPT-NeoX use) by absolute token position."""
from __future__ import annotations

from typing import NamedTuple

import torch


class Rotary(NamedTuple):
    """cos/sin of the angle of each token, ``[T, dim]`` (every batch row alike) or ``[B, T, dim]``."""

    cos: torch.Tensor
    sin: torch.Tensor

    def rows(self, index: slice | torch.Tensor, batch_row: int | None = None) -> Rotary:
        """The tables of tokens ``index`` (of batch row ``batch_row`` when they differ by row)."""
        if self.cos.dim() == 3 and batch_row is not None:
            return Rotary(self.cos[batch_row:batch_row + 1, index], self.sin[batch_row:batch_row + 1, index])
        return Rotary(self.cos[..., index, :], self.sin[..., index, :])


def rotary_angles(positions: torch.Tensor, dim: int, base: float = 10000.0) -> Rotary:
    """cos/sin of shape ``[*positions.shape, dim]`` for integer ``positions``."""
    if dim % 2:
        raise ValueError(f"rotary dim ({dim}) must be even")
    inv_freq = base ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float64) / dim)
    angles = positions.to(torch.float64)[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return Rotary(angles.cos(), angles.sin())


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates ``x [B, S, heads, dim]`` by ``cos/sin [S, dim]`` or ``[B, S, dim]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    cos = cos.to(x.dtype).unsqueeze(-2)
    sin = sin.to(x.dtype).unsqueeze(-2)
    return x * cos + rotated * sin
