"""Plots benchmarks/results/cp_*.json (from bench_context_parallel.py): step time and bytes per rank vs GPUs.

    python benchmarks/plot_context_parallel.py benchmarks/results/cp_h200_*.json --out benchmarks/cp_scaling_h200.png
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, device = [], ""
    for path in args.files:
        with open(path) as f:
            run = json.load(f)
        device = run["device"]
        steps += [s for s in run["steps"] if not s.get("oom")]
    times, sent, ring = defaultdict(dict), defaultdict(dict), defaultdict(dict)
    for s in steps:
        layouts = ["zigzag", "contiguous"] if s["layout"] == "single" else [s["layout"]]
        for layout in layouts:
            times[s["seq"], layout][s["gpus"]] = s["ms"]
            if s["gpus"] > 1:
                sent[s["seq"], layout][s["gpus"]] = s["sent_bytes_max_rank"] / 2**20
                ring[s["seq"], layout][s["gpus"]] = s["ring_bytes"] / 2**20

    fig, (ax_t, ax_c) = plt.subplots(1, 2, figsize=(12, 4.5))
    for (seq, layout), by_p in sorted(times.items()):
        ps = sorted(by_p)
        style = "-" if layout == "zigzag" else "--"
        ax_t.plot(ps, [by_p[p] for p in ps], style, marker="o", label=f"{seq // 1024}k {layout}")
    ax_t.set(xlabel="GPUs", ylabel="forward+backward ms (one NSA attention)", yscale="log",
             title=f"Step time, {device}")
    for (seq, layout), by_p in sorted(sent.items()):
        if layout != "zigzag":
            continue
        ps = sorted(by_p)
        line = ax_c.plot(ps, [by_p[p] for p in ps], marker="o", label=f"{seq // 1024}k NSA CP (zigzag)")[0]
        ax_c.plot(ps, [ring[seq, layout][p] for p in ps], ":", marker="x", color=line.get_color(),
                  label=f"{seq // 1024}k ring attention")
    ax_c.set(xlabel="GPUs", ylabel="MiB sent per rank (fwd+bwd, busiest rank)", yscale="log",
             title="Communication per rank (random inputs)")
    for ax in (ax_t, ax_c):
        ax.set_xticks([1, 2, 4])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)


if __name__ == "__main__":
    main()
