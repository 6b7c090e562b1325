"""nsa-parallel against the public NSA kernels and dense attention: one GPU, one process, same inputs.

Every contestant gets the same random inputs (bf16, B=1, 64 query heads / 4 KV heads, d=128 by
default, seed = T) and is timed by bench_attention's helper (triton's ``do_bench``, median, 100 ms
warm-up, 500 ms of repeats):

- ``fwd``: the forward; ``fb``: forward+backward (``bench_attention.forward_backward``, gradient
  of ones); ``bwd``: one forward kept, its backward repeated (``retain_graph``, same gradient);
- ``peak``: ``torch.cuda.max_memory_allocated`` during one forward+backward minus what was
  allocated before (activations, workspaces and the leaves' gradients), in MiB.

Out of memory or a failure is recorded for that contestant and the run goes on (a CUDA error
that breaks the context stops it; results are written after every contestant).

Contestants (``--contestants``)
- ``sdpa-flash``, ``sdpa-cudnn``: PyTorch SDPA causal attention with GQA, each backend on its own
  (``bench_attention.sdpa_runner``): dense attention, the baseline (not the same function).
- ``ours-paper``: nsa-parallel's NSA as the paper and NSA_DESIGN.md define it
  (``bench_attention.nsa_runner``): learned per-KV-head ``phi`` over blocks l=32 / d=16,
  independent K/V for the three branches, blocks of 64, top-16 (block 0 and the two local blocks
  forced), window of 512 keys, gate sigmoid.
- ``flash-nsa-mean``: flash-nsa's ``NSACore`` as its README times it (its default: mean
  compression); ``ours@flash-nsa-mean``: nsa-parallel's ops on exactly that function.
- ``flash-nsa-swiglu``: flash-nsa with its learned ``swiglu`` compression of K and V (the one of
  its methods nearest a learned ``phi``); ``ours@flash-nsa-swiglu``: ours on that function.
- ``fla``: fla's ``parallel_nsa``, compressed + selected branches (its window needs flash-attn);
  ``ours@fla``: ours on that function (``bench_public_nsa.ours``).
- ``ours-window-513``: nsa-parallel's banded window kernel alone at 513 keys, which is what
  flash-nsa's window branch runs here (see below): subtract it, or swap in flash-attn 3's time.

What each peer computes, and how it differs from NSA_DESIGN.md section 1 and from ours
(read from flash-nsa fcf117c and fla bc3b101d; benchmarks/RESULTS.md "Peers: what each computes"):

flash-nsa (mdy666/Scalable-Flash-Native-Sparse-Attention; ``NSACore`` -> ``NSAFunction``)
- One K/V for all three branches (the spec and ``ours-paper``: independent K/V per branch).
- Compression blocks ``[16i, 16i+32)`` as ours. ``cmp_k_method`` / ``cmp_v_method``:
  ``mean`` (default): the plain mean of the block's 32 tokens (float32 sum / 32), nothing learned,
  no position encoding; ``linear``: ``flatten(block) [32*d] @ W.T -> d``, one ``W`` shared by all
  KV heads, no bias, no position encoding; ``swiglu`` / ``sigmoid-mul``: ``flatten(block) @ W.T
  -> 2d``, then ``silu(a) * b`` / ``sigmoid(a) * b`` of the two halves. Ours (``phi``,
  nsa_parallel/compression.py): per KV head ``W2 . gelu(W1 . flatten(block + pos) + b1) + b2``,
  ``l*d -> d -> d``, with a learned intra-block position encoding ``pos``. (``NSACore`` of
  fcf117c cannot build the learned methods itself: ``getattr(config.sequence_parallel, True)``
  raises; here the module is built with ``mean`` and the method and weights, ``std =
  (32*d)**-0.5``, are set on it, which is all ``NSACore.forward`` reads.)
- Compressed branch: block ``i`` visible from ``t >= 16i + 31``; rows ``t < 31`` give 0: as ours.
- Selection scores: ``p_cmp`` summed over the group's heads and spread onto 64-blocks with
  overlap weights 1,2,2,2,1 (as ours), but written as float16 and, while the padded number of
  selection blocks is <= 2048 (T <= 128k), cubed first (``p**3``, so that fp16 resolves them); ours
  ranks exact float32 scores. Forced: block 0 and the two local blocks, as ours; the rest by
  argmax rounds (ties to the lower id, as ours, but after the fp16 rounding). So near-equal
  blocks can be picked differently: the outputs agree to bf16 noise plus those rows.
- Selected branch: the blocks' keys up to ``t``: as ours.
- Window: flash-attn's ``window_size=(512, -1)``, keys ``t-512 .. t``: 513 keys (the spec and
  ours: 512). ``ours@flash-nsa-*`` use 513 to match. flash-nsa needs flash-attn 2 or 3 for this
  branch; the device image has neither (PyPI has flash-attn 2 as source only, a CUDA build far
  longer than a device call; flash-attn 3 is not on PyPI), so when neither imports, this script
  puts a stand-in ``flash_attn_interface`` module in ``sys.modules`` whose
  ``_flash_attn_forward`` / ``_flash_attn_backward`` run nsa-parallel's banded window kernel (same
  function: causal, 513 keys; checked against our reference window first). flash-nsa's times are
  then its own compression, scoring, top-n, selection and combine kernels plus our window kernel;
  the JSON says which window kernel ran (``info["flash_nsa_window"]``).
- Gates: ``sigmoid`` of the ``[T, H, 3]`` logits inside its combine kernel; ours takes the
  sigmoid in torch, then its gated-sum kernel: the same function. Scale ``d**-0.5`` everywhere.

fla (fla-org/flash-linear-attention; ``fla.ops.nsa.parallel_nsa``)
- One K/V for all branches; compression = the mean of each whole non-overlapping 64-token block
  (l = d = l' = 64: nothing learned, no overlap); block ``i`` visible from ``t >= 64i + 63``.
- Selection: block ``j`` scores its compressed block's probability summed over the group's heads
  (ours with l = d = l' computes the same); blocks ``j < t // 64`` compete, blocks 0, ``t//64 - 1``
  and ``t//64`` are forced (score 1 per head); top 16 by a bitonic sort (tie order: the
  network's); ``q * scale`` is rounded to bf16 before the dot.
- Gates are taken after the sigmoid; the window branch calls flash-attn's ``flash_attn_func``
  (``window_size=(w-1, 0)``: w keys), absent on the device, so the fla rows are the compressed
  and selected branches only: fla's own kernels. Needs query heads / KV heads a power of two >= 16.

Same-function pairs are compared before timing: forward outputs and the gradients of q, k, v,
gates (and compression weights) for one random output gradient, norm-wise relative difference.
``ours-paper`` against a peer is not the same function (learned ``phi`` and independent K/V vs
mean / shared K/V): those ratios are reported as such.

The peers are benchmark-only inputs, never dependencies: ``scripts/fetch_peers.sh`` copies their
sources into the git-ignored ``peers/`` (imported from there, or from PYTHONPATH), and
``scripts/gpu_peers.sh`` runs this on the device machine.

``--dry-run`` (also ``--device cpu``, and the default without a GPU) runs everything but the GPU
timing on tiny float32 shapes on the CPU: the float64 definition checks of both peers (fla's
``naive_nsa``, flash-nsa's ``ops/torch_ref.py``) against nsa-parallel's reference, one
forward+backward of each contestant that runs on the CPU (nsa-parallel through its reference
backend, SDPA through the math backend), and the same-function checks, where nsa-parallel's Triton
kernels (under the interpreter) stand in for a peer that cannot run on the CPU. The peers' kernels
are reported as skipped, with the reason.

    python3 benchmarks/bench_peers.py --seq-lens 8192 16384 32768 65536 131072 --json peers.json
    python3 benchmarks/bench_peers.py --dry-run
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import sys
import time
import traceback
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

if not torch.cuda.is_available() or "--dry-run" in sys.argv or "--device=cpu" in sys.argv or (
        "--device" in sys.argv and "cpu" in sys.argv):
    os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors: before triton is first imported

import triton  # noqa: E402
from torch.nn.attention import SDPBackend  # noqa: E402

import bench_public_nsa as public  # noqa: E402
from bench_attention import bench, forward_backward, nsa_runner, sdpa_runner  # noqa: E402

from nsa_parallel import KV, BranchKV, Compressors, NSAConfig, nsa_core, ops  # noqa: E402
from nsa_parallel.compression import BlockCompressor  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PEERS = REPO / "peers"
PAPER = NSAConfig()  # l=32, d=16, l'=64, n=16, w=512
FLASH_NSA_WINDOW = PAPER.window_size + 1  # flash-attn's window_size=(512, -1) holds 513 keys
FLASH_NSA_CONFIG = NSAConfig(window_size=FLASH_NSA_WINDOW)
CONTESTANTS = ("sdpa-flash", "sdpa-cudnn", "ours-paper", "ours-window-513", "ours@flash-nsa-mean", "flash-nsa-mean",
               "ours@flash-nsa-swiglu", "flash-nsa-swiglu", "ours@fla", "fla")
# (peer, ours on the peer's function): compared before timing.
PAIRS = (("flash-nsa-mean", "ours@flash-nsa-mean"), ("flash-nsa-swiglu", "ours@flash-nsa-swiglu"),
         ("fla", "ours@fla"))
MODES = ("fwd", "bwd", "fb", "peak")


class Skip(Exception):
    """A contestant that cannot run here; the message says why."""


# --- loading the peers (benchmark-only inputs) ------------------------------------------------

def _add_peer_paths() -> None:
    for sub in ("flash-nsa", "fla"):
        path = PEERS / sub
        if path.is_dir() and str(path) not in sys.path:
            sys.path.append(str(path))


def _peer_versions() -> dict[str, str]:
    versions = PEERS / "VERSIONS"
    if not versions.exists():
        return {}
    return {line.split()[0]: " ".join(line.split()[1:3]) for line in versions.read_text().splitlines() if line}


def _find_peer_file(relative: str) -> Path:
    for entry in sys.path:
        candidate = Path(entry or ".") / relative
        if candidate.is_file():
            return candidate
    raise Skip(f"{relative} not found: run scripts/fetch_peers.sh (or put the peer on PYTHONPATH)")


def _ensure_pkg_resources() -> None:
    """flash-nsa's utils.py imports ``pkg_resources`` (setuptools) for one version comparison."""
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        from packaging.version import parse

        sys.modules["pkg_resources"] = types.SimpleNamespace(parse_version=parse)


def _window_launch(q, k, v, cu_seqlens_q, softmax_scale, causal, window_size):
    """flash-attn's (left, right) window on ``[T, H, d]`` tensors of one sequence -> our banded launch."""
    from nsa_kernels import banded_attention as banded

    if cu_seqlens_q is not None and cu_seqlens_q.numel() != 2:
        raise NotImplementedError("the bench_peers flash-attn stand-in takes one sequence")
    left, right = window_size
    if not causal or right not in (-1, 0):
        raise NotImplementedError("the bench_peers flash-attn stand-in is causal only")
    seq_len, heads, dk = q.shape
    window = seq_len if left < 0 else min(left + 1, seq_len)
    return banded._Launch(batch=1, seq_len=seq_len, num_keys=k.shape[0], num_heads=heads,
                          group=heads // k.shape[1], head_dk=dk, head_dv=v.shape[-1], key_stride=1,
                          key_offset=0, window=window, scale=float(softmax_scale))


def _shim_forward(q, k, v, k_new, v_new, qv, out, cu_seqlens_q, cu_seqlens_k, cu_seqlens_k_new, seqused_q,
                  seqused_k, max_seqlen_q, max_seqlen_k, page_table, kv_batch_idx, leftpad_k, rotary_cos,
                  rotary_sin, seqlens_rotary, q_descale, k_descale, v_descale, softmax_scale=None, causal=False,
                  window_size=(-1, -1), **_):
    """flash-attn 3's ``_flash_attn_forward`` call, computed by nsa-parallel's banded window kernel."""
    from nsa_kernels import banded_attention as banded

    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    params = _window_launch(q, k, v, cu_seqlens_q, scale, causal, window_size)
    o, lse = banded._forward(q[None], k[None], v[None], params)
    if out is not None:
        out.copy_(o[0])
        return out, lse
    return o[0], lse


def _shim_backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, seqused_q, seqused_k,
                   max_seqlen_q, max_seqlen_k, dq, dk, dv, softmax_scale=None, causal=False,
                   window_size=(-1, -1), *_, **__):
    """flash-attn 3's ``_flash_attn_backward`` (writes ``dq, dk, dv``) by nsa-parallel's banded kernel."""
    from nsa_kernels import banded_attention as banded

    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    params = _window_launch(q, k, v, cu_seqlens_q, scale, causal, window_size)
    grads = banded._backward(q[None], k[None], v[None], out[None], softmax_lse, dout[None].contiguous(), params)
    for dst, src in zip((dq, dk, dv), grads):
        if dst.shape == src[0].shape and dst.dtype == src.dtype:
            dst.set_(src[0])  # hand over the result's storage: no copy
        else:
            dst.copy_(src[0])
    return dq, dk, dv


def _install_flash_attn_stand_in() -> str:
    """Which kernel serves flash-nsa's window branch; installs the stand-in if no flash-attn imports."""
    try:
        import flash_attn_interface  # noqa: F401  flash-attn 3, flash-nsa's first choice
        return "flash-attn 3"
    except ImportError:
        pass
    try:
        import flash_attn_2_cuda  # noqa: F401
        from flash_attn.flash_attn_interface import _wrapped_flash_attn_varlen_backward  # noqa: F401
        return "flash-attn 2"
    except ImportError:
        pass

    def unsupported(*_, **__):
        raise NotImplementedError("the bench_peers flash-attn stand-in has only _flash_attn_forward/_backward")

    stand_in = types.ModuleType("flash_attn_interface")
    stand_in.__doc__ = "bench_peers: flash-attn 3's window calls served by nsa-parallel's banded kernel"
    stand_in._flash_attn_forward, stand_in._flash_attn_backward = _shim_forward, _shim_backward
    stand_in.flash_attn_varlen_func = unsupported
    sys.modules["flash_attn_interface"] = stand_in
    return "nsa-parallel banded window kernel (stand-in: no flash-attn on this machine)"


def load_flash_nsa() -> tuple[types.ModuleType, str]:
    if not torch.cuda.is_available():
        raise Skip("flash-nsa needs a CUDA GPU: flash_nsa/utils.py reads the device capability at import, "
                   "and its kernels are Triton with TMA (Hopper)")
    _add_peer_paths()
    _ensure_pkg_resources()
    window = _install_flash_attn_stand_in()
    try:
        import flash_nsa
    except Exception as err:  # noqa: BLE001  a peer that does not import is skipped, with the reason
        raise Skip(f"flash_nsa does not import ({type(err).__name__}: {err}); run scripts/fetch_peers.sh") from err
    return flash_nsa, window


@contextlib.contextmanager
def _lenient_autotune():
    """Triton >= 3.9 rejects autotune keys that are not kernel arguments; older ones dropped them.
    One fla kernel unrelated to NSA (fla/ops/cp/chunk_delta_h.py) has such a key and breaks
    ``import fla``: while fla imports, drop unknown key names as older Triton did."""
    original = triton.autotune

    def autotune(configs, key, *args, **kwargs):
        def wrap(fn):
            names = getattr(fn, "arg_names", None)
            keys = key if names is None else [k for k in key if k in names]
            return original(configs, keys, *args, **kwargs)(fn)
        return wrap

    triton.autotune = autotune
    try:
        yield
    finally:
        triton.autotune = original


def load_fla() -> types.ModuleType:
    """``fla.ops.nsa``; fla's layers and models (transformers, other ops) are kept from importing."""
    _add_peer_paths()
    for name in ("fla.layers", "fla.models"):
        sys.modules.setdefault(name, None)  # fla/__init__ treats a missing optional module as absent
    try:
        with _lenient_autotune():
            import fla.ops.nsa as fla_nsa
    except Exception as err:  # noqa: BLE001
        raise Skip(f"fla does not import ({type(err).__name__}: {err}); run scripts/fetch_peers.sh; "
                   "fla needs einops") from err
    return fla_nsa


# --- nsa-parallel on each peer's function -----------------------------------------------------

def overlap_mean(x: torch.Tensor, block: int = 32, stride: int = 16) -> torch.Tensor:
    """flash-nsa's ``mean``: ``[B, T, G, D]`` -> the mean of each block ``[i*stride, i*stride + block)``
    (sums of ``stride``-token segments in float32 or wider, as its kernel sums in float32)."""
    b, t, g, d = x.shape
    num_blocks = (t - block) // stride + 1 if t >= block else 0
    if num_blocks == 0:
        return x[:, :0]
    per = block // stride
    acc = torch.promote_types(x.dtype, torch.float32)
    segments = x[:, : (num_blocks + per - 1) * stride].reshape(b, -1, stride, g, d).to(acc).sum(2)
    total = sum(segments[:, m:m + num_blocks] for m in range(per))
    return (total / block).to(x.dtype)


def learned_compress(x: torch.Tensor, weight: torch.Tensor, method: str, block: int = 32,
                     stride: int = 16) -> torch.Tensor:
    """flash-nsa's ``linear`` / ``swiglu`` / ``sigmoid-mul``: ``flatten(block) @ weight.T`` (one weight for
    every KV head, no bias, no position encoding), then the gated activation of the two halves."""
    b, t, g, d = x.shape
    if t < block:
        return x.new_zeros(b, 0, g, d)
    blocks = x.unfold(1, block, stride).permute(0, 1, 2, 4, 3).reshape(b, -1, g, block * d)
    hidden = blocks @ weight.t()
    if method == "linear":
        return hidden
    gate, up = hidden.chunk(2, -1)
    act = torch.nn.functional.silu(gate) if method == "swiglu" else torch.sigmoid(gate)
    return act * up


def ours_like_flash_nsa(method, q, k, v, logits, weights, backend):
    if method == "mean":
        phi = Compressors(overlap_mean, overlap_mean)
    else:
        phi = Compressors(*(lambda x, w=w: learned_compress(x, w, method) for w in weights))
    return lambda: nsa_core(q, BranchKV(*(KV(k, v),) * 3), logits, phi, FLASH_NSA_CONFIG, backend=backend)


def ours_like_fla(q, k, v, gates, backend):
    if backend == "triton":
        return public.ours(q, k, v, gates, window=False)

    def run():  # the same function through the reference: the window gate's logit at -inf (a zero gate)
        logits = torch.cat([gates[..., :2].logit(), torch.full_like(gates[..., 2:], -torch.inf)], -1)
        return nsa_core(q, BranchKV(*(KV(k, v),) * 3), logits, Compressors(public.mean_pool, public.mean_pool),
                        public.CONFIG, backend="reference")
    return run


def flash_nsa_runner(flash_nsa, core, method, q, k, v, logits, weights):
    cu_seqlens = torch.tensor([0, q.shape[1]], dtype=torch.int32, device=q.device)

    def run():
        flash_nsa.NSAHelper.set_cmp_kv_method(method, method)  # a class-wide setting: set per call
        core.cmp_k_weight, core.cmp_v_weight = weights
        return core(q[0], k[0], v[0], logits[0], cu_seqlens)[None]
    return run


# --- one contestant ---------------------------------------------------------------------------

@dataclass
class Contestant:
    name: str
    function: str
    run: Callable[[], torch.Tensor] | None
    leaves: list[torch.Tensor] = field(default_factory=list)
    skip: str | None = None


def rel_diff(a: torch.Tensor | None, b: torch.Tensor | None) -> float | None:
    if a is None or b is None:
        return None
    a, b = a.detach().double(), b.detach().double()
    denom = b.norm().item()
    return (a - b).norm().item() / (denom if denom > 0 else 1.0)


def outputs_and_grads(c: Contestant, grad_seed: int):
    out = c.run()
    gen = torch.Generator(device=out.device).manual_seed(grad_seed)
    dout = torch.randn(out.shape, generator=gen, device=out.device, dtype=out.dtype)
    grads = torch.autograd.grad(out, c.leaves, dout, allow_unused=True)
    return out.detach(), grads


def compare(a: Contestant, b: Contestant, leaf_names: list[str], grad_seed: int) -> dict:
    out_a, grads_a = outputs_and_grads(a, grad_seed)
    out_b, grads_b = outputs_and_grads(b, grad_seed)
    result = {"pair": f"{a.name} vs {b.name}", "out": rel_diff(out_b, out_a)}
    for name, ga, gb in zip(leaf_names, grads_a, grads_b):
        result[f"d{name}"] = rel_diff(gb, ga)
    return result


def _cuda_usable() -> bool:
    try:
        torch.cuda.synchronize()
        return True
    except Exception:  # noqa: BLE001  a sticky CUDA error: the context is gone
        return False


def measure(c: Contestant, modes: tuple[str, ...], warmup_ms: int, rep_ms: int) -> dict:
    row: dict = {"function": c.function}
    if c.skip:
        return {**row, "status": f"skipped: {c.skip}"}
    try:
        forward_backward(c.run, c.leaves)()  # warm-up: compilation, fla's autotuning, workspaces
        for x in c.leaves:
            x.grad = None
        if "peak" in modes:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            forward_backward(c.run, c.leaves)()
            torch.cuda.synchronize()
            row["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
            for x in c.leaves:
                x.grad = None
        if "fwd" in modes:  # with autograd recording, as in training (and bench_attention)
            row["fwd_ms"] = bench(c.run, warmup_ms, rep_ms)
        if "fb" in modes:
            row["fb_ms"] = bench(forward_backward(c.run, c.leaves), warmup_ms, rep_ms)
        if "bwd" in modes:
            out = c.run()
            grad = torch.ones_like(out)
            row["bwd_ms"] = bench(lambda: torch.autograd.backward(out, grad, inputs=c.leaves, retain_graph=True),
                                  warmup_ms, rep_ms)
            del out, grad
        row["status"] = "ok"
    except torch.cuda.OutOfMemoryError:
        row["status"] = "OOM"
    except Exception as err:  # noqa: BLE001  recorded, the next contestant runs
        row["status"] = f"error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
        traceback.print_exc(limit=3)
    finally:
        for x in c.leaves:
            x.grad = None
        if torch.cuda.is_available():
            with contextlib.suppress(Exception):
                torch.cuda.empty_cache()
    return row


def dry_call(c: Contestant) -> dict:
    """One forward+backward on the CPU: exercises the runner; the wall time is not a timing."""
    row: dict = {"function": c.function}
    if c.skip:
        return {**row, "status": f"skipped: {c.skip}"}
    try:
        start = time.perf_counter()
        forward_backward(c.run, c.leaves)()
        row["dry_run_s"] = time.perf_counter() - start
        row["status"] = "ok (dry run)"
    except Exception as err:  # noqa: BLE001
        row["status"] = f"error: {type(err).__name__}: {err}"[:300]
        traceback.print_exc(limit=3)
    for x in c.leaves:
        x.grad = None
    return row


# --- definition checks (float64, CPU) ---------------------------------------------------------

def check_against_flash_nsa_ref() -> list[dict]:
    """flash-nsa's own PyTorch reference (``flash_nsa/ops/torch_ref.py``: block construction, compressed
    attention, top-n, selected attention) against nsa-parallel's float64 reference on the same compressed
    tokens, branch by branch. (Its window branch is flash-attn's: no reference to compare.)"""
    path = _find_peer_file("flash_nsa/ops/torch_ref.py")
    spec = importlib.util.spec_from_file_location("flash_nsa_torch_ref", path)
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)  # torch only: no CUDA needed, unlike the flash_nsa package
    rows = []
    torch.manual_seed(0)
    for t, n, h, g, method in ((512, 4, 16, 1, "mean"), (1024, 8, 16, 2, "swiglu"), (640, 16, 8, 2, "linear"),
                               (1000, 6, 8, 4, "sigmoid-mul")):
        d = 32
        cfg = NSAConfig(num_selected_blocks=n, window_size=FLASH_NSA_WINDOW)
        q = torch.randn(1, t, h, d, dtype=torch.float64)
        k, v = (torch.randn(1, t, g, d, dtype=torch.float64) for _ in range(2))
        weights = [torch.randn(d * (1 if method == "linear" else 2), 32 * d, dtype=torch.float64) / (32 * d) ** 0.5
                   for _ in range(2)]

        def theirs_compress(x, w):
            blocks = ref.torch_construct_block(x[0], 32, 16)  # [Tc, G, 32, d]
            if method == "mean":
                return blocks.mean(2)
            hidden = blocks.flatten(-2) @ w.t()
            return {"linear": lambda y: y, "swiglu": ref.torch_swiglu, "sigmoid-mul": ref.torch_sigmoid_mul}[method](hidden)

        k_cmp_theirs, v_cmp_theirs = theirs_compress(k, weights[0]), theirs_compress(v, weights[1])
        if method == "mean":
            k_cmp, v_cmp = overlap_mean(k), overlap_mean(v)
        else:
            k_cmp, v_cmp = (learned_compress(x, w, method) for x, w in zip((k, v), weights))
        o_cmp_theirs = ref.torch_cmp_attn(q[0], k_cmp_theirs, v_cmp_theirs, 32, 16)
        topk = ref.torch_topk(q[0], k_cmp_theirs, 32, 16, 64, n, 1, 2)  # [G, T, n], padding = 99999999
        o_slc_theirs = ref.torch_slc_attn(q[0], k[0], v[0], topk, 64)

        o_cmp = ops.compressed_attention(q, k_cmp, v_cmp, cfg, backend="reference")
        idx = ops.select_blocks(q, k_cmp, cfg, backend="reference")  # [1, T, G, n], padding = -1
        o_slc = ops.selection_attention(q, k, v, idx, cfg, backend="reference")
        theirs_sets = torch.where(topk >= cfg.num_select_blocks(t), -1, topk).sort(-1).values.permute(1, 0, 2)
        ours_sets = idx[0].long().sort(-1).values
        row = {"T": t, "n": n, "heads": h, "kv_heads": g, "method": method,
               "k_cmp": rel_diff(k_cmp, k_cmp_theirs[None]), "v_cmp": rel_diff(v_cmp, v_cmp_theirs[None]),
               "o_cmp": rel_diff(o_cmp[0], o_cmp_theirs), "o_slc": rel_diff(o_slc[0], o_slc_theirs),
               "rows_with_other_blocks": int((theirs_sets != ours_sets).any(-1).sum())}
        rows.append(row)
        print(f"flash-nsa torch_ref vs float64 reference, T={t}, top-{n}, {h} heads / {g} KV heads, {method}: "
              f"k_cmp {row['k_cmp']:.1e}, v_cmp {row['v_cmp']:.1e}, compressed out {row['o_cmp']:.1e}, "
              f"selected out {row['o_slc']:.1e}, (query, group) rows selecting other blocks "
              f"{row['rows_with_other_blocks']} of {t * g}", flush=True)
    return rows


def check_flash_attn_stand_in(dev: torch.device, dt: torch.dtype) -> dict:
    """The flash-attn stand-in, called exactly as flash-nsa's swa_fwd / swa_bwd call flash-attn 3, against
    nsa-parallel's reference window attention of ``left + 1`` keys (flash-attn's ``(left, -1)`` causal)."""
    t, h, g, d, left = (80, 4, 2, 32, 40) if dev.type == "cpu" else (1024, 16, 2, 128, 512)
    gen = torch.Generator().manual_seed(1)
    q, k, v, dout = (torch.randn(t, n, d, generator=gen) for n in (h, g, g, h))
    scale, cu = d ** -0.5, torch.tensor([0, t], dtype=torch.int32, device=dev)
    x = [y.to(dev, dt) for y in (q, k, v, dout)]
    out, lse = _shim_forward(*x[:3], None, None, None, None, cu, cu, None, None, None, t, t, None, None, None, None,
                             None, None, None, None, None, scale, causal=True, window_size=(left, -1),
                             attention_chunk=0, softcap=0.0, num_splits=1, pack_gqa=None, sm_margin=0)
    grads = [torch.empty_like(y) for y in x[:3]]
    _shim_backward(x[3], *x[:3], out, lse, cu, cu, None, None, t, t, *grads, scale, True, (left, -1), 0.0, False, 0)
    ref_in = [y.double().requires_grad_() for y in (q, k, v)]
    ref = ops.window_attention(*(y[None] for y in ref_in), left + 1, scale, backend="reference")[0]
    ref_grads = torch.autograd.grad(ref, ref_in, dout.double())
    result = {"T": t, "window_size": [left, -1], "dtype": str(dt).replace("torch.", ""),
              "out": rel_diff(out.cpu(), ref), **{f"d{n}": rel_diff(a.cpu(), b) for n, a, b in
                                                  zip("qkv", grads, ref_grads)}}
    print(f"flash-attn stand-in (flash-nsa's window calls) vs reference window of {left + 1} keys, T={t}, "
          f"{result['dtype']}: out {result['out']:.1e}, dq {result['dq']:.1e}, dk {result['dk']:.1e}, "
          f"dv {result['dv']:.1e}", flush=True)
    return result


def definition_checks(info: dict, dev: torch.device, dt: torch.dtype) -> None:
    """Both peers' reference code against ours, float64 on the CPU (cheap; also part of a GPU run), and the
    flash-attn stand-in against our reference window attention."""
    try:
        info["definition_checks"]["flash-attn stand-in"] = check_flash_attn_stand_in(dev, dt)
    except Exception as err:  # noqa: BLE001
        info["definition_checks"]["flash-attn stand-in"] = f"error: {type(err).__name__}: {err}"[:300]
        traceback.print_exc(limit=3)
    try:
        info["definition_checks"]["flash-nsa"] = check_against_flash_nsa_ref()
    except Exception as err:  # noqa: BLE001  Skip (no peers/), or its reference failing
        info["definition_checks"]["flash-nsa"] = f"skipped: {err}"
        print(f"flash-nsa definition check skipped: {err}", flush=True)
    try:
        load_fla()
        import io

        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            public.check_against_fla_naive()
        print(buffer.getvalue(), end="", flush=True)
        info["definition_checks"]["fla"] = buffer.getvalue().strip().splitlines()
    except Exception as err:  # noqa: BLE001  Skip, or fla's naive failing
        info["definition_checks"]["fla"] = f"skipped: {err}"
        print(f"fla definition check skipped: {err}", flush=True)
        if not isinstance(err, Skip):
            traceback.print_exc(limit=3)


# --- the run ----------------------------------------------------------------------------------

def build(t: int, args, dev: torch.device, dt: torch.dtype, peers: dict, backend: str) -> tuple[dict, dict]:
    """The inputs of length ``t`` (seed ``t``) and every contestant on them."""
    h, g, d = args.heads, args.kv_heads, args.head_dim
    torch.manual_seed(t)
    q = torch.randn(1, t, h, d, device=dev, dtype=dt, requires_grad=True)
    k, v = (torch.randn(1, t, g, d, device=dev, dtype=dt, requires_grad=True) for _ in range(2))
    logits = torch.randn(1, t, h, 3, device=dev, dtype=dt, requires_grad=True)
    gates = torch.sigmoid(logits).detach().requires_grad_()  # fla takes gates after the sigmoid
    extra_kv = [torch.randn(1, t, g, d, device=dev, dtype=dt, requires_grad=True) for _ in range(4)]
    glu = [(torch.randn(2 * d, 32 * d, device=dev, dtype=torch.float32) * (32 * d) ** -0.5).to(dt).requires_grad_()
           for _ in range(2)]
    ck, cv = (BlockCompressor(g, d, PAPER, device=dev, dtype=dt) for _ in range(2))
    inputs = {"q": q, "k": k, "v": v, "logits": logits, "gates": gates}
    base = [q, k, v, logits]
    c: dict[str, Contestant] = {}

    sdpa_skip = None
    if dev.type != "cuda":
        sdpa_skip = "the flash and cuDNN SDPA backends need CUDA (the dry run calls the math backend instead)"
    elif t > args.sdpa_max_len:
        sdpa_skip = f"T > --sdpa-max-len {args.sdpa_max_len}"
    if sdpa_skip is None or dev.type != "cuda":
        qs, ks, vs = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    for name, backend_enum in (("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)):
        fn = "dense causal attention, GQA (the baseline)"
        if dev.type != "cuda":  # exercise the runner with the math backend; reported as skipped
            c[name] = Contestant(name, fn, sdpa_runner(SDPBackend.MATH, qs, ks, vs), [qs, ks, vs], skip=sdpa_skip)
            c[name + " (math, dry run)"] = Contestant(name + " (math, dry run)", fn,
                                                      sdpa_runner(SDPBackend.MATH, qs, ks, vs), [qs, ks, vs])
        elif sdpa_skip:
            c[name] = Contestant(name, fn, None, skip=sdpa_skip)
        else:
            c[name] = Contestant(name, fn, sdpa_runner(backend_enum, qs, ks, vs), [qs, ks, vs])

    c["ours-paper"] = Contestant(
        "ours-paper", "NSA spec: learned phi (per-head MLP + position), independent K/V per branch, w=512",
        nsa_runner(PAPER, q, [k, v, *extra_kv], logits, ck, cv, backend),
        [q, k, v, *extra_kv, logits, *ck.parameters(), *cv.parameters()])

    flash_nsa, core = peers.get("flash_nsa"), peers.get("flash_nsa_core")
    for method, weights in (("mean", (None, None)), ("swiglu", glu)):
        fn = (f"flash-nsa's NSA: {method} compression 32/16"
              + (" (one learned 4096->256 layer + SwiGLU, shared by heads)" if method != "mean" else "")
              + ", shared K/V, fp16 cubed block scores, w=513")
        leaves = base + ([] if method == "mean" else list(weights))
        name = f"flash-nsa-{method}"
        if flash_nsa is None:
            c[name] = Contestant(name, fn, None, skip=peers.get("flash_nsa_skip", "not loaded (not in --contestants)"))
        else:
            c[name] = Contestant(name, fn, flash_nsa_runner(flash_nsa, core, method, q, k, v, logits, weights), leaves)
        c[f"ours@{name}"] = Contestant(f"ours@{name}", fn.replace("fp16 cubed", "float32"),
                                       ours_like_flash_nsa(method, q, k, v, logits, weights, backend), leaves)

    fla_fn = "fla's NSA: mean of 64-blocks, shared K/V, cmp + slc branches only (no window), gates given"
    if peers.get("fla") is None:
        c["fla"] = Contestant("fla", fla_fn, None, skip=peers.get("fla_skip", "not loaded (not in --contestants)"))
    else:
        c["fla"] = Contestant("fla", fla_fn, public.fla(peers["fla"].parallel_nsa, q, k, v, gates, window=False),
                              [q, k, v, gates])
    c["ours@fla"] = Contestant("ours@fla", fla_fn, ours_like_fla(q, k, v, gates, backend), [q, k, v, gates])
    c["ours-window-513"] = Contestant(
        "ours-window-513", "nsa-parallel's window kernel alone, 513 keys (what flash-nsa's window runs here)",
        lambda: ops.window_attention(q, k, v, FLASH_NSA_WINDOW, backend=backend), [q, k, v])
    return c, {"inputs": inputs, "glu": glu}


def check_pair(t: int, peer: Contestant, ours: Contestant, extra: dict, backend: str, dry: bool) -> dict:
    """Outputs and gradients of a peer and of ours on the peer's function. In a dry run a peer that
    cannot run stands in as ours on the same function through the other backend."""
    note = None
    leaf_names = ["q", "k", "v", "gates" if peer.name == "fla" else "gate_logits", "w_k", "w_v"]
    if peer.skip:
        method, inp = peer.name.removeprefix("flash-nsa-"), extra["inputs"]
        other = "triton" if backend == "reference" else "reference"
        run = (ours_like_fla(inp["q"], inp["k"], inp["v"], inp["gates"], other) if peer.name == "fla"
               else ours_like_flash_nsa(method, inp["q"], inp["k"], inp["v"], inp["logits"],
                                        (None, None) if method == "mean" else extra["glu"], other))
        note = f"dry run: {peer.name} skipped, ours through the {other} backend stands in"
        peer = Contestant(f"{ours.name} ({other} backend, standing in for {peer.name})", peer.function, run,
                          ours.leaves)
    try:
        result = {"T": t, **compare(peer, ours, leaf_names, grad_seed=t + 1)}
    except Exception as err:  # noqa: BLE001  recorded; the peer's timing then shows whether it runs at all
        result = {"T": t, "pair": f"{peer.name} vs {ours.name}", "error": f"{type(err).__name__}: {err}"[:300]}
        traceback.print_exc(limit=3)
    if note:
        result["note"] = note
    print("check " + ", ".join(f"{k} {v:.2e}" if isinstance(v, float) else f"{k} {v}"
                               for k, v in result.items() if v is not None), flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072])
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--contestants", nargs="+", choices=CONTESTANTS, default=list(CONTESTANTS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--sdpa-max-len", type=int, default=131072, help="dense attention only up to this length")
    p.add_argument("--warmup-ms", type=int, default=100)
    p.add_argument("--rep-ms", type=int, default=500)
    p.add_argument("--no-checks", action="store_true", help="skip the same-function checks before timing")
    p.add_argument("--no-definition-checks", action="store_true", help="skip the float64 CPU checks of the peers")
    p.add_argument("--json", help="results, rewritten after every contestant")
    p.add_argument("--markdown", help="the tables, also printed at the end")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny float32 shapes, no timing")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", choices=("triton", "reference"),
                   help="nsa-parallel's backend (default: triton; reference in a dry run, where the checks "
                        "run the Triton kernels under the interpreter)")
    p.add_argument("--tables-from", metavar="JSON", help="only print (and --markdown) the tables of a results file, "
                                                         "e.g. one a time limit cut short")
    args = p.parse_args()
    if args.tables_from:
        tables = markdown(json.loads(Path(args.tables_from).read_text()))
        print(tables)
        if args.markdown:
            Path(args.markdown).write_text(tables + "\n")
        return
    dry = args.dry_run or args.device == "cpu"
    if dry:
        args.device = "cpu"
        if args.seq_lens == p.get_default("seq_lens"):
            args.seq_lens = [80]  # the Triton interpreter takes ~25 s per selection forward+backward here
        if (args.heads, args.kv_heads, args.head_dim) == (64, 4, 128):
            args.heads, args.kv_heads, args.head_dim = 2, 1, 32
    dev = torch.device(args.device)
    dt = torch.float32 if dry else torch.bfloat16  # the interpreter's bf16 dots are wrong on the CPU
    backend = args.backend or ("reference" if dry else "triton")

    info = {"device": torch.cuda.get_device_name() if not dry else f"CPU dry run ({platform.processor() or 'cpu'})",
            "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python3"] + sys.argv), "dry_run": dry,
            "dtype": str(dt).replace("torch.", ""), "heads": args.heads, "kv_heads": args.kv_heads,
            "head_dim": args.head_dim, "peers": _peer_versions(), "definition_checks": {}, "checks": [], "rows": []}

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(info, indent=1))

    _add_peer_paths()
    peers: dict = {}
    wanted = set(args.contestants)
    if dry and torch.cuda.is_available():
        peers["flash_nsa_skip"] = peers["fla_skip"] = "dry run: the peers' kernels take CUDA tensors"
    elif wanted & {"flash-nsa-mean", "flash-nsa-swiglu"}:
        try:
            flash_nsa, info["flash_nsa_window"] = load_flash_nsa()
            cfg = flash_nsa.NSAConfig(head_dim=args.head_dim, num_heads=args.heads, num_kv_heads=args.kv_heads,
                                      kernel_size=32, stride=16, block_size=64, top_n=16, num_init_blocks=1,
                                      num_local_blocks=2, window_size=PAPER.window_size)
            peers["flash_nsa"], peers["flash_nsa_core"] = flash_nsa, flash_nsa.NSACore(cfg, process_group=None)
        except Exception as err:  # noqa: BLE001  Skip, or NSACore failing
            peers["flash_nsa_skip"] = str(err) if isinstance(err, Skip) else f"{type(err).__name__}: {err}"
    if "fla" in wanted and "fla_skip" not in peers:
        try:
            peers["fla"] = load_fla()
            if dry:
                del peers["fla"]
                raise Skip("fla's kernels need a GPU: Triton finds no driver on the CPU (its naive_nsa is "
                           "checked against ours instead)")
        except Skip as err:
            peers["fla_skip"] = str(err)
    for key in ("flash_nsa_skip", "fla_skip"):
        if key in peers:
            print(f"{key.split('_skip')[0].replace('_', '-')}: skipped: {peers[key]}", flush=True)

    if not args.no_definition_checks:
        definition_checks(info, dev, dt)
    save()

    print(f"# {info['device']}, torch {info['torch']}, triton {info['triton']}, {info['dtype']}, B=1, "
          f"H={args.heads}, G={args.kv_heads}, d={args.head_dim}; peers {info['peers'] or 'not found'}"
          + (f"; flash-nsa window: {info.get('flash_nsa_window')}" if "flash_nsa_window" in info else ""), flush=True)
    broken = False
    pair_of = {peer: ours for peer, ours in PAIRS}
    for t in args.seq_lens:
        contestants, extra = build(t, args, dev, dt, peers, backend)
        names = [n for n in CONTESTANTS if n in wanted]  # ours before each peer: a peer that breaks the
        names += [n for n in contestants if n.split(" (")[0] in wanted and n not in names]  # CUDA context
        for name in names:                                   # cannot take our rows with it
            c = contestants[name]
            ours = pair_of.get(name)
            if ours in wanted and not args.no_checks and not broken and (not c.skip or dry):
                info["checks"].append(check_pair(t, c, contestants[ours], extra, backend, dry))
                save()
                broken = dev.type == "cuda" and not _cuda_usable()
            if broken:
                row = {"function": c.function, "status": "not run: an earlier CUDA error broke the context"}
            elif dry:
                row = dry_call(c)
            else:
                row = measure(c, tuple(args.modes), args.warmup_ms, args.rep_ms)
                broken = not _cuda_usable()
            row = {"T": t, "contestant": name, **row}
            info["rows"].append(row)
            print(format_row(row), flush=True)
            save()
        del contestants, extra
        if dev.type == "cuda" and not broken:
            torch.cuda.empty_cache()
    tables = markdown(info)
    print("\n" + tables)
    if args.markdown:
        Path(args.markdown).write_text(tables + "\n")
    save()


# --- output -----------------------------------------------------------------------------------

def _ms(row: dict, key: str) -> str:
    value = row.get(key)
    return f"{value:.2f}" if isinstance(value, float) else "-"


def format_row(row: dict) -> str:
    if "dry_run_s" in row:
        return f"  T={row['T']} {row['contestant']}: one forward+backward in {row['dry_run_s']:.2f} s (dry run)"
    if row.get("status") != "ok":
        return f"  T={row['T']} {row['contestant']}: {row.get('status')}"
    return (f"  T={row['T']} {row['contestant']}: fwd {_ms(row, 'fwd_ms')} ms, bwd {_ms(row, 'bwd_ms')} ms, "
            f"f+b {_ms(row, 'fb_ms')} ms, peak {row.get('peak_mib', float('nan')):.0f} MiB")


def _ratio(rows: dict, a: str, b: str, key: str) -> str:
    """b's time over a's: how many times faster ``a`` is."""
    x, y = rows.get(a, {}).get(key), rows.get(b, {}).get(key)
    return f"{y / x:.2f}x" if isinstance(x, float) and isinstance(y, float) and x > 0 else "-"


def markdown(info: dict) -> str:
    lines = [f"{info['device']}, torch {info['torch']}, triton {info['triton']}, {info['dtype']}, B=1, "
             f"{info['heads']} query heads / {info['kv_heads']} KV heads, d={info['head_dim']}; peers: "
             + (", ".join(f"{k} {v}" for k, v in info["peers"].items()) or "not found")
             + (f"; flash-nsa's window: {info['flash_nsa_window']}" if info.get("flash_nsa_window") else ""), "",
             "| T | contestant | fwd ms | bwd ms | f+b ms | peak MiB | status |", "|---|---|---|---|---|---|---|"]
    for r in info["rows"]:
        peak = f"{r['peak_mib']:.0f}" if isinstance(r.get("peak_mib"), float) else "-"
        status = r.get("status", "")
        if "dry_run_s" in r:
            status += f", one f+b {r['dry_run_s']:.2f} s"
        lines.append(f"| {r['T'] // 1024 if r['T'] >= 1024 else r['T']}{'k' if r['T'] >= 1024 else ''} | "
                     f"{r['contestant']} | {_ms(r, 'fwd_ms')} | {_ms(r, 'bwd_ms')} | {_ms(r, 'fb_ms')} | {peak} | "
                     f"{status} |")
    if not info["dry_run"]:
        lines += ["", "Speed-ups (the other's time over nsa-parallel's; fwd / f+b):", "",
                  "| T | ours-paper vs faster SDPA | ours-paper vs flash-nsa-mean | ours-paper vs flash-nsa-swiglu "
                  "| ours vs flash-nsa-mean, same function | ours vs flash-nsa-swiglu, same function "
                  "| ours vs fla, same function | peak MiB: ours vs flash-nsa-mean, same function |",
                  "|---|---|---|---|---|---|---|---|"]
        for t in sorted({r["T"] for r in info["rows"]}):
            rows = {r["contestant"]: r for r in info["rows"] if r["T"] == t}
            sdpa = {}
            for key in ("fwd_ms", "fb_ms"):
                times = [rows.get(n, {}).get(key) for n in ("sdpa-flash", "sdpa-cudnn")]
                times = [x for x in times if isinstance(x, float)]
                if times:
                    sdpa[key] = min(times)
            rows["sdpa-best"] = sdpa
            cells = [f"{_ratio(rows, a, b, 'fwd_ms')} / {_ratio(rows, a, b, 'fb_ms')}" for a, b in (
                ("ours-paper", "sdpa-best"), ("ours-paper", "flash-nsa-mean"), ("ours-paper", "flash-nsa-swiglu"),
                ("ours@flash-nsa-mean", "flash-nsa-mean"), ("ours@flash-nsa-swiglu", "flash-nsa-swiglu"),
                ("ours@fla", "fla"))]
            peaks = [rows.get(n, {}).get("peak_mib") for n in ("ours@flash-nsa-mean", "flash-nsa-mean")]
            cells.append(" / ".join(f"{x:.0f}" if isinstance(x, float) else "-" for x in peaks))
            lines.append(f"| {t // 1024}k | " + " | ".join(cells) + " |")
    if info["checks"]:
        lines += ["", "Same-function checks before timing (norm-wise relative difference, output and gradients):", "",
                  "| T | pair | out | dq | dk | dv | d gates | dW_k | dW_v |", "|---|---|---|---|---|---|---|---|---|"]
        for ch in info["checks"]:
            if "error" in ch:
                lines.append(f"| {ch['T']} | {ch['pair']} | {ch['error']} | | | | | | |")
                continue
            gate = ch.get("dgates", ch.get("dgate_logits"))
            cells = [ch.get("out"), ch.get("dq"), ch.get("dk"), ch.get("dv"), gate, ch.get("dw_k"), ch.get("dw_v")]
            lines.append(f"| {ch['T']} | {ch['pair']} | "
                         + " | ".join(f"{x:.1e}" if isinstance(x, float) else "-" for x in cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
