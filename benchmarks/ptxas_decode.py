"""Compiles every decode kernel for sm_90 (Hopper) without a GPU and prints ptxas's register and spill counts.

Triton compiles ahead of time for a named target with its bundled ptxas, so GPU-only compile
errors and register spills show on a CPU machine. Launches as ``nsa_kernels.decode`` makes them
for the paper's shapes (16 heads per KV group, d=128): bf16 with TMA tiles, float32 gathered.

    TRITON_INTERPRET= PYTHONPATH=.:kernels python benchmarks/ptxas_decode.py
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from nsa_kernels import decode as D

TARGET = GPUTarget("cuda", 90, 32)
# Triton 3.9's ptxas takes PTX 8.8; its kernels come out as PTX 9.x, which the newer one reads.
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas-blackwell")
F32 = "*fp32"


def report(fn, types: dict[str, str], consts: dict, **options) -> None:
    """Compiles ``fn`` (argument types by name, the rest constexpr) and prints ptxas -v's counts."""
    missing = [n for n in fn.arg_names if n not in types and n not in consts]
    assert not missing, f"no type or value for {missing}"
    signature = {n: types.get(n, "constexpr") for n in fn.arg_names}
    constexprs = {(fn.arg_names.index(name),): value for name, value in consts.items()}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=TARGET,
                            options=options)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.asm["ptx"])
    log = subprocess.run([PTXAS, "-v", "-arch=sm_90a", f.name, "-o", os.devnull], capture_output=True,
                         text=True).stderr
    regs, spills = re.findall(r"Used (\d+) registers", log), re.findall(r"(\d+) bytes spill stores", log)
    flags = {k: consts[k] for k in ("TMA", "COMPRESSED", "BLOCK_NS") if k in consts}
    print(f"{fn.__name__} {flags} {options}: registers {regs}, spill stores {spills} bytes", flush=True)


def main() -> None:
    cache = dict(stride_kb="i64", stride_kr="i32", stride_vb="i64", stride_vr="i32", len_ptr="*i64",
                 pm_ptr=F32, pl_ptr=F32, pacc_ptr=F32, H="i32", heads_per_group="i32", split_offset="i32",
                 num_splits="i32", qk_scale="fp32")
    for dt, precision, tma in (("bf16", "tf32", True), ("fp32", "ieee", False)):
        meta = dict(HP=16, DK=128, DV=128, DK_P=128, DV_P=128, PRECISION=precision, TMA=tma)
        desc = f"tensordesc<{dt}[64,128]>" if tma else f"*{dt}"
        kv = dict(cache, q_ptr=f"*{dt}", k_ptr=f"*{dt}", v_ptr=f"*{dt}", k_desc=desc, v_desc=desc)
        for compressed in (True, False):
            report(D._range_partial_kernel,
                   dict(kv, ps_ptr=F32, ptm_ptr=F32, num_rows="i32", rows_per_split="i32", num_tiles="i32"),
                   dict(COMPRESSED=compressed, CMP_SIZE=32, CMP_STRIDE=16, SEL_SIZE=64, JT=32, BLOCK_N=64, **meta),
                   **D.LAUNCH)
        report(D._selected_partial_kernel, dict(kv, idx_ptr="*i32", num_keys="i32", entries_per_split="i32"),
               dict(SEL_SIZE=64, NUM_SELECTED=16, BLOCK_SEL=64, **meta), **D.LAUNCH)
        report(D._combine_kernel,
               dict(pm_ptr=F32, pl_ptr=F32, pacc_ptr=F32, gates_ptr=f"*{dt}", out_ptr=f"*{dt}", H="i32",
                    num_splits="i32", slc_offset="i32", win_offset="i32"),
               dict(GATED=True, DV=128, DV_P=128, CHUNK=D.COMBINE_CHUNK), num_warps=4)
    for block_ns, warps in ((1024, 4), (2048, 8)):  # 64k and 128k tokens at l' = 64
        report(D._select_kernel,
               dict(len_ptr="*i64", pm_ptr=F32, pl_ptr=F32, ps_ptr=F32, ptm_ptr=F32, idx_ptr="*i32", H="i32",
                    heads_per_group="i32", num_cmp_splits="i32", num_splits="i32", num_tiles="i32",
                    num_blocks="i32"),
               dict(CMP_SIZE=32, CMP_STRIDE=16, SEL_SIZE=64, NUM_SELECTED=16, BLOCK_N=64, JT=32, SPAN=3,
                    CMP_SPLITS_P=64, BLOCK_NS=block_ns, BLOCK_SELECTED=16), num_warps=warps)


if __name__ == "__main__":
    main()
