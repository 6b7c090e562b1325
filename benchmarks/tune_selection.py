"""Sweeps the selection-attention launch settings (warps, pipeline stages, gathered rows) on one GPU.

    python benchmarks/tune_selection.py --seq-len 65536
"""
from __future__ import annotations

import argparse
import itertools

import torch
import triton

import nsa_kernels.selection_attention as sa
from nsa_parallel import NSAConfig, ops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=65536)
    args = p.parse_args()
    cfg, t, h, g, d = NSAConfig(), args.seq_len, 64, 4, 128
    dev, dt = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    q = torch.randn(1, t, h, d, device=dev, dtype=dt, requires_grad=True)
    k, v = (torch.randn(1, t, g, d, device=dev, dtype=dt, requires_grad=True) for _ in range(2))
    k_cmp = torch.randn(1, cfg.num_compressed(t), g, d, device=dev, dtype=dt)
    idx = ops.select_blocks(q.detach(), k_cmp, cfg)
    grad = torch.randn(1, t, h, d, device=dev, dtype=dt)

    def fwd():
        return sa.selection_attention(q, k, v, idx, select_block_size=cfg.select_block_size, scale=d ** -0.5)

    out = fwd()

    def bwd():
        torch.autograd.grad(out, (q, k, v), grad, retain_graph=True)

    def time_it(fn):
        return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")

    print(f"T={t}: default fwd {time_it(fwd):.2f} ms, bwd {time_it(bwd):.2f} ms", flush=True)
    # The settings of the path these shapes take: TMA tiles where they apply, else gathers.
    tma = sa._kv_descriptors(k, v, cfg.select_block_size) is not None
    fwd_launch, dq_launch = (sa.FWD_LAUNCH_TMA, sa.DQ_LAUNCH_TMA) if tma else (sa.FWD_LAUNCH, sa.DQ_LAUNCH)
    print(f"K/V tiles by {'TMA' if tma else 'gather'}", flush=True)
    default = (dict(fwd_launch), dict(dq_launch), dict(sa.DKDV_LAUNCH), sa.DKDV_ROWS)
    for warps, stages in itertools.product((2, 4), (2, 3, 4)):
        fwd_launch.update(num_warps=warps, num_stages=stages)
        print(f"fwd  warps {warps} stages {stages}: {time_it(fwd):.2f} ms", flush=True)
    fwd_launch.update(default[0])
    out = fwd()
    for warps, stages in itertools.product((2, 4), (2, 3)):
        dq_launch.update(num_warps=warps, num_stages=stages)
        print(f"bwd dq warps {warps} stages {stages}: {time_it(bwd):.2f} ms", flush=True)
    dq_launch.update(default[1])
    for warps, stages, rows in itertools.product((4,), (2, 3), (64, 128)):
        sa.DKDV_LAUNCH.update(num_warps=warps, num_stages=stages)
        sa.DKDV_ROWS = rows
        try:
            print(f"bwd dkdv warps {warps} stages {stages} rows {rows}: {time_it(bwd):.2f} ms", flush=True)
        except triton.runtime.errors.OutOfResources as err:  # shared memory, at 3 stages x 128 rows
            print(f"bwd dkdv warps {warps} stages {stages} rows {rows}: {err}", flush=True)


if __name__ == "__main__":
    main()
