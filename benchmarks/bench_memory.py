"""Peak memory of one nsa-train step with each activation-recomputation option, NSA next to full attention.

A 2-layer GPT (hidden 2048, 16 heads, 4 KV groups, head dim 128, MLP 8192, vocab 4096, bf16, batch 1)
at 32k and 64k tokens on one GPU, built and trained exactly as ``nsa-train`` does (its config keys,
``build_model``, ``build_optimizer``: Megatron's DDP and distributed optimizer, and ``train_step``:
Megatron's schedule), with ``train.recompute_granularity`` null, full (``uniform``, 1 layer: every
layer recomputed) and selective (Megatron's default, ``core_attn``: SDPA, or NSA's core with ``phi``,
both in Megatron's ``core_attention`` slot). Per configuration, after ``--warmup`` steps:

- ``peak_gib``: ``torch.cuda.max_memory_allocated`` during one step, and ``held_gib`` what was allocated
  just before it (weights, gradients, optimizer state); ``peak_gib - held_gib`` is the step's own
  (activations, their gradients, temporaries);
- ``saved_gib``: the bytes autograd saved for the backward pass in that step's forward (distinct
  storages, parameters excluded), counted by ``torch.autograd.graph.saved_tensors_hooks``: the
  activation memory recomputation trades, on any device;
- ``ms``: the step's wall time.

``--device cpu --tiny`` runs the same code on the CPU (gloo, fp32, configs/tiny.yaml's model, 512 and
1024 tokens, Triton's interpreter): a check that the script runs end to end; there only ``saved_gib``
and ``ms`` are measured.

    python benchmarks/bench_memory.py --json memory.json        # GPU: about 3 minutes on an H100
    python benchmarks/bench_memory.py --device cpu --tiny
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1] == "cpu" or not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

import torch.distributed as dist  # noqa: E402
from megatron.core import __version__ as megatron_version  # noqa: E402
from megatron.core import parallel_state  # noqa: E402

from nsa_parallel.job_config import JobConfig, load_job_config  # noqa: E402
from nsa_parallel.train.data import step_microbatches, token_source  # noqa: E402
from nsa_parallel.train.model import build_model, init_model_parallel  # noqa: E402
from nsa_parallel.train.optimizer import build_optimizer  # noqa: E402
from nsa_parallel.train.trainer import train_step  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECOMPUTE = {
    "none": [],
    "full": ["train.recompute_granularity=full", "train.recompute_method=uniform", "train.recompute_num_layers=1"],
    "selective": ["train.recompute_granularity=selective"],
}
GPU_MODEL = ["model.num_layers=2", "model.hidden_size=2048", "model.num_attention_heads=16", "model.num_query_groups=4",
             "model.kv_channels=128", "model.ffn_hidden_size=8192", "model.vocab_size=4096", "data.num_pairs=1024",
             "train.precision=bf16", "launch.gpus_per_worker=1"]
TINY_MODEL = ["train.precision=fp32", "launch.gpus_per_worker=0"]  # configs/tiny.yaml's model


def job(attention: str, recompute: str, seq: int, tiny: bool) -> JobConfig:
    """The nsa-train config of one measurement."""
    return load_job_config(ROOT / "configs" / "tiny.yaml", [
        *(TINY_MODEL if tiny else GPU_MODEL), f"model.attention={attention}", *RECOMPUTE[recompute],
        f"train.seq_length={seq}", "train.micro_batch_size=1", "train.global_batch_size=1",
        "parallel.context_parallel_size=1", "launch.num_workers=1"])


class SavedBytes:
    """Bytes of the distinct non-parameter storages autograd saves for backward in forward passes."""

    def __init__(self, params: set[int]):
        self.params, self.storages = params, {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        # Only the forward pass's: what recomputation saves again inside the backward pass lives briefly.
        in_backward = torch._C._current_graph_task_id() != -1
        if storage.data_ptr() not in self.params and not in_backward:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def gib(self) -> float:
        return sum(self.storages.values()) / 2**30


def measure(config: JobConfig, device: torch.device, warmup: int) -> dict:
    """One step's memory and time after ``warmup`` steps (see the module's docstring)."""
    init_model_parallel(config, device)
    try:
        model = build_model(config, device)
        optimizer = build_optimizer(model, config.train, device)
        batches = step_microbatches(token_source(config, Path(tempfile.gettempdir())), 0, config, 0, 1, 0, 1, device)
        for _ in range(warmup):
            train_step(optimizer.module, optimizer, batches, config.train.lr)
        saved = SavedBytes({p.untyped_storage().data_ptr() for p in optimizer.module.parameters()})
        on_gpu = device.type == "cuda"
        if on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            held = torch.cuda.memory_allocated()
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            loss, _, _ = train_step(optimizer.module, optimizer, batches, config.train.lr)
        if on_gpu:
            torch.cuda.synchronize()
        row = {"ms": (time.perf_counter() - start) * 1e3, "saved_gib": saved.gib, "loss": loss}
        if on_gpu:
            row.update(peak_gib=torch.cuda.max_memory_allocated() / 2**30, held_gib=held / 2**30)
        return row
    except torch.cuda.OutOfMemoryError:
        return {"oom": True}
    finally:
        parallel_state.destroy_model_parallel()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="configs/tiny.yaml's model at 512 and 1024 tokens")
    p.add_argument("--seqs", type=int, nargs="+", help="sequence lengths (default 32768 65536; --tiny: 512 1024)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", help="write the rows, with device and versions, here")
    args = p.parse_args()
    warnings.filterwarnings("ignore")  # Megatron's deprecation and apex/TE fallback notices
    device = torch.device(args.device)
    seqs = args.seqs or ([512, 1024] if args.tiny else [32768, 65536])
    if device.type == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "megatron_core": megatron_version,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": " ".join(["python"] + sys.argv), "model": TINY_MODEL if args.tiny else GPU_MODEL, "rows": []}
    print(f"# {info['device']}, torch {info['torch']}, megatron-core {megatron_version}\n\n"
          "| attention | recompute | tokens | peak (GiB) | held before (GiB) | saved for backward (GiB) | step (ms) |\n"
          "|---|---|---|---|---|---|---|", flush=True)
    for seq in seqs:
        for attention in ("nsa", "full"):
            for recompute in RECOMPUTE:
                row = {"attention": attention, "recompute": recompute, "seq": seq,
                       **measure(job(attention, recompute, seq, args.tiny), device, args.warmup)}
                info["rows"].append(row)
                if "oom" in row:
                    cells = ["out of memory"] + ["-"] * 3
                else:
                    cells = [f"{row['peak_gib']:.2f}" if "peak_gib" in row else "-",
                             f"{row['held_gib']:.2f}" if "held_gib" in row else "-",
                             f"{row['saved_gib']:.3f}", f"{row['ms']:.0f}"]
                print(f"| {attention} | {recompute} | {seq} | " + " | ".join(cells) + " |", flush=True)
    dist.destroy_process_group()
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
