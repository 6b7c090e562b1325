"""NSA hyper-parameters, validated on construction."""
from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class NSAConfig:
    """Block sizes and budgets of Native Sparse Attention (arXiv 2502.11089).

    ``compress_block_size`` (l) and ``compress_stride`` (d) define the compression
    blocks ``[i*d, i*d + l)``; ``select_block_size`` (l') the selection blocks
    ``[j*l', (j+1)*l')``; ``num_selected_blocks`` (n) counts the forced initial
    block and the two local blocks; ``window_size`` (w) is the sliding window.
    """

    compress_block_size: int = 32
    compress_stride: int = 16
    select_block_size: int = 64
    num_selected_blocks: int = 16
    window_size: int = 512

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{f.name} ({value!r}) must be an integer")
            if value <= 0:
                raise ValueError(f"{f.name} ({value}) must be positive")
        l, d, ls = self.compress_block_size, self.compress_stride, self.select_block_size
        if l % d:
            raise ValueError(f"compress_block_size ({l}) must be a multiple of compress_stride ({d})")
        if ls % d:
            raise ValueError(f"select_block_size ({ls}) must be a multiple of compress_stride ({d})")
        if self.num_selected_blocks < 3:
            raise ValueError(
                f"num_selected_blocks ({self.num_selected_blocks}) must be at least 3: "
                "it counts the forced initial block and the two local blocks"
            )

    def num_compressed(self, seq_len: int) -> int:
        """Number of compression blocks fully inside a sequence of ``seq_len`` tokens."""
        if seq_len < self.compress_block_size:
            return 0
        return (seq_len - self.compress_block_size) // self.compress_stride + 1

    def num_select_blocks(self, seq_len: int) -> int:
        """Number of selection blocks covering ``seq_len`` tokens (the last may be partial)."""
        return -(-seq_len // self.select_block_size)
