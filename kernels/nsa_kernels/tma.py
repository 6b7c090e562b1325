"""TMA tiles (sm_90+): when the kernels may fetch tiles with the tensor memory accelerator.

A kernel tile here is ``rows`` consecutive sequence positions of one head of a
``[B, N, heads, d]`` tensor. Seen as the 2-D ``[B*N, heads*d]`` matrix that is a box at
``(b*N + start, head*d)``: one bulk copy issued by the copy engine instead of a gather
addressed by every thread. Rows past ``B*N`` read as zeros; rows past ``N`` inside the
matrix belong to the next batch, so kernels mask them as they mask any position out of range.
"""
from __future__ import annotations

import torch
from triton.tools.tensor_descriptor import TensorDescriptor

ENABLED = True  # tests switch it off to cover the gather paths on 16-bit inputs
MAX_BOX = 256  # the largest box edge a TMA copy takes


def applies(*tensors: torch.Tensor) -> bool:
    """Whether every ``[B, N, heads, d]`` tensor can be tiled by TMA: 16-bit, contiguous,
    16-byte aligned, non-empty, ``d`` a power of two in [16, 256], on sm_90+ (or the interpreter)."""
    if not ENABLED:
        return False
    for x in tensors:
        d = x.shape[-1]
        if x.numel() == 0 or x.element_size() != 2 or not x.is_contiguous() or x.data_ptr() % 16:
            return False
        if d < 16 or d > MAX_BOX or d & (d - 1):
            return False
        if x.is_cuda and torch.cuda.get_device_capability(x.device) < (9, 0):
            return False
    return True


def row_tiles(x: torch.Tensor, rows: int) -> TensorDescriptor:
    """Descriptor of ``x [B, N, heads, d]`` as ``[B*N, heads*d]`` with ``rows x d`` boxes
    (check :func:`applies` first)."""
    if not 1 <= rows <= MAX_BOX:
        raise ValueError(f"a TMA box has 1 to {MAX_BOX} rows, not {rows}")
    return TensorDescriptor.from_tensor(x.view(x.shape[0] * x.shape[1], -1), [rows, x.shape[-1]])
