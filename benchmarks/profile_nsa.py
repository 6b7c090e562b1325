"""Per-kernel GPU time of the NSA attention (forward, or forward+backward), from torch.profiler.

Same inputs as ``bench_attention.py`` (bf16, B=1, 64 heads / 4 KV heads, d=128, paper
defaults). Prints one line per kernel name: total ms per call, launches per call, share.

    python benchmarks/profile_nsa.py --seq-len 65536 [--backward]
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from bench_attention import forward_backward, nsa_runner
from nsa_parallel import NSAConfig
from nsa_parallel.compression import BlockCompressor


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=65536)
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--backward", action="store_true", help="profile forward+backward")
    p.add_argument("--calls", type=int, default=5)
    args = p.parse_args()

    cfg, dev, dt = NSAConfig(), torch.device("cuda"), torch.bfloat16
    t, h, g, d = args.seq_len, args.heads, args.kv_heads, args.head_dim
    torch.manual_seed(t)
    compress_k = BlockCompressor(g, d, cfg, device=dev, dtype=dt)
    compress_v = BlockCompressor(g, d, cfg, device=dev, dtype=dt)
    q = torch.randn(1, t, h, d, device=dev, dtype=dt, requires_grad=True)
    kv = [torch.randn(1, t, g, d, device=dev, dtype=dt, requires_grad=True) for _ in range(6)]
    gate_logits = torch.randn(1, t, h, 3, device=dev, dtype=dt, requires_grad=True)
    run = nsa_runner(cfg, q, kv, gate_logits, compress_k, compress_v)
    if args.backward:
        run = forward_backward(run, [q, *kv, gate_logits, *compress_k.parameters(), *compress_v.parameters()])
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.calls):
            run()
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] += event.device_time / 1e3
            counts[event.name] += 1
    whole = sum(totals.values()) / args.calls
    kind = "forward+backward" if args.backward else "forward"
    print(f"# {torch.cuda.get_device_name()}, T={t}, {kind}: {whole:.2f} ms of kernels per call")
    for name, ms in sorted(totals.items(), key=lambda kv: -kv[1]):
        per_call = ms / args.calls
        print(f"{per_call:8.3f} ms  x{counts[name] // args.calls:<3d} {100 * per_call / whole:5.1f}%  {name[:110]}")


if __name__ == "__main__":
    main()
