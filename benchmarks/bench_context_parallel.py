"""Context-parallel NSA on P GPUs vs the same sequence on one GPU: time, memory, bytes vs ring attention.

Launch one process per GPU (NCCL); world size 1 runs the single-GPU path:

    python -m torch.distributed.run --nproc_per_node=2 benchmarks/bench_context_parallel.py \\
        --seq-lens 131072 262144 --layouts zigzag contiguous --check 32768 --json out.json

Measures NSA attention (phi compression, the three branches, gates; no q/k/v/o
projections, as in bench_attention.py), bf16, 64 query heads / 4 KV heads,
d=128, paper defaults, forward+backward. ``--check T`` first compares CP output
and every gradient with the single-GPU path on the full sequence (each rank
recomputes it). Communication: bytes this rank sent, per path and phase, next
to what ring attention would send for the same shapes.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.distributed as dist

from nsa_parallel import NSAConfig
from nsa_parallel.compression import BlockCompressor
from nsa_parallel.context_parallel import CommStats, ContextParallel, ShardLayout, ring_attention_bytes
from nsa_parallel.core import KV, BranchKV, Compressors, nsa_core, token_positions
from nsa_parallel.rotary import rotary_angles

HEADS, GROUPS, DIM = 64, 4, 128
DTYPE = torch.bfloat16


def log(*args) -> None:
    if dist.get_rank() == 0:
        print(*args, flush=True)


class Problem:
    """Random inputs of ``length`` tokens of a ``seq``-token problem (the same on every rank for the
    same ``seed``) and the compressors (always the same)."""

    def __init__(self, seq: int, cfg: NSAConfig, device: torch.device, length: int, seed: int, batch: int = 1):
        dtype = DTYPE
        g = torch.Generator(device=device).manual_seed(seed)
        self.q = torch.randn(batch, length, HEADS, DIM, device=device, dtype=dtype, generator=g)
        self.kv = [torch.randn(batch, length, GROUPS, DIM, device=device, dtype=dtype, generator=g)
                   for _ in range(6)]
        self.gates = torch.randn(batch, length, HEADS, 3, device=device, dtype=dtype, generator=g)
        torch.manual_seed(0)
        self.compress_k = BlockCompressor(GROUPS, DIM, cfg, device=device, dtype=dtype)
        self.compress_v = BlockCompressor(GROUPS, DIM, cfg, device=device, dtype=dtype)
        self.cfg, self.seq = cfg, seq

    def leaves(self, positions: torch.Tensor | None) -> list[torch.Tensor]:
        pick = (lambda t: t) if positions is None else (lambda t: t[:, positions])
        return [pick(t).detach().clone().requires_grad_() for t in (self.q, *self.kv, self.gates)]

    def params(self) -> list[torch.Tensor]:
        return [*self.compress_k.parameters(), *self.compress_v.parameters()]

    def run(self, leaves, group=None, layout="zigzag", stats=None):
        q, k0, v0, k1, v1, k2, v2, gates = leaves
        kv = BranchKV(KV(k0, v0), KV(k1, v1), KV(k2, v2))
        cp = None if group is None else ContextParallel(group, layout, stats)
        rotary = rotary_angles(token_positions(q.shape[1], cp=cp, device=q.device), DIM)
        return nsa_core(q, kv, gates, Compressors(self.compress_k, self.compress_v), self.cfg, rotary=rotary, cp=cp)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def check(seq: int, cfg: NSAConfig, layout: str, device: torch.device) -> dict:
    """bf16 CP vs bf16 single GPU on the full sequence: relative errors of output and gradients."""
    world, rank = dist.get_world_size(), dist.get_rank()
    prob = Problem(seq, cfg, device, seq, seed=seq)
    positions = ShardLayout(layout, world, seq).local_positions(rank, device)
    full = prob.leaves(None)
    out_full = prob.run(full)
    grad_out = torch.randn_like(out_full)
    out_full.backward(grad_out)
    full_param_grads = [p.grad.clone() for p in prob.params()]
    for p in prob.params():
        p.grad = None
    local = prob.leaves(positions)
    out = prob.run(local, dist.group.WORLD, layout)
    out.backward(grad_out[:, positions])
    errors = {"output": rel(out, out_full[:, positions])}
    names = ["q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "gates"]
    for name, a, b in zip(names, local, full):
        errors[f"grad_{name}"] = rel(a.grad, b.grad[:, positions])
    for i, p in enumerate(prob.params()):
        dist.all_reduce(p.grad)
        errors[f"grad_phi{i}"] = rel(p.grad, full_param_grads[i])
    worst = torch.tensor(max(errors.values()), device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return {"seq": seq, "layout": layout, "errors_rank0": errors, "max_rel_err_all_ranks": worst.item()}


def time_step(seq: int, cfg: NSAConfig, layout: str | None, device: torch.device, iters: int) -> dict:
    world = dist.get_world_size()
    group = dist.group.WORLD if world > 1 else None
    # Each rank draws only its own tokens: at 1M tokens the full q alone is 16 GiB.
    prob = Problem(seq, cfg, device, seq // world, seed=seq + dist.get_rank())
    leaves = prob.leaves(None)
    del prob.q, prob.kv, prob.gates
    stats = CommStats()
    times = []
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for i in range(iters + 2):
        stats.reset()
        dist.barrier()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = prob.run(leaves, group, layout or "zigzag", stats)
        out.backward(torch.ones_like(out))
        if cuda:
            torch.cuda.synchronize()
        if i >= 2:
            times.append((time.perf_counter() - start) * 1e3)
        for t in (*leaves, *prob.params()):
            t.grad = None
        del out
    ms = torch.tensor(statistics.median(times), device=device)
    dist.all_reduce(ms, op=dist.ReduceOp.MAX)  # the step ends when the slowest rank does
    peak = torch.tensor(torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0, device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    sent = torch.tensor(stats.total()[0], device=device, dtype=torch.float64)
    dist.all_reduce(sent, op=dist.ReduceOp.MAX)
    ring = ring_attention_bytes(seq, world, 1, GROUPS, DIM, DIM, DTYPE.itemsize)
    return {"seq": seq, "gpus": world, "layout": layout if group is not None else "single", "ms": ms.item(),
            "peak_gib": peak.item(), "sent_bytes_max_rank": sent.item(),
            "sent_by_path_rank0": stats.as_dict(), "ring_bytes": ring["forward"] + ring["backward"],
            "ring_ratio": sent.item() / max(1, ring["forward"] + ring["backward"]) if world > 1 else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[131072, 262144])
    parser.add_argument("--layouts", nargs="+", default=["zigzag", "contiguous"])
    parser.add_argument("--check", type=int, default=0, help="sequence length of the bf16 CP-vs-1-GPU check")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--json", default=None)
    parser.add_argument("--cpu", action="store_true",
                        help="smoke run: gloo, float32, tiny heads and NSA sizes (the reference ops)")
    args = parser.parse_args()

    global HEADS, GROUPS, DIM, DTYPE
    if args.cpu:
        HEADS, GROUPS, DIM, DTYPE = 4, 2, 16, torch.float32
        device = torch.device("cpu")
        dist.init_process_group("gloo")
        cfg = NSAConfig(16, 8, 16, 4, 32)
    else:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=device)
        cfg = NSAConfig()
    world = dist.get_world_size()
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "gpus": world, "torch": torch.__version__,
               "python": platform.python_version(), "date": datetime.date.today().isoformat(),
               "command": " ".join(sys.argv), "checks": [], "steps": []}
    import triton
    results["triton"] = triton.__version__
    log(f"{world} x {results['device']}, torch {torch.__version__}, triton {triton.__version__}")
    if args.check and world > 1:
        for layout in args.layouts:
            r = check(args.check, cfg, layout, device)
            results["checks"].append(r)
            log(f"check T={args.check} {layout}: max rel err {r['max_rel_err_all_ranks']:.2e} {r['errors_rank0']}")
    log("| T | GPUs | layout | f+b ms | peak GiB/GPU | sent MiB/rank (max) | ring MiB/rank | ratio |")
    log("|---|---|---|---|---|---|---|---|")
    for seq in args.seq_lens:
        for layout in (args.layouts if world > 1 else [None]):
            try:
                r = time_step(seq, cfg, layout, device, args.iters)
            except torch.OutOfMemoryError:
                if world > 1:  # the other ranks may be inside a collective: do not try to go on
                    raise
                r = {"seq": seq, "gpus": world, "layout": "single", "oom": True}
                torch.cuda.empty_cache()
            results["steps"].append(r)
            if r.get("oom"):
                log(f"| {seq} | {world} | {r['layout']} | OOM | | | | |")
                continue
            ratio = f"{r['ring_ratio']:.3f}" if r["ring_ratio"] is not None else "-"
            log(f"| {seq} | {world} | {r['layout']} | {r['ms']:.1f} | {r['peak_gib']:.1f} | "
                f"{r['sent_bytes_max_rank'] / 2**20:.0f} | {r['ring_bytes'] / 2**20:.0f} | {ratio} |")
            if dist.get_rank() == 0 and world > 1:
                log("   rank 0 by path:", {k: round(v / 2**20, 1) for k, v in r["sent_by_path_rank0"].items() if v})
    if args.json and dist.get_rank() == 0:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
