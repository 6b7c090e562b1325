"""Does a Triton kernel whose loops fetch tiles by TMA hang when a loop runs only once?

The banded dK/dV kernel hung on an H200 (triton 3.6) with its Q/dO tiles by TMA at 2 pipeline
stages when a program's first loop ran 0 times and its second once (docs/KERNELS.md); it now
gathers those tiles. This is the same shape stripped down, a standalone reproducer for Triton and a
check before turning TMA back on: a stationary ``[N, d]`` tile, then two loops over ``[M, d]`` row
boxes of a descriptor, each feeding two dots into float32 accumulators (as dK/dV does). Each
(trip counts, stages) variant runs in its own process under a timeout; float16, so the result
is also checked (the CPU interpreter runs the child too, with `device="cpu"`). GPU only (sm_90+).
If nothing here hangs, the hang needs more of the real kernel (masks, row offsets, splits):
bisect from `_dkdv_kernel` at commit 506d03f, where `test_matches_reference[compressed-two-
tokens-B2-torch.float16]` hangs.

    python benchmarks/probe_tma_short_loops.py
"""
from __future__ import annotations

import itertools
import subprocess
import sys

CHILD = r"""
import sys, torch, triton, triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

@triton.jit
def two_loops(K, X_DESC, OUT, TRIPS_A, TRIPS_B, M: tl.constexpr, N: tl.constexpr, D: tl.constexpr):
    offs_n, offs_d = tl.arange(0, N), tl.arange(0, D)
    k = tl.load(K + offs_n[:, None] * D + offs_d[None, :])
    acc_a = tl.zeros([N, D], dtype=tl.float32)
    acc_b = tl.zeros([N, D], dtype=tl.float32)
    for i in range(0, TRIPS_A):
        x = X_DESC.load([i * M, 0])
        p = tl.dot(k, tl.trans(x))
        acc_a += tl.dot(p.to(x.dtype), x)
    for i in range(TRIPS_A, TRIPS_A + TRIPS_B):
        x = X_DESC.load([i * M, 0])
        p = tl.dot(k, tl.trans(x))
        acc_b += tl.dot(p.to(x.dtype), x)
    tl.store(OUT + offs_n[:, None] * D + offs_d[None, :], acc_a + acc_b)

trips_a, trips_b, stages = map(int, sys.argv[1:4])
M, N, D = 64, 128, 128
triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
x = torch.randn(4 * M, D, device="cuda", dtype=torch.float16) / 8
k = torch.randn(N, D, device="cuda", dtype=torch.float16) / 8
out = torch.empty(N, D, device="cuda", dtype=torch.float32)
two_loops[(1,)](k, TensorDescriptor.from_tensor(x, [M, D]), out, trips_a, trips_b, M=M, N=N, D=D,
                num_warps=8, num_stages=stages)
torch.cuda.synchronize()
xs = x[: (trips_a + trips_b) * M].float()
expect = (k.float() @ xs.T).to(torch.float16).float() @ xs
err = ((out - expect).norm() / expect.norm().clamp_min(1e-30)).item() if trips_a + trips_b else out.abs().max().item()
print(f"finished, relative error {err:.1e}")
"""


def main() -> None:
    print("| first loop trips | second loop trips | stages | result |\n|---|---|---|---|", flush=True)
    for (trips_a, trips_b), stages in itertools.product([(0, 1), (0, 2), (1, 0), (1, 1), (0, 3), (2, 1)], [2, 3]):
        try:
            run = subprocess.run([sys.executable, "-c", CHILD, str(trips_a), str(trips_b), str(stages)],
                                 capture_output=True, text=True, timeout=60)
            result = run.stdout.strip() or f"exit {run.returncode}: {run.stderr.strip().splitlines()[-1]}"
        except subprocess.TimeoutExpired:
            result = "**hung** (killed after 60 s)"
        print(f"| {trips_a} | {trips_b} | {stages} | {result} |", flush=True)


if __name__ == "__main__":
    main()
