"""nsa-parallel's kernels vs flash-linear-attention's public NSA (`fla.ops.nsa.parallel_nsa`), side by side.

fla's NSA simplifies the paper: compressed tokens are the mean of each 64-token block (no
learned phi, no overlap), and all branches share one K/V. So both sides here get exactly that:
the same q, one k/v, the same mean-pooled compressed tokens, 16 selected blocks of 64 (the
first and the two local blocks forced), gates after the sigmoid. Rows:

- "cmp + slc": compressed and selected branches and their gated sum, which is all fla computes
  itself (its window branch calls the flash-attn package);
- "cmp + slc + win": with the 512-token window, where flash-attn is installed for fla.

Before timing, the outputs of the two are compared (norm-wise relative difference; blocks whose
scores tie in bf16 may be picked differently, so it is small, not zero). Needs a CUDA GPU and
`fla-core` + `einops` (`pip install fla-core einops`, or carry their wheels to the device).
`--check-naive` (CPU is enough) first checks that the two define the same function: fla's
`naive_nsa` against this project's float64 reference on small random inputs.

    python benchmarks/bench_public_nsa.py --seq-lens 16384 32768 65536
    python benchmarks/bench_public_nsa.py --check-naive --seq-lens
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import sys
import time

import torch
import triton
from bench_attention import bench, forward_backward

from nsa_parallel import KV, BranchKV, Compressors, NSAConfig, nsa_core, ops

BLOCK = 64
CONFIG = NSAConfig(compress_block_size=BLOCK, compress_stride=BLOCK, select_block_size=BLOCK,
                   num_selected_blocks=16, window_size=512)


def mean_pool(x: torch.Tensor) -> torch.Tensor:
    """``[B, T, G, d]`` -> the mean of each whole 64-token block, ``[B, T // 64, G, d]``."""
    b, t, g, d = x.shape
    return x[:, : t // BLOCK * BLOCK].view(b, t // BLOCK, BLOCK, g, d).mean(2)


def ours(q, k, v, gates, window: bool):
    def run():
        if window:  # nsa_core takes gate logits
            return nsa_core(q, BranchKV(*(KV(k, v),) * 3), gates.logit(), Compressors(mean_pool, mean_pool), CONFIG,
                            backend="triton")
        k_cmp, v_cmp = mean_pool(k), mean_pool(v)
        o_cmp, lse = ops.compressed_attention(q, k_cmp, v_cmp, CONFIG, backend="triton", return_lse=True)
        idx = ops.select_blocks(q.detach(), k_cmp.detach(), CONFIG, backend="triton", lse=lse)
        o_slc = ops.selection_attention(q, k, v, idx, CONFIG, backend="triton")
        return torch.addcmul(o_slc * gates[..., 1, None], o_cmp, gates[..., 0, None])
    return run


def fla(parallel_nsa, q, k, v, gates, window: bool):
    def run():
        return parallel_nsa(q, k, v, g_cmp=gates[..., 0], g_slc=gates[..., 1],
                            g_swa=gates[..., 2] if window else None, block_counts=CONFIG.num_selected_blocks,
                            block_size=BLOCK, window_size=CONFIG.window_size if window else 0)
    return run


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check_against_fla_naive() -> None:
    """fla's naive NSA (its mean pooling swapped for ``mean_pool``: fla's is a Triton kernel) vs the
    float64 reference of this project, compressed + selected branches."""
    import fla.ops.nsa.naive as fla_naive

    fla_naive.mean_pooling = lambda x, block_size, cu_seqlens=None: mean_pool(x)
    torch.manual_seed(0)
    for t, n, h in ((512, 4, 16), (1024, 8, 16), (640, 16, 32)):
        cfg = NSAConfig(compress_block_size=BLOCK, compress_stride=BLOCK, select_block_size=BLOCK,
                        num_selected_blocks=n, window_size=CONFIG.window_size)
        q = torch.randn(1, t, h, 64, dtype=torch.float64)
        k, v = (torch.randn(1, t, h // 16, 64, dtype=torch.float64) for _ in range(2))
        gates = torch.sigmoid(torch.randn(1, t, h, 3, dtype=torch.float64))
        gates[..., 2] = 0
        o_fla = fla_naive.naive_nsa(q, k, v, g_cmp=gates[..., 0], g_slc=gates[..., 1], block_counts=n, block_size=BLOCK)
        o = nsa_core(q, BranchKV(*(KV(k, v),) * 3), gates.logit(), Compressors(mean_pool, mean_pool), cfg,
                     backend="reference")
        print(f"fla naive_nsa vs float64 reference, T={t}, {n} blocks, {h} heads: "
              f"relative difference {rel_diff(o_fla, o):.1e}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", type=int, nargs="*", default=[16384, 32768, 65536])
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--json", help="write results here")
    p.add_argument("--check-naive", action="store_true", help="first compare fla's naive NSA with the reference")
    args = p.parse_args()
    try:
        from fla.ops.nsa import parallel_nsa
    except ImportError as err:
        sys.exit(f"needs fla-core and einops (pip install fla-core einops): {err}")
    if args.check_naive:
        check_against_fla_naive()
    if not args.seq_lens:
        return
    try:
        import flash_attn  # noqa: F401  fla's window branch
        windows = (False, True)
    except ImportError:
        windows = (False,)

    dev, dt = torch.device("cuda"), torch.bfloat16
    h, g, d = args.heads, args.kv_heads, args.head_dim
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "fla": importlib.metadata.version("fla-core"), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python3"] + sys.argv), "rows": []}
    print(f"# {info['device']}, torch {info['torch']}, triton {info['triton']}, fla-core {info['fla']}, bf16, "
          f"B=1, H={h}, G={g}, d={d}, blocks of {BLOCK}, 16 selected, window {CONFIG.window_size}"
          + ("" if len(windows) == 2 else "; flash-attn not installed: no window rows"))
    print("| T | branches | fla fwd | ours fwd | fwd speed-up | fla f+b | ours f+b | f+b speed-up | output diff |")
    print("|" + "---|" * 9, flush=True)
    for t in args.seq_lens:
        torch.manual_seed(t)
        q = torch.randn(1, t, h, d, device=dev, dtype=dt, requires_grad=True)
        k, v = (torch.randn(1, t, g, d, device=dev, dtype=dt, requires_grad=True) for _ in range(2))
        gates = torch.sigmoid(torch.randn(1, t, h, 3, device=dev)).to(dt).requires_grad_()
        leaves = [q, k, v, gates]
        for window in windows:
            runs = {"fla": fla(parallel_nsa, q, k, v, gates, window), "ours": ours(q, k, v, gates, window)}
            with torch.no_grad():
                diff = rel_diff(runs["ours"](), runs["fla"]())
            row = {"T": t, "window": window, "output_rel_diff": diff}
            for name, run in runs.items():
                row[f"{name}_fwd"] = bench(run)
                row[f"{name}_fb"] = bench(forward_backward(run, leaves))
            row["speedup_fwd"], row["speedup_fb"] = row["fla_fwd"] / row["ours_fwd"], row["fla_fb"] / row["ours_fb"]
            info["rows"].append(row)
            print(f"| {t // 1024}k | {'cmp + slc + win' if window else 'cmp + slc'} | {row['fla_fwd']:.2f} | "
                  f"{row['ours_fwd']:.2f} | {row['speedup_fwd']:.2f}x | {row['fla_fb']:.2f} | {row['ours_fb']:.2f} | "
                  f"{row['speedup_fb']:.2f}x | {diff:.1e} |", flush=True)
        del q, k, v, gates, leaves
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()
