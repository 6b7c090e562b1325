"""Context-parallel NSA's bytes per step while a model trains, against ring attention's.

The selected-block fetch moves the union of the remote blocks a rank's queries chose, so its
size depends on the weights: random inputs spread the choices over every block, a trained model
may concentrate them. This trains with ``context_parallel_size = P`` from scratch
(``torchrun --nproc_per_node=P python -m nsa_parallel.train --no-ray``; default config
``configs/gpu-1gpu-16k.yaml``, the built-in retrieval task) and reads the ``cp_comm/*`` bytes
nsa-train logs for rank 0 every step, then prints and plots them as a fraction of what ring
attention would move for the same shapes (``ring_attention_bytes``, all layers and micro-batches).

    python benchmarks/cp_comm_during_training.py --out outputs/cp_comm train.max_steps=2000
    python benchmarks/cp_comm_during_training.py --out outputs/cp_comm --summary-only
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]  # run from a checkout, installed or not

from nsa_parallel.context_parallel.comm_stats import CATEGORIES, ring_attention_bytes  # noqa: E402
from nsa_parallel.job_config import JobConfig, load_job_config  # noqa: E402
from nsa_parallel.train.metrics import read_metrics  # noqa: E402

MiB = 2**20


def train(config_path: Path, out: Path, cp: int, overrides: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={cp}", "-m", "nsa_parallel.train",
           "--config", str(config_path), "--no-ray", f"parallel.context_parallel_size={cp}",
           f"launch.num_workers={cp}", f"train.output_dir={out}", *overrides]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), str(ROOT / "kernels"), os.environ.get("PYTHONPATH")]))})


def ring_mib_per_step(config: JobConfig) -> float:
    """Ring attention's bytes one rank sends per step (forward + backward, every layer)."""
    m, t, p = config.model, config.train, config.parallel
    element_size = 2 if t.precision in ("bf16", "fp16") else 4
    data_parallel = config.launch.num_workers // (p.context_parallel_size * p.tensor_model_parallel_size
                                                  * p.pipeline_model_parallel_size)
    micro_batches = t.global_batch_size // (t.micro_batch_size * data_parallel)
    per_layer = ring_attention_bytes(t.seq_length, p.context_parallel_size, t.micro_batch_size,
                                     m.num_query_groups // p.tensor_model_parallel_size,
                                     m.kv_channels, m.kv_channels, element_size)
    return sum(per_layer.values()) * m.num_layers * micro_batches / MiB


def per_step(rows: dict[int, dict[str, float]]) -> dict[int, dict[str, float]]:
    """Rank 0's MiB per step by path, the larger of sent and received (both phases)."""
    out = {}
    for step, row in rows.items():
        paths = {}
        for category in CATEGORIES:
            sent = sum(row.get(f"cp_comm/{phase}/{category}/sent_MiB", 0.0) for phase in ("forward", "backward"))
            received = sum(row.get(f"cp_comm/{phase}/{category}/received_MiB", 0.0)
                           for phase in ("forward", "backward"))
            paths[category] = max(sent, received)
        out[step] = {**paths, "total": sum(paths.values()), "loss": row["loss"]}
    return out


def plot(steps: dict[int, dict[str, float]], ring: float, png: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return False
    fig, (ax, ax_loss) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    xs = list(steps)
    for category in ("blocks", "compressed", "halo"):
        ax.plot(xs, [s[category] / ring for s in steps.values()], label=f"{category} fetch" if category == "blocks"
                else category)
    ax.plot(xs, [s["total"] / ring for s in steps.values()], label="total", color="black")
    ax.axhline(1 / 8, color="grey", linestyle="--", label="1/8 of ring attention")
    ax.set_ylabel("bytes / ring attention's")
    ax.legend()
    ax_loss.plot(xs, [s["loss"] for s in steps.values()])
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    return True


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "gpu-1gpu-16k.yaml")
    p.add_argument("--out", type=Path, default=Path("outputs/cp_comm"))
    p.add_argument("--cp", type=int, default=2, help="context-parallel ranks (one process each)")
    p.add_argument("--summary-only", action="store_true", help="summarise an existing run")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = p.parse_intermixed_args(argv)  # options may follow the overrides

    if not args.summary_only:
        train(args.config, args.out, args.cp, args.overrides)
    config = load_job_config(args.config, [f"parallel.context_parallel_size={args.cp}",
                                           f"launch.num_workers={args.cp}", *args.overrides])
    steps = per_step(read_metrics(args.out / "metrics.jsonl"))
    ring = ring_mib_per_step(config)
    print(f"\n{args.config.name}, CP={args.cp}: seq {config.train.seq_length}, {config.model.num_layers} layers; "
          f"ring attention would send {ring:.1f} MiB per rank and step\n")
    print("| step | loss | halo | compressed | blocks | requests | total (MiB) | / ring |")
    print("|---|---|---|---|---|---|---|---|")
    shown = sorted({s for s in steps if s == 1 or s % max(1, len(steps) // 10) == 0} | {max(steps)})
    for s in shown:
        r = steps[s]
        print(f"| {s} | {r['loss']:.3f} | {r['halo']:.1f} | {r['compressed']:.1f} | {r['blocks']:.1f} | "
              f"{r['requests']:.2f} | {r['total']:.1f} | {r['total'] / ring:.3f} |")
    (args.out / "cp_comm_summary.json").write_text(json.dumps({"ring_MiB_per_step": ring, "steps": steps}, indent=1))
    if plot(steps, ring, args.out / "cp_comm.png"):
        print(f"\nplot: {args.out / 'cp_comm.png'}")


if __name__ == "__main__":
    main()
