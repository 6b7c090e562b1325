"""A Megatron-core GPT with the NSA spec, context-parallel over every launched GPU: one training step.

One process per GPU, ``context_parallel_size`` = world size (1 runs the plain path); the model is
bench_megatron_gpt.py's (2 layers, hidden 2048, 16 heads, 4 KV groups, rope, bf16). Tokens are
sliced per CP rank in Megatron's zigzag layout; one step is forward, backward, the gradient
all-reduce over the CP group (what Megatron's DDP does) and AdamW.

    python -m torch.distributed.run --nproc_per_node=4 benchmarks/bench_gpt_context_parallel.py --seq 524288
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import warnings

import torch
import torch.distributed as dist
import triton
from megatron.core import __version__ as megatron_version
from megatron.core import parallel_state, tensor_parallel

from bench_megatron_gpt import build_gpt, gpt_config
from nsa_parallel import NSAConfig
from nsa_parallel.context_parallel import CommStats, ShardLayout
from nsa_parallel.megatron import get_gpt_layer_nsa_spec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--groups", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=524288)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args()
    warnings.filterwarnings("ignore")

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    world, rank = dist.get_world_size(), dist.get_rank()
    parallel_state.initialize_model_parallel(context_parallel_size=world)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    cp_group = parallel_state.get_context_parallel_group()

    config = gpt_config(args, torch.bfloat16)
    config.context_parallel_size = world
    model = build_gpt(get_gpt_layer_nsa_spec(NSAConfig(), backend="triton"), config, args.seq, args.vocab)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator(device="cuda").manual_seed(0)
    tokens = torch.randint(args.vocab, (1, args.seq + 1), device="cuda", generator=gen)
    positions = ShardLayout("zigzag", world, args.seq).local_positions(rank, torch.device("cuda"))
    inputs, labels = tokens[:, :-1][:, positions].contiguous(), tokens[:, 1:][:, positions].contiguous()
    attentions = [layer.self_attention for layer in model.decoder.layers]

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = model(inputs, positions[None], None, labels=labels).mean()
        loss.backward()
        if world > 1:
            for param in model.parameters():
                dist.all_reduce(param.grad, group=cp_group)
        optimizer.step()
        return loss.detach()

    for _ in range(args.warmup):
        step()
    for attn in attentions:
        attn.core_attention.comm_stats.reset()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(args.steps):
        loss = step()
    end.record()
    torch.cuda.synchronize()
    ms = torch.tensor(start.elapsed_time(end) / args.steps, device="cuda")
    dist.all_reduce(ms, op=dist.ReduceOp.MAX)
    peak = torch.tensor(torch.cuda.max_memory_allocated() / 2**30, device="cuda")
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    total = CommStats()
    for attn in attentions:
        for key, value in attn.core_attention.comm_stats.sent.items():
            total.sent[key] += value // args.steps
        for key, value in attn.core_attention.comm_stats.received.items():
            total.received[key] += value // args.steps
    result = {"device": torch.cuda.get_device_name(), "gpus": world, "seq": args.seq, "step_ms": ms.item(),
              "peak_gib": peak.item(), "loss": loss.item(), "nsa_bytes_sent_rank0_per_step": total.total()[0],
              "by_path_rank0": total.as_dict(), "model": vars(args), "torch": torch.__version__,
              "triton": triton.__version__, "megatron_core": megatron_version, "python": platform.python_version(),
              "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv)}
    if rank == 0:
        print(f"| {args.seq} | {world} | {result['step_ms']:.1f} | {result['peak_gib']:.1f} | "
              f"{result['nsa_bytes_sent_rank0_per_step'] / 2**20:.0f} | {result['loss']:.3f} |", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
