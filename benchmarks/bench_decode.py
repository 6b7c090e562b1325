"""NSA decode vs dense decode with a KV cache: time per step of one layer's attention.

For each context length T and batch B, every sequence holds T tokens and decodes one more:

- NSA attention (``decode_attention``: compressed, top-n, selected, window, gated sum), eager and
  replayed from a CUDA graph;
- a whole NSA decode step from a CUDA graph: rotary, cache append, ``phi`` of the finished
  compression blocks and the attention (``decode``; with ``phi`` on every step, and without it,
  which is what 15 of every 16 steps need: a block ends every ``d`` tokens);
- dense decode over the same cache: torch SDPA's backends (flash, cuDNN, memory-efficient, with
  GQA), flash-attn's ``flash_attn_with_kvcache`` when importable, and this repository's split-K
  Triton dense decode (``nsa_kernels.decode.dense_decode``), each eager and from a CUDA graph.

The speed-up is the fastest dense time (any method, eager or graph) over NSA's graph time. Every
timed call starts with a cold L2 (as in a many-layer model, where each layer's cache is new to
it) unless ``--hot-l2``. Projections are left out on both sides. bf16, paper settings (l=32,
d=16, l'=64, n=16, w=512) and 64 query / 4 KV heads, d=128 by default; writes JSON and markdown.

    python benchmarks/bench_decode.py --json decode.json --markdown decode.md
    python benchmarks/bench_decode.py --device cpu --tiny        # the reference path end to end, seconds
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from nsa_parallel import KV, BranchKV, Compressors, NSAConfig
from nsa_parallel.compression import BlockCompressor
from nsa_parallel.inference import NSAKVCache, decode, decode_attention
from nsa_parallel.rotary import rotary_angles

STEP_MARGIN = 1024  # cache slots past T for the timed full steps, which advance the lengths


class Timer:
    """ms per call: median over ``reps`` calls, each timed alone (CUDA events, L2 flushed before each
    unless ``hot``), after ``warmup`` calls; on the CPU, wall clock."""

    def __init__(self, device: torch.device, reps: int, warmup: int, hot: bool):
        self.device, self.reps, self.warmup, self.hot = device, reps, warmup, hot
        self.flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device) if device.type == "cuda" else None

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.reps):
            if self.device.type != "cuda":
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e3)
                continue
            if not self.hot:
                self.flush.zero_()
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(begin.elapsed_time(end))
        return statistics.median(times)


def graphed(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` captured in a CUDA graph (warmed up on a side stream first, as torch asks); returns replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def dense_methods(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> dict[str, Callable]:
    """Dense decode of ``q [B, H, d]`` over ``k``/``v [B, S, G, d]`` (the first ``T`` rows valid)."""
    batch, heads, dim = q.shape
    seq = int(lengths[0])
    scale = dim ** -0.5
    methods: dict[str, Callable] = {}
    if q.is_cuda:
        from nsa_kernels.decode import dense_decode

        methods["triton split-K (ours)"] = lambda: dense_decode(q, k, v, lengths, scale=scale)
        try:
            from flash_attn import flash_attn_with_kvcache

            q4, seqlens = q[:, None].contiguous(), lengths.to(torch.int32)
            methods["flash_attn_with_kvcache"] = lambda: flash_attn_with_kvcache(q4, k, v, cache_seqlens=seqlens)
        except ImportError:
            pass
    # SDPA's layout [B, heads, T, d]: a contiguous KV cache of exactly T rows (its best case).
    qs = q[:, :, None]
    ks, vs = (x[:, :seq].transpose(1, 2).contiguous() for x in (k, v))
    backends = {"SDPA flash": SDPBackend.FLASH_ATTENTION, "SDPA cuDNN": SDPBackend.CUDNN_ATTENTION,
                "SDPA efficient": SDPBackend.EFFICIENT_ATTENTION} if q.is_cuda else {"SDPA math": SDPBackend.MATH}
    for name, backend in backends.items():
        def run(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qs, ks, vs, scale=scale, enable_gqa=True)
        methods[name] = run
    return methods


def measure(cfg: NSAConfig, seq: int, batch: int, args: argparse.Namespace, timer: Timer) -> dict:
    dev, dt = torch.device(args.device), args.dtype
    h, g, d = args.heads, args.kv_heads, args.head_dim
    gen = torch.Generator(device=dev).manual_seed(seq + batch)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=dev, dtype=dt)

    phi = Compressors(*(BlockCompressor(g, d, cfg, device=dev, dtype=dt) for _ in range(2)))
    capacity = seq + STEP_MARGIN
    cache = NSAKVCache(cfg, batch, capacity, g, d, device=dev, dtype=dt)
    # The cache as a prefill of T random tokens leaves it (one tensor for every branch's keys
    # and one for the values, to spare memory; the decode kernels do not care).
    k, v = randn(batch, seq, g, d), randn(batch, seq, g, d)
    num_cmp = cfg.num_compressed(seq)
    cache.prefill(k, v, k, v, k, v, randn(batch, num_cmp, g, d), randn(batch, num_cmp, g, d))
    del k, v
    q, gates = randn(batch, h, d), torch.sigmoid(randn(batch, h, 3))
    backend = args.backend
    row = {"T": seq, "B": batch}
    attention = lambda: decode_attention(q, gates, cache, backend=backend)  # noqa: E731
    row["nsa_attn"] = timer(attention)
    if dev.type == "cuda":
        row["nsa_attn_graph"] = timer(graphed(attention))

    # Whole steps advance the lengths by one per call: at most STEP_MARGIN calls in all.
    rotary = rotary_angles(torch.arange(capacity, device=dev), d)
    x_q, x_g = randn(batch, 1, h, d), randn(batch, 1, h, 3)
    x_kv = BranchKV(*(KV(randn(batch, 1, g, d), randn(batch, 1, g, d)) for _ in range(3)))
    for run_phi in (True, False):
        key = "nsa_step_phi" if run_phi else "nsa_step_no_phi"
        cache.sync_host_lengths()  # replays advanced only the device lengths
        if not run_phi and cache.block_ends_now():  # keep to steps where no block ends
            continue
        step = lambda run_phi=run_phi: decode(cache, x_q, x_kv, x_g, phi, rotary,  # noqa: E731
                                              backend=backend, run_phi=run_phi)
        if dev.type == "cuda":
            row[key + "_graph"] = timer(graphed(step))  # replays skip the host checks
        elif run_phi:
            row[key] = timer(step)
    lengths = torch.full((batch,), seq, device=dev, dtype=torch.int64)
    dense_k, dense_v = cache.k_slc[:, :capacity], cache.v_slc[:, :capacity]  # a dense KV cache's layout
    for name, fn in dense_methods(q, dense_k, dense_v, lengths).items():
        try:
            row[name] = timer(fn)
            if dev.type == "cuda":
                row[name + " graph"] = timer(graphed(fn))
        except (RuntimeError, ValueError) as err:  # a backend may refuse these shapes
            print(f"  {name} at T={seq}, B={batch}: {str(err).splitlines()[0][:120]}", flush=True)
    dense = {k_: v_ for k_, v_ in row.items() if k_.startswith(("SDPA", "flash", "triton"))}
    best = min(dense, key=dense.get)
    nsa = row.get("nsa_attn_graph", row["nsa_attn"])
    row.update(best_dense=best, best_dense_ms=dense[best], speedup=dense[best] / nsa)
    per_seq = NSAKVCache(cfg, 1, seq, g, d, device="meta", dtype=dt).bytes_per_sequence()
    row["cache_bytes_per_seq"] = {"nsa": per_seq["total"], "dense": per_seq["selection"]}
    return row


def markdown(info: dict) -> str:
    graph = info["device"] != "cpu"
    head = ["T", "B", "NSA attn", "NSA attn (graph)" if graph else None,
            "NSA step (graph): phi / no phi" if graph else "NSA step", "best dense", "best dense ms", "speed-up"]
    head = [h_ for h_ in head if h_]
    lines = [f"{info['device']}, torch {info['torch']}, triton {info['triton']}, {info['dtype']}, "
             f"H={info['heads']}, G={info['kv_heads']}, d={info['head_dim']}, {info['config']}; "
             f"ms per step, L2 {'hot' if info['hot_l2'] else 'cold'}; `{info['command']}`", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in info["rows"]:
        cells = [f"{r['T'] // 1024}k" if r["T"] >= 1024 else str(r["T"]), str(r["B"]), f"{r['nsa_attn']:.3f}"]
        if graph:
            cells += [f"{r['nsa_attn_graph']:.3f}",
                      f"{r.get('nsa_step_phi_graph', math.nan):.3f} / {r.get('nsa_step_no_phi_graph', math.nan):.3f}"]
        else:
            cells.append(f"{r.get('nsa_step_phi', math.nan):.3f}")
        cells += [r["best_dense"], f"{r['best_dense_ms']:.3f}", f"{r['speedup']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Every dense method (ms):", ""]
    for r in info["rows"]:
        dense = ", ".join(f"{k}: {v:.3f}" for k, v in r.items() if k.startswith(("SDPA", "flash", "triton")))
        lines.append(f"- T={r['T']}, B={r['B']}: {dense}")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--device", default="cuda")
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "triton"])
    p.add_argument("--tiny", action="store_true", help="small sizes and NSA blocks (a CPU check that it all runs)")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--hot-l2", action="store_true", help="do not flush the L2 cache before each timed call")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--markdown", help="write the markdown table here")
    args = p.parse_args()
    cfg = NSAConfig()
    if args.tiny:
        cfg = NSAConfig(compress_block_size=16, compress_stride=8, select_block_size=32, num_selected_blocks=4,
                        window_size=64)
        args.seq_lens, args.batch_sizes, args.heads, args.kv_heads, args.head_dim = [256, 1024], [1, 2], 4, 2, 32
    args.dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    dev = torch.device(args.device)
    reps = min(args.reps, (STEP_MARGIN - 8) // 2 - 8)  # warm-up + timed calls of each whole-step variant
    timer = Timer(dev, reps=reps if dev.type == "cuda" else 3, warmup=5 if dev.type == "cuda" else 1,
                  hot=args.hot_l2)
    import triton

    info = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
            "triton": triton.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
            "command": " ".join(["python"] + sys.argv), "dtype": str(args.dtype).replace("torch.", ""),
            "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim, "config": str(cfg),
            "hot_l2": args.hot_l2, "rows": []}
    for seq in args.seq_lens:
        for batch in args.batch_sizes:
            row = measure(cfg, seq, batch, args, timer)
            info["rows"].append(row)
            print(json.dumps(row), flush=True)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    table = markdown(info)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
