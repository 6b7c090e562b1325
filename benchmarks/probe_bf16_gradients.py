"""Where do a bf16 NSA GPT's gradient errors come from? One stage at a time in float32.

bench_megatron_gpt.py's 2-layer GPT (hidden 2048, 16 heads / 4 KV groups, rope, paper NSA
settings), bf16 with the Triton kernels against float64 with the reference on the same weights.
Every run replays the first bf16 run's selected blocks, so selection ties cannot move the
comparison; each variant computes one stage in float32 on upcast inputs and casts its output
back to bf16. Prints logits and worst-gradient relative errors per variant.

    python benchmarks/probe_bf16_gradients.py
"""
from __future__ import annotations

import argparse
import contextlib
import tempfile
import warnings
from collections.abc import Callable, Iterator

import torch

import bench_megatron_gpt as bm
from nsa_parallel import NSAConfig, ops, reference
from nsa_parallel.compression import BlockCompressor
from nsa_parallel.megatron import get_gpt_layer_nsa_spec


def in_float32(fn: Callable) -> Callable:
    """``fn`` on float32 copies of its floating-point tensor arguments; outputs cast back."""
    def wrapper(*args, **kwargs):
        dtype = next(a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())
        up = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        out = fn(*up, **kwargs)
        return (out[0].to(dtype), *out[1:]) if isinstance(out, tuple) else out.to(dtype)
    return wrapper


@contextlib.contextmanager
def phi_in_float32(config: NSAConfig) -> Iterator[None]:
    """BlockCompressor computed in float32 (on upcast input and weights), output in the input's dtype."""
    forward = BlockCompressor.forward

    def upcast(self, x):
        weights = (p.float() for p in (self.position, self.w1, self.b1, self.w2, self.b2))
        return reference.compress_tokens(x.float(), *weights, config).to(x.dtype)
    BlockCompressor.forward = upcast
    try:
        yield
    finally:
        BlockCompressor.forward = forward


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check-seq", type=int, default=4096)
    cli = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.cuda.set_device(0)
    torch.distributed.init_process_group("nccl", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
    bm.reset_parallel_state()
    args = argparse.Namespace(layers=2, hidden=2048, heads=16, groups=4, vocab=32000, check_seq=cli.check_seq)
    nsa = NSAConfig()
    torch.manual_seed(0)
    tokens = torch.randint(args.vocab, (1, args.check_seq + 1), device="cuda")
    low, high = bm.model_pair(lambda backend: get_gpt_layer_nsa_spec(nsa, backend=backend), args)

    selected: list[torch.Tensor] = []

    def replaying(module) -> contextlib.AbstractContextManager:
        replay = iter(selected)
        return bm.patched(module, "select_blocks", lambda _: lambda *a, **kw: next(replay))

    with bm.patched(ops, "select_blocks", bm.recording(selected)):
        runs = {"all bf16 (Triton)": bm.forward_backward(low, tokens)}
    with replaying(reference):
        ref = bm.forward_backward(high, tokens)
    for name in ("compressed_attention", "selection_attention", "window_attention", "combine_branches"):
        with replaying(ops), bm.patched(ops, name, in_float32):
            runs[f"{name} in float32"] = bm.forward_backward(low, tokens)
    with replaying(ops), phi_in_float32(nsa):
        runs["phi in float32"] = bm.forward_backward(low, tokens)
    # All of NSA's own arithmetic in float32 at once: what is left is the bf16 model around it.
    with contextlib.ExitStack() as stack:
        stack.enter_context(replaying(ops))
        stack.enter_context(phi_in_float32(nsa))
        for name in ("compressed_attention", "selection_attention", "window_attention", "combine_branches"):
            stack.enter_context(bm.patched(ops, name, in_float32))
        runs["phi and every op in float32"] = bm.forward_backward(low, tokens)

    print(f"| run | logits | worst gradient | gradients over {bm.TOLERANCE:.0e} | all gradients as one vector |\n"
          "|---|---|---|---|---|")
    for name, run in runs.items():
        row = bm.compare(run, ref, name)
        top = sorted(row["grad_rel_err"].items(), key=lambda kv: -kv[1])[:3]
        worst = ", ".join(f"{k.split('decoder.layers.')[-1]} {v:.2e}" for k, v in top)
        print(f"| {name} | {row['logits_rel_err']:.2e} | {worst} | {row['grads_over_tolerance']} of "
              f"{len(row['grad_rel_err'])} | {row['all_grads_rel_err']:.2e} |", flush=True)


if __name__ == "__main__":
    main()
