"""The gated sum of NSA's three branch outputs, fused: ``o = sum_b gates[..., b] * o_b``.

Unfused, PyTorch makes five passes over ``[B, T, H, dv]`` tensors forward (three
products, two sums) and more backward; at 64k tokens and 64 heads each pass moves
about a gigabyte. Here the forward reads the three outputs once and writes one,
and the backward reads ``dO`` and the three outputs once, writes the three
gradients and reduces the gate gradients per row in the same pass.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

NUM_BRANCHES = 3


def _tiles(dv: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(dv)
    return max(1, 4096 // block_d), block_d


@triton.jit
def _combine_fwd_kernel(oc_ptr, os_ptr, ow_ptr, g_ptr, out_ptr, num_rows,
                        DV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < num_rows
    mask = row_ok[:, None] & (cols[None, :] < DV)
    offs = rows[:, None] * DV + cols[None, :]
    g_cmp = tl.load(g_ptr + rows * 3 + 0, mask=row_ok, other=0.0).to(tl.float32)
    g_slc = tl.load(g_ptr + rows * 3 + 1, mask=row_ok, other=0.0).to(tl.float32)
    g_win = tl.load(g_ptr + rows * 3 + 2, mask=row_ok, other=0.0).to(tl.float32)
    out = g_cmp[:, None] * tl.load(oc_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out += g_slc[:, None] * tl.load(os_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out += g_win[:, None] * tl.load(ow_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _branch_bwd(o_ptr, do, g, d_o_ptr, dg_ptr, rows, offs, mask, row_ok, BRANCH: tl.constexpr):
    o = tl.load(o_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(d_o_ptr + offs, (g[:, None] * do).to(d_o_ptr.dtype.element_ty), mask=mask)
    tl.store(dg_ptr + rows * 3 + BRANCH, tl.sum(do * o, axis=1).to(dg_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _combine_bwd_kernel(oc_ptr, os_ptr, ow_ptr, g_ptr, do_ptr, doc_ptr, dos_ptr, dow_ptr, dg_ptr, num_rows,
                        DV: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < num_rows
    mask = row_ok[:, None] & (cols[None, :] < DV)
    offs = rows[:, None] * DV + cols[None, :]
    do = tl.load(do_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g_cmp = tl.load(g_ptr + rows * 3 + 0, mask=row_ok, other=0.0).to(tl.float32)
    g_slc = tl.load(g_ptr + rows * 3 + 1, mask=row_ok, other=0.0).to(tl.float32)
    g_win = tl.load(g_ptr + rows * 3 + 2, mask=row_ok, other=0.0).to(tl.float32)
    _branch_bwd(oc_ptr, do, g_cmp, doc_ptr, dg_ptr, rows, offs, mask, row_ok, 0)
    _branch_bwd(os_ptr, do, g_slc, dos_ptr, dg_ptr, rows, offs, mask, row_ok, 1)
    _branch_bwd(ow_ptr, do, g_win, dow_ptr, dg_ptr, rows, offs, mask, row_ok, 2)


class _GatedCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o_cmp, o_slc, o_win, gates):
        dv = o_cmp.shape[-1]
        num_rows = o_cmp.numel() // dv
        out = torch.empty_like(o_cmp)
        block_r, block_d = _tiles(dv)
        grid = (triton.cdiv(num_rows, block_r),)
        _combine_fwd_kernel[grid](o_cmp, o_slc, o_win, gates, out, num_rows,
                                  DV=dv, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)
        ctx.save_for_backward(o_cmp, o_slc, o_win, gates)
        return out

    @staticmethod
    def backward(ctx, d_out):
        o_cmp, o_slc, o_win, gates = ctx.saved_tensors
        dv = o_cmp.shape[-1]
        num_rows = o_cmp.numel() // dv
        d_out = d_out.contiguous()
        d_cmp, d_slc, d_win = (torch.empty_like(o_cmp) for _ in range(NUM_BRANCHES))
        d_gates = torch.empty_like(gates)
        block_r, block_d = _tiles(dv)
        grid = (triton.cdiv(num_rows, block_r),)
        _combine_bwd_kernel[grid](o_cmp, o_slc, o_win, gates, d_out, d_cmp, d_slc, d_win, d_gates, num_rows,
                                  DV=dv, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)
        return d_cmp, d_slc, d_win, d_gates


def gated_combine(o_cmp: torch.Tensor, o_slc: torch.Tensor, o_win: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """``gates[..., 0] * o_cmp + gates[..., 1] * o_slc + gates[..., 2] * o_win``.

    ``o_*`` are ``[B, T, H, dv]`` of one dtype, ``gates`` ``[B, T, H, 3]``; differentiable in all four.
    """
    if not (o_cmp.shape == o_slc.shape == o_win.shape):
        raise ValueError(f"branch outputs differ in shape: {tuple(o_cmp.shape)}, {tuple(o_slc.shape)}, "
                         f"{tuple(o_win.shape)}")
    if tuple(gates.shape) != (*o_cmp.shape[:-1], NUM_BRANCHES):
        raise ValueError(f"gates must be {(*o_cmp.shape[:-1], NUM_BRANCHES)}, got {tuple(gates.shape)}")
    return _GatedCombine.apply(o_cmp.contiguous(), o_slc.contiguous(), o_win.contiguous(),
                               gates.to(o_cmp.dtype).contiguous())
