"""A/B of source trees: NSA forward and forward+backward (bench_attention's shapes), interleaved.

Kernel changes move NSA's time by a few percent, less than the spread between machines, so a
change is judged against its base on one GPU in one call: each tree (a directory holding
``nsa_parallel/`` and ``kernels/``) is timed in its own process, rounds interleaved.

    git archive main nsa_parallel kernels | tar -x -C ab/main          # here, per revision
    git archive wip/x nsa_parallel kernels | tar -x -C ab/wip-x
    python3 benchmarks/ab_trees.py ab/main ab/wip-x --seq-len 65536    # on the device (carry ab/)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent

# NSA after the projections, rotary included, through whichever entry point the tree has.
CHILD = r'''
import sys, torch
sys.path.insert(0, sys.argv[1])
from bench_attention import forward_backward, bench
from nsa_parallel import NSAConfig
from nsa_parallel.compression import BlockCompressor
from nsa_parallel.rotary import rotary_angles
cfg, dev, dt = NSAConfig(), torch.device("cuda"), torch.bfloat16
t, h, g, d = int(sys.argv[2]), 64, 4, 128
torch.manual_seed(t)
ck, cv = (BlockCompressor(g, d, cfg, device=dev, dtype=dt) for _ in range(2))
q = torch.randn(1, t, h, d, device=dev, dtype=dt, requires_grad=True)
kv = [torch.randn(1, t, g, d, device=dev, dtype=dt, requires_grad=True) for _ in range(6)]
gates = torch.randn(1, t, h, 3, device=dev, dtype=dt, requires_grad=True)
cos, sin = rotary_angles(torch.arange(t, device=dev), d)
try:
    from nsa_parallel.core import KV, BranchKV, Compressors, nsa_core
    from nsa_parallel.rotary import Rotary
    branch_kv = BranchKV(KV(kv[0], kv[1]), KV(kv[2], kv[3]), KV(kv[4], kv[5]))
    run = lambda: nsa_core(q, branch_kv, gates, Compressors(ck, cv), cfg, rotary=Rotary(cos, sin))
except ImportError:  # a tree from before the one NSA core
    from nsa_parallel.layer import nsa_branches
    pairs = [(kv[0], kv[1]), (kv[2], kv[3]), (kv[4], kv[5])]
    run = lambda: nsa_branches(q, pairs, gates, ck, cv, cos, sin, cfg)
fwd = bench(run, 200, 1500)
fb = bench(forward_backward(run, [q, *kv, gates, *ck.parameters(), *cv.parameters()]), 200, 2000)
print(f"RESULT {fwd} {fb}")
'''


def time_tree(tree: Path, seq_len: int) -> tuple[float, float]:
    path = os.pathsep.join([str(tree), str(tree / "kernels")])
    out = subprocess.run([sys.executable, "-c", CHILD, str(BENCHMARKS), str(seq_len)], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": path})
    result = [line for line in out.stdout.splitlines() if line.startswith("RESULT")]
    if not result:
        raise RuntimeError(f"{tree} failed:\n{out.stderr[-3000:]}")
    fwd, fb = map(float, result[0].split()[1:])
    return fwd, fb


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trees", type=Path, nargs="+", help="directories with nsa_parallel/ and kernels/")
    p.add_argument("--seq-len", type=int, default=65536)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", help="write the times here")
    args = p.parse_args()
    times: dict[str, list[tuple[float, float]]] = {str(t): [] for t in args.trees}
    for _ in range(args.rounds):
        for tree in args.trees:
            fwd, fb = time_tree(tree, args.seq_len)
            times[str(tree)].append((fwd, fb))
            print(f"{tree}: forward {fwd:.2f} ms, forward+backward {fb:.2f} ms", flush=True)
    print(f"\n| tree (T={args.seq_len}) | forward (ms, median) | forward+backward (ms, median) |\n|---|---|---|")
    for tree, rows in times.items():
        print(f"| {tree} | {statistics.median(r[0] for r in rows):.2f} | {statistics.median(r[1] for r in rows):.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"seq_len": args.seq_len, "times": times}, indent=1))


if __name__ == "__main__":
    main()
