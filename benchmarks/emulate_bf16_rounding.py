"""Which bf16 tensors drive an NSA layer's gradient error? A CPU study by emulation.

A float64 ``NativeSparseAttention`` (reference backend, bf16-valued weights and input) is run with
bf16 rounding applied, forward and backward, to the tensors a bf16 GPU run stores between ops;
everything inside an op stays exact (on the GPU, the kernels' internal precision was shown not to
matter: RESULTS.md). Rounding points: ``proj`` (linear outputs), ``rotary``, ``phi_inner`` (phi's
matmul outputs, pre-activation and hidden), ``phi_out``, ``branch_out`` (the three branch
outputs), ``gates``, ``combine_out``. Each variant's parameter gradients are compared with the
unrounded run on the same selected blocks; a dense causal attention layer with the same
projections (rounded likewise) is the yardstick.

    python benchmarks/emulate_bf16_rounding.py --seq-len 4096
"""
from __future__ import annotations

import argparse
import math

import torch
from torch import nn

from nsa_parallel import NSAConfig, NativeSparseAttention, ops, reference
from nsa_parallel import core as core_module
from nsa_parallel.compression import BlockCompressor

POINTS = ("proj", "rotary", "phi_inner", "phi_out", "branch_out", "gates", "combine_out")
rounded: set[str] = set()


class _RoundToBF16(torch.autograd.Function):
    """bf16 storage of a tensor: its value forward, its gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.to(torch.bfloat16).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(torch.bfloat16).to(grad.dtype)


def store(x: torch.Tensor, point: str) -> torch.Tensor:
    return _RoundToBF16.apply(x) if point in rounded else x


def phi_forward(self: BlockCompressor, x: torch.Tensor) -> torch.Tensor:
    """BlockCompressor.forward with its intermediate tensors stored through ``store``."""
    batch, seq_len, groups, dim = x.shape
    l, d = self.block_size, self.stride
    per_block = l // d
    num_blocks = (seq_len - l) // d + 1 if seq_len >= l else 0
    num_segments = num_blocks + per_block - 1 if num_blocks else 0
    segments = x[:, :num_segments * d].reshape(batch, num_segments, d, groups, dim)
    w1 = self.w1.view(groups, per_block, d, dim, -1)
    per_segment = store(torch.einsum("bsugk,gmukh->bsgmh", segments, w1), "phi_inner")
    pre = sum(per_segment[:, m:m + num_blocks, :, m] for m in range(per_block))
    bias = torch.einsum("gi,gih->gh", self.position.flatten(1), self.w1) + self.b1
    hidden = store(nn.functional.gelu(store(pre + bias, "phi_inner")), "phi_inner")
    return store(torch.einsum("btgh,ghd->btgd", hidden, self.w2) + self.b2, "phi_out")


class DenseAttention(nn.Module):
    """The yardstick: causal softmax attention with the same projections (GQA), no NSA."""

    def __init__(self, hidden: int, heads: int, groups: int, dim: int):
        super().__init__()
        self.heads, self.groups, self.dim = heads, groups, dim
        self.q_proj = nn.Linear(hidden, heads * dim, bias=False, dtype=torch.float64)
        self.kv_proj = nn.Linear(hidden, 2 * groups * dim, bias=False, dtype=torch.float64)
        self.o_proj = nn.Linear(heads * dim, hidden, bias=False, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.dim)
        k, v = self.kv_proj(x).view(b, t, 2, self.groups, self.dim).unbind(2)
        visible = torch.ones(t, t, dtype=torch.bool).tril()
        out = store(reference.masked_attention(q, k, v, visible, self.dim ** -0.5), "branch_out")
        return self.o_proj(out.reshape(b, t, -1))


def gradients(model: nn.Module, x: torch.Tensor, points: set[str]) -> dict[str, torch.Tensor]:
    rounded.clear()
    rounded.update(points)
    model.zero_grad()
    out = model(x)
    out.backward(store(torch.ones_like(out) / math.sqrt(out.numel()), "proj"))
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def worst(grads: dict, exact: dict, top: int = 3) -> str:
    errs = {n: ((g - exact[n]).norm() / exact[n].norm()).item() for n, g in grads.items()}
    return ", ".join(f"{n} {e:.2e}" for n, e in sorted(errs.items(), key=lambda kv: -kv[1])[:top])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=4096)
    args = p.parse_args()
    torch.manual_seed(0)
    nsa = NativeSparseAttention(1024, 8, 2, 128, config=NSAConfig(), backend="reference", dtype=torch.float64)
    dense = DenseAttention(1024, 8, 2, 128)
    for model in (nsa, dense):
        with torch.no_grad():  # a bf16 model's weights
            for param in model.parameters():
                param.copy_(param.to(torch.bfloat16))
    x = torch.randn(1, args.seq_len, 1024, dtype=torch.float64).to(torch.bfloat16).double()

    linear = nn.Linear.forward
    rotary = core_module.apply_rotary
    branches = {n: getattr(reference, n) for n in ("compressed_attention", "selection_attention", "window_attention")}
    combine, select_blocks, phi = ops.combine_branches, reference.select_blocks, BlockCompressor.forward
    nn.Linear.forward = lambda self, inp: store(linear(self, inp), "proj")
    core_module.apply_rotary = lambda t, cos, sin: store(rotary(t, cos, sin), "rotary")
    for name, fn in branches.items():
        setattr(reference, name, lambda *a, _fn=fn, **kw: store(_fn(*a, **kw), "branch_out"))
    ops.combine_branches = lambda o_cmp, o_slc, o_win, gates, *a: store(
        combine(o_cmp, o_slc, o_win, store(gates, "gates"), *a), "combine_out")
    BlockCompressor.forward = phi_forward
    selected: list[torch.Tensor] = []
    try:
        reference.select_blocks = lambda *a, **kw: selected.append(select_blocks(*a, **kw)) or selected[-1]
        exact = gradients(nsa, x, set())
        variants = {"all rounded": set(POINTS), **{f"only {p}": {p} for p in POINTS},
                    "all but phi_inner": set(POINTS) - {"phi_inner"},
                    "all but phi (inner and out)": set(POINTS) - {"phi_inner", "phi_out"}}
        print(f"NSA layer (hidden 1024, 8 heads / 2 KV heads, d=128, paper settings), T={args.seq_len}; "
              "worst parameter gradients against float64:\n")
        print("| rounded tensors | worst gradients |\n|---|---|")
        for name, points in variants.items():
            replay = iter(selected)
            reference.select_blocks = lambda *a, **kw: next(replay)
            print(f"| {name} | {worst(gradients(nsa, x, points), exact)} |", flush=True)
        dense_exact = gradients(dense, x, set())
        print(f"| dense attention, proj + attention output rounded | "
              f"{worst(gradients(dense, x, {'proj', 'branch_out'}), dense_exact)} |")
    finally:
        nn.Linear.forward, core_module.apply_rotary, BlockCompressor.forward = linear, rotary, phi
        for name, fn in branches.items():
            setattr(reference, name, fn)
        ops.combine_branches, reference.select_blocks = combine, select_blocks


if __name__ == "__main__":
    main()
