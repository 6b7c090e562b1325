"""PNGs of an evaluation: accuracy heat maps by length and depth, and the runs' training loss curves."""
from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def heat_maps(runs: dict[str, dict], task: str, path: Path) -> Path:
    """One panel per run: ``task``'s accuracy, context length (rows) by depth (columns)."""
    plt = _pyplot()
    names = [name for name in runs if task in runs[name]]
    fig, axes = plt.subplots(1, len(names), figsize=(1.6 + 2.6 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        grid = runs[name][task]["accuracy"]
        lengths, depths = list(grid), list(next(iter(grid.values())))
        values = [[grid[n][d] if grid[n][d] is not None else float("nan") for d in depths] for n in lengths]
        image = ax.imshow(values, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for row, line in enumerate(values):
            for col, value in enumerate(line):
                ax.text(col, row, "-" if value != value else f"{value:.2f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(depths)), [f"{float(d):.2g}" for d in depths])
        ax.set_yticks(range(len(lengths)), [f"{int(n) // 1024}k" if int(n) >= 1024 else n for n in lengths])
        trained = runs[name].get("trained_seq_length")
        ax.set_title(f"{name}" + (f" (trained at {trained})" if trained else ""), fontsize=9)
        ax.set_xlabel("depth of the answer in the context")
    axes[0][0].set_ylabel("context length")
    fig.colorbar(image, ax=axes[0].tolist(), label=f"{task} accuracy")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def loss_curves(runs: dict[str, dict], path: Path) -> Path:
    """Training losses against tokens seen, one line per run: the mean over all loss tokens, then one
    panel per task of the mix (a step's samples of that task)."""
    plt = _pyplot()
    names = sorted({name for r in runs.values() for name in r["training"]["curves"]}, key=lambda n: (n != "loss", n))
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(1 + 3.6 * max(len(names), 1), 3.4), squeeze=False)
    for ax, curve in zip(axes[0], names):
        for run, result in runs.items():
            points = result["training"]["curves"].get(curve, [])
            if points:
                steps, losses = zip(*points)
                ax.plot([step * result["tokens_per_step"] for step in steps], losses, linewidth=0.8,
                        label=f"{run} ({result['attention']})")
        ax.set_title("all loss tokens" if curve == "loss" else curve.removeprefix("loss/"), fontsize=9)
        ax.set_xlabel("training tokens")
        ax.set_yscale("log")
    axes[0][0].set_ylabel("training loss (nats per loss token)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
