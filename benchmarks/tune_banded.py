"""Sweeps banded-attention tiles (compressed and window branches) per kernel on one GPU.

    python benchmarks/tune_banded.py --seq-len 65536
"""
from __future__ import annotations

import argparse

import torch
import triton

import nsa_kernels.banded_attention as ba
from nsa_parallel import NSAConfig

CANDIDATES = {
    "fwd": [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3)],
    "dq": [(128, 32, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 3)],
    "dkdv": [(64, 64, 8, 3), (128, 64, 8, 2), (64, 128, 8, 2), (64, 64, 4, 3), (32, 64, 4, 3), (64, 32, 4, 3)],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=65536)
    args = p.parse_args()
    cfg, t, h, g, d = NSAConfig(), args.seq_len, 64, 4, 128
    dev, dt = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    q = torch.randn(1, t, h, d, device=dev, dtype=dt, requires_grad=True)
    branches = {
        "compressed": (cfg.num_compressed(t), dict(key_stride=cfg.compress_stride,
                                                   key_offset=cfg.compress_block_size - 1, window=None)),
        "window": (t, dict(key_stride=1, key_offset=0, window=cfg.window_size)),
    }
    default_tiles = ba._gpu_tiles
    for branch, (s, kw) in branches.items():
        k, v = (torch.randn(1, s, g, d, device=dev, dtype=dt, requires_grad=True) for _ in range(2))
        grad = torch.randn(1, t, h, d, device=dev, dtype=dt)

        def fwd():
            return ba.banded_attention(q, k, v, scale=d ** -0.5, **kw)[0]

        for kernel, options in CANDIDATES.items():
            for m, n, warps, stages in options:
                def tiles(name, dtype, block_d, by_tma=False, _k=kernel, _t=ba._Tiles(m, n, warps, stages, pack=2)):
                    return _t if name == _k else default_tiles(name, dtype, block_d, by_tma)

                ba._gpu_tiles = tiles
                ba._dkdv_splits.cache_clear()
                if kernel == "fwd":
                    ms = triton.testing.do_bench(fwd, warmup=50, rep=300, return_mode="median")
                else:
                    out = fwd()
                    ms = triton.testing.do_bench(lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True),
                                                 warmup=50, rep=300, return_mode="median")
                label = "fwd" if kernel == "fwd" else "bwd (dq + dkdv)"
                print(f"{branch:10s} {kernel:5s} m={m} n={n} warps={warps} stages={stages}: {label} {ms:.2f} ms",
                      flush=True)
                ba._gpu_tiles = default_tiles


if __name__ == "__main__":
    main()
