"""Summarises scripts/gpu_megatron_lm.sh's Megatron-LM logs: per run the loss and step time of every
iteration, the peak memory Megatron-LM reports, the checkpoint it loaded; then NSA against Megatron's
default spec, and the resumed run against the uninterrupted one.

    python benchmarks/megatron_lm_summary.py LOG_DIR [--json summary.json]

Reads ``LOG_DIR/<run>.log`` (the names scripts/gpu_megatron_lm.sh gives them); prints markdown.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

# Megatron-LM's training_log and report_memory lines (megatron/training/training.py, utils/common_utils.py).
ITERATION = re.compile(r"iteration\s+(\d+)/\s*(\d+) \|.*?elapsed time per iteration \(ms\): ([\d.]+) \|"
                       r".*?lm loss: ([-\d.E+naif]+) \|(?:.*?grad norm: ([\d.naif]+) \|)?")
MEMORY = re.compile(r"\(after (\d+) iterations\) memory \(MB\) \| allocated: ([\d.]+) \| max allocated: ([\d.]+)")
LOADED = re.compile(r"successfully loaded checkpoint from (\S+) .* at iteration (\d+)")
WARMUP = 2  # the first iterations compile kernels and allocate: not timed


def parse_log(text: str) -> dict:
    """{"loss": {iteration: loss}, "grad_norm": {...}, "ms": {...}, "max_allocated_mb", "loaded_iteration"}."""
    run: dict = {"loss": {}, "grad_norm": {}, "ms": {}}
    for m in ITERATION.finditer(text):
        step = int(m.group(1))
        run["loss"][step], run["ms"][step] = float(m.group(4)), float(m.group(3))
        if m.group(5):
            run["grad_norm"][step] = float(m.group(5))
    memory = MEMORY.findall(text)
    if memory:
        run["max_allocated_mb"] = max(float(peak) for _, _, peak in memory)
    loaded = LOADED.search(text)
    if loaded:
        run["loaded_iteration"] = int(loaded.group(2))
    first = min(run["ms"], default=0)
    timed = [ms for step, ms in run["ms"].items() if step >= first + WARMUP]
    if timed:
        run["mean_ms"] = statistics.mean(timed)
    return run


def summarise(runs: dict[str, dict]) -> dict:
    """Comparisons between the runs that are there."""
    out: dict = {}
    nsa, resumed = runs.get("nsa"), runs.get("nsa_resume")
    if nsa and resumed and resumed["loss"]:
        both = sorted(set(nsa["loss"]) & set(resumed["loss"]))
        out["resume"] = {"loaded_iteration": resumed.get("loaded_iteration"), "first_iteration": min(resumed["loss"]),
                         "max_rel_loss_diff": max((abs(resumed["loss"][s] - nsa["loss"][s]) / abs(nsa["loss"][s])
                                                   for s in both), default=None)}
    for name in ("nsa", "default"):
        if runs.get(name) and runs[name]["loss"]:
            last = max(runs[name]["loss"])
            out[name] = {"final_iteration": last, "final_loss": runs[name]["loss"][last],
                         "mean_ms": runs[name].get("mean_ms")}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("log_dir", type=Path)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    runs = {log.stem: parse_log(log.read_text(errors="replace")) for log in sorted(args.log_dir.glob("*.log"))}
    summary = summarise(runs)
    print("| run | iterations | first loss | last loss | step (ms, mean after warm-up) | max allocated (MiB) |"
          " loaded at |\n|---|---|---|---|---|---|---|")
    for name, run in runs.items():
        steps = sorted(run["loss"])
        if not steps:
            print(f"| {name} | none (see {name}.log) | | | | | |")
            continue
        ms = f"{run['mean_ms']:.1f}" if "mean_ms" in run else "-"
        mem = f"{run['max_allocated_mb']:.0f}" if "max_allocated_mb" in run else "-"
        print(f"| {name} | {steps[0]}-{steps[-1]} | {run['loss'][steps[0]]:.4f} | {run['loss'][steps[-1]]:.4f} | "
              f"{ms} | {mem} | {run.get('loaded_iteration', '-')} |")
    print("\n" + json.dumps(summary, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
