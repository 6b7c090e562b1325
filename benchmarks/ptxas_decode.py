"""Compiles every decode kernel for sm_90 (Hopper) without a GPU and prints ptxas's register and spill counts.

Triton compiles ahead of time for a named target with its bundled ptxas, so GPU-only compile
errors and register spills show on a CPU machine. Launches as ``nsa_kernels.decode`` makes them
for the paper's shapes (16 heads per KV group, d=128): bf16 with TMA tiles, float32 gathered.

    TRITON_INTERPRET= PYTHONPATH=.:kernels python benchmarks/ptxas_decode.py
"""
import subprocess, tempfile, os, re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from nsa_kernels import decode as D
target = GPUTarget("cuda", 90, 32)
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/ptxas-blackwell")
def info(fn, types, consts, **opts):
    sig = {n: (types[n] if n in types else "constexpr") for n in fn.arg_names}
    missing = [n for n in fn.arg_names if n not in types and n not in consts]
    assert not missing, missing
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(a),): v for a, v in consts.items()}), target=target, options=opts)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f: f.write(k.asm["ptx"])
    out = subprocess.run([PTXAS, "-v", "-arch=sm_90a", f.name, "-o", "/dev/null"], capture_output=True, text=True).stderr
    regs, spills = re.findall(r"Used (\d+) registers", out), re.findall(r"(\d+) bytes spill stores", out)
    print(fn.__name__, consts.get("TMA", ""), consts.get("COMPRESSED", ""), "regs", regs, "spills", spills, flush=True)
for dt, prec, tma in (("bf16", "tf32", True), ("fp32", "ieee", False)):
    meta = dict(HP=16, DK=128, DV=128, DK_P=128, DV_P=128, PRECISION=prec, TMA=tma)
    desc = f"tensordesc<{dt}[64,128]>" if tma else f"*{dt}"
    base = dict(q_ptr=f"*{dt}", k_ptr=f"*{dt}", v_ptr=f"*{dt}", k_desc=desc, v_desc=desc, len_ptr="*i64", pm_ptr="*fp32", pl_ptr="*fp32",
                pacc_ptr="*fp32", ps_ptr="*fp32", ptm_ptr="*fp32", stride_kb="i64", stride_kr="i32", stride_vb="i64", stride_vr="i32",
                num_rows="i32", H="i32", heads_per_group="i32", rows_per_split="i32", split_offset="i32", num_splits="i32",
                num_tiles="i32", qk_scale="fp32")
    for c in (True, False):
        info(D._range_partial_kernel, base, dict(COMPRESSED=c, CMP_SIZE=32, CMP_STRIDE=16, SEL_SIZE=64, JT=32, BLOCK_N=64, **meta), **D.LAUNCH)
    base = dict(q_ptr=f"*{dt}", k_ptr=f"*{dt}", v_ptr=f"*{dt}", k_desc=desc, v_desc=desc, idx_ptr="*i32", len_ptr="*i64", pm_ptr="*fp32",
                pl_ptr="*fp32", pacc_ptr="*fp32", stride_kb="i64", stride_kr="i32", stride_vb="i64", stride_vr="i32",
                num_keys="i32", H="i32", heads_per_group="i32", entries_per_split="i32", split_offset="i32", num_splits="i32", qk_scale="fp32")
    info(D._selected_partial_kernel, base, dict(SEL_SIZE=64, NUM_SELECTED=16, BLOCK_SEL=64, **meta), **D.LAUNCH)
    base = dict(pm_ptr="*fp32", pl_ptr="*fp32", pacc_ptr="*fp32", gates_ptr=f"*{dt}", out_ptr=f"*{dt}", H="i32",
                num_splits="i32", slc_offset="i32", win_offset="i32")
    for gated in (True, False):
        info(D._combine_kernel, base, dict(GATED=gated, DV=128, DV_P=128, CHUNK=D.COMBINE_CHUNK), num_warps=4)
base = dict(len_ptr="*i64", pm_ptr="*fp32", pl_ptr="*fp32", ps_ptr="*fp32", ptm_ptr="*fp32", idx_ptr="*i32",
            H="i32", heads_per_group="i32", num_cmp_splits="i32", num_splits="i32", num_tiles="i32", num_blocks="i32")
for ns, w in ((1024, 4), (2048, 8)):
    info(D._select_kernel, base, dict(CMP_SIZE=32, CMP_STRIDE=16, SEL_SIZE=64, NUM_SELECTED=16, BLOCK_N=64, JT=32,
         SPAN=3, CMP_SPLITS_P=64, BLOCK_NS=ns, BLOCK_SELECTED=16), num_warps=w)
