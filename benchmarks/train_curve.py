"""NSA against Megatron's full attention: the same nsa-train job twice, tokens/s and loss curves.

Runs ``python -m nsa_parallel.train --no-ray`` (one process, no Ray needed) with the config
(default ``configs/gpu-1gpu-16k.yaml``: one GPU, 16k-token sequences, the built-in
retrieval task) once with ``model.attention=nsa`` and once with ``model.attention=full``
(Megatron's own layer spec: Transformer Engine's when installed, else the local
``DotProductAttention``, which builds the whole score matrix). Each run writes under
``--out``/<attention>/ and resumes there if it was interrupted. Then prints a markdown
table (median tokens/s after the first steps, loss at the end) and plots both loss
curves to ``--out``/loss_curve.png (with matplotlib).

    python benchmarks/train_curve.py --out outputs/train_curve            # both runs, table, plot
    python benchmarks/train_curve.py --out outputs/train_curve --plot-only
    python benchmarks/train_curve.py train.max_steps=100                  # overrides go to both runs
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]  # run from a checkout, installed or not

from nsa_parallel.job_config import load_job_config  # noqa: E402
from nsa_parallel.train.metrics import read_metrics  # noqa: E402

ATTENTIONS = ("nsa", "full")
WARMUP_STEPS = 5  # left out of tokens/s: compilation and autotuning


def train(config: Path, attention: str, out: Path, overrides: list[str]) -> None:
    cmd = [sys.executable, "-m", "nsa_parallel.train", "--config", str(config), "--no-ray",
           f"model.attention={attention}", f"train.output_dir={out / attention}", *overrides]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(ROOT), str(ROOT / "kernels"), os.environ.get("PYTHONPATH")]))})


def summary(out: Path) -> dict[str, dict[str, float]]:
    result = {}
    for attention in ATTENTIONS:
        path = out / attention / "metrics.jsonl"
        if not path.exists():
            continue
        rows = read_metrics(path)
        steps = sorted(rows)
        rates = [rows[s]["tokens_per_s"] for s in steps if s > WARMUP_STEPS] or [rows[s]["tokens_per_s"] for s in steps]
        tail = [rows[s]["loss"] for s in steps[-10:]]
        result[attention] = {"steps": steps[-1], "tokens_per_s": statistics.median(rates),
                             "first_loss": rows[steps[0]]["loss"], "final_loss": statistics.mean(tail)}
    return result


def plot(out: Path, vocab_size: int | None) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for attention in ATTENTIONS:
        path = out / attention / "metrics.jsonl"
        if path.exists():
            rows = read_metrics(path)
            ax.plot(list(rows), [r["loss"] for r in rows.values()], label=attention)
    if vocab_size:
        # The retrieval task's answers are uniform over (vocab - 1) // 2 values: the loss of guessing.
        ax.axhline(math.log((vocab_size - 1) // 2), color="grey", linestyle="--", label="guessing a value")
    ax.set_xlabel("step")
    ax.set_ylabel("loss on the answers")
    ax.legend()
    fig.tight_layout()
    png = out / "loss_curve.png"
    fig.savefig(png, dpi=120)
    return png


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "gpu-1gpu-16k.yaml")
    p.add_argument("--out", type=Path, default=Path("outputs/train_curve"))
    p.add_argument("--only", choices=ATTENTIONS, help="run just this attention")
    p.add_argument("--plot-only", action="store_true", help="summarise and plot existing runs")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for both runs")
    args = p.parse_args(argv)

    if not args.plot_only:
        for attention in [args.only] if args.only else ATTENTIONS:
            train(args.config, attention, args.out, args.overrides)
    config = load_job_config(args.config, args.overrides)
    rows = summary(args.out)
    print(f"\n{args.config.name}: seq {config.train.seq_length}, global batch {config.train.global_batch_size}, "
          f"{config.model.num_layers} layers x {config.model.hidden_size}\n")
    print("| attention | steps | tokens/s (median) | loss, first step | loss, last 10 steps |")
    print("|---|---|---|---|---|")
    for attention, r in rows.items():
        print(f"| {attention} | {r['steps']} | {r['tokens_per_s']:,.0f} | {r['first_loss']:.3f} | {r['final_loss']:.3f} |")
    (args.out / "summary.json").write_text(json.dumps(rows, indent=1))
    png = plot(args.out, config.model.vocab_size if config.data.path is None else None)
    if png:
        print(f"\nloss curves: {png}")


if __name__ == "__main__":
    main()
