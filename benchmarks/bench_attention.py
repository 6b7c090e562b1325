"""NSA vs full causal attention (PyTorch SDPA flash / cuDNN), side by side in one run.

Times, on one GPU in bf16, the full NSA attention (learned compression phi of keys and
values, gate sigmoid, compressed + selected + sliding-window branches and the gated sum)
against SDPA causal attention with GQA, forward and forward+backward. Projections
(q/k/v/o) are left out on both sides. Prints a markdown table; with --json/--plot writes
the numbers and a PNG.

    python benchmarks/bench_attention.py --seq-lens 8192 16384 32768 65536 131072
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from nsa_parallel import KV, BranchKV, Compressors, NSAConfig, nsa_core, ops
from nsa_parallel.compression import BlockCompressor


def bench(fn, warmup_ms: int = 100, rep_ms: int = 500) -> float:
    return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def sdpa_runner(backend: SDPBackend, q, k, v):
    """q/k/v in SDPA's [B, heads, T, d] layout; GQA through enable_gqa."""
    def run():
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return run


def nsa_runner(cfg: NSAConfig, q, kv, gate_logits, compress_k, compress_v, backend: str = "triton"):
    """NSA after the projections, without rotary: phi, the three branches, the gate sigmoid and sum."""
    branch_kv = BranchKV(KV(kv[0], kv[1]), KV(kv[2], kv[3]), KV(kv[4], kv[5]))

    def run():
        return nsa_core(q, branch_kv, gate_logits, Compressors(compress_k, compress_v), cfg, backend=backend)
    return run


def forward_backward(run, inputs):
    def fb():
        out = run()
        grad = torch.ones_like(out)
        torch.autograd.backward(out, grad, inputs=inputs)
    return fb


def component_times(cfg, q, kv, gate_logits, compress_k, compress_v) -> dict[str, tuple[float, float]]:
    """(forward, forward+backward) ms of each NSA stage, to see where the time goes."""
    from nsa_kernels.banded_attention import banded_attention
    from nsa_kernels.gated_combine import gated_combine

    k_raw, v_raw, k_slc, v_slc, k_win, v_win = kv
    scale = q.shape[-1] ** -0.5
    with torch.no_grad():
        k_cmp, v_cmp = compress_k(k_raw), compress_v(v_raw)
        _, lse = banded_attention(q, k_cmp, v_cmp, key_stride=cfg.compress_stride,
                                  key_offset=cfg.compress_block_size - 1, window=None, scale=scale)
        idx = ops.select_blocks(q, k_cmp, cfg, lse=lse)
        outs = [torch.randn_like(q) for _ in range(3)]
    k_cmp, v_cmp = (x.detach().requires_grad_() for x in (k_cmp, v_cmp))
    outs = [o.requires_grad_() for o in outs]
    gates = torch.sigmoid(gate_logits).detach().requires_grad_()
    stages = {
        "phi (k and v)": (lambda: compress_k(k_raw) + compress_v(v_raw),
                          [k_raw, v_raw, *compress_k.parameters(), *compress_v.parameters()]),
        "compressed attn": (lambda: banded_attention(q, k_cmp, v_cmp, key_stride=cfg.compress_stride,
                                                     key_offset=cfg.compress_block_size - 1, window=None,
                                                     scale=scale)[0], [q, k_cmp, v_cmp]),
        "selection attn": (lambda: ops.selection_attention(q, k_slc, v_slc, idx, cfg), [q, k_slc, v_slc]),
        "window attn": (lambda: ops.window_attention(q, k_win, v_win, cfg.window_size), [q, k_win, v_win]),
        "gated combine": (lambda: gated_combine(*outs, gates), [*outs, gates]),
    }
    times = {name: (bench(run), bench(forward_backward(run, inputs))) for name, (run, inputs) in stages.items()}
    times["select blocks"] = (bench(lambda: ops.select_blocks(q, k_cmp, cfg, lse=lse)), float("nan"))
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--components", action="store_true", help="also time each NSA stage (forward)")
    p.add_argument("--json", help="write results here")
    p.add_argument("--plot", help="write a PNG plot here")
    args = p.parse_args()

    cfg, dev, dt = NSAConfig(), torch.device("cuda"), torch.bfloat16
    h, g, d = args.heads, args.kv_heads, args.head_dim
    compress_k = BlockCompressor(g, d, cfg, device=dev, dtype=dt)
    compress_v = BlockCompressor(g, d, cfg, device=dev, dtype=dt)
    info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
            "command": " ".join([sys.executable.split("/")[-1]] + sys.argv), "rows": []}
    print(f"# {info['device']}, torch {info['torch']}, triton {info['triton']}, bf16, B=1, H={h}, G={g}, d={d}, {cfg}")
    header = "| T | flash fwd | cuDNN fwd | NSA fwd | fwd speed-up | flash f+b | cuDNN f+b | NSA f+b | f+b speed-up |"
    print(header + "\n|" + "---|" * 9, flush=True)
    for t in args.seq_lens:
        torch.manual_seed(t)
        q = torch.randn(1, t, h, d, device=dev, dtype=dt, requires_grad=True)
        kv = [torch.randn(1, t, g, d, device=dev, dtype=dt, requires_grad=True) for _ in range(6)]
        gate_logits = torch.randn(1, t, h, 3, device=dev, dtype=dt, requires_grad=True)
        qs, ks, vs = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, kv[0], kv[1]))
        row = {"T": t}
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
            run = sdpa_runner(backend, qs, ks, vs)
            try:
                row[f"{name}_fwd"] = bench(run)
                row[f"{name}_fb"] = bench(forward_backward(run, [qs, ks, vs]))
            except RuntimeError as err:  # a backend may not take these shapes
                print(f"  {name} unavailable at T={t}: {str(err).splitlines()[0]}", flush=True)
                row[f"{name}_fwd"] = row[f"{name}_fb"] = float("nan")
        run = nsa_runner(cfg, q, kv, gate_logits, compress_k, compress_v)
        row["nsa_fwd"] = bench(run)
        params = [q, *kv, gate_logits, *compress_k.parameters(), *compress_v.parameters()]
        row["nsa_fb"] = bench(forward_backward(run, params))
        best_fwd = min(x for x in (row["flash_fwd"], row["cudnn_fwd"]) if x == x)
        best_fb = min(x for x in (row["flash_fb"], row["cudnn_fb"]) if x == x)
        row["speedup_fwd"], row["speedup_fb"] = best_fwd / row["nsa_fwd"], best_fb / row["nsa_fb"]
        if args.components:
            row["components"] = component_times(cfg, q, kv, gate_logits, compress_k, compress_v)
        info["rows"].append(row)
        print(f"| {t // 1024}k | {row['flash_fwd']:.2f} | {row['cudnn_fwd']:.2f} | {row['nsa_fwd']:.2f} | "
              f"{row['speedup_fwd']:.2f}x | {row['flash_fb']:.2f} | {row['cudnn_fb']:.2f} | {row['nsa_fb']:.2f} | "
              f"{row['speedup_fb']:.2f}x |", flush=True)
        if args.components:
            print("  stages (fwd / fwd+bwd ms): " + ", ".join(
                f"{k} {f:.2f} / {fb:.2f}" for k, (f, fb) in row["components"].items()), flush=True)
        del q, kv, gate_logits, qs, ks, vs
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=1)
    if args.plot:
        plot(info, args.plot)


def plot(info: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = info["rows"]
    ts = [r["T"] // 1024 for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, kind, title in ((axes[0], "fwd", "forward"), (axes[1], "fb", "forward + backward")):
        for key, label in (("flash", "SDPA flash"), ("cudnn", "SDPA cuDNN"), ("nsa", "NSA (Triton)")):
            ax.plot(ts, [r[f"{key}_{kind}"] for r in rows], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (k tokens)")
        ax.set_ylabel("ms (median)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"{info['device']}, bf16, B=1, 64 heads / 4 KV heads, d=128")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
