"""Sweeps the top-n launch settings (rows and entries per program) of block selection on one GPU.

    python benchmarks/tune_top_n.py --seq-len 65536
"""
from __future__ import annotations

import argparse
import itertools

import torch
import triton

import nsa_kernels.block_selection as bs
from nsa_parallel import NSAConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=65536)
    args = p.parse_args()
    cfg, t, g = NSAConfig(), args.seq_len, 4
    num_blocks = -(-t // cfg.select_block_size)
    torch.manual_seed(0)
    scores = torch.rand(1, g, t, num_blocks, device="cuda")
    out = torch.empty(1, t, g, cfg.num_selected_blocks, dtype=torch.int32, device="cuda")

    def run():
        bs._top_n(scores, out, 0, t, 0, num_blocks, cfg.select_block_size, cfg.num_selected_blocks)

    default = (bs.TOP_N_ROWS, bs.TOP_N_ELEMENTS)
    print(f"T={t}: default {default}: {triton.testing.do_bench(run, warmup=50, rep=200):.3f} ms", flush=True)
    for rows, elements in itertools.product((1, 2, 4, 8, 32), (512, 1024, 2048, 4096)):
        bs.TOP_N_ROWS, bs.TOP_N_ELEMENTS = rows, elements
        print(f"rows {rows} elements {elements}: "
              f"{triton.testing.do_bench(run, warmup=20, rep=100):.3f} ms", flush=True)
    bs.TOP_N_ROWS, bs.TOP_N_ELEMENTS = default


if __name__ == "__main__":
    main()
