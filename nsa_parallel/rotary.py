"""Rotary position embedding (rotate-half form, as Megatron and GPT-NeoX use) by absolute token position."""
from __future__ import annotations

import torch


def rotary_angles(positions: torch.Tensor, dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape ``[len(positions), dim]`` for integer ``positions``."""
    if dim % 2:
        raise ValueError(f"rotary dim ({dim}) must be even")
    inv_freq = base ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float64) / dim)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates ``x [B, S, heads, dim]`` by ``cos/sin [S, dim]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    cos = cos.to(x.dtype)[None, :, None, :]
    sin = sin.to(x.dtype)[None, :, None, :]
    return x * cos + rotated * sin
