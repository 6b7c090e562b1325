"""``summary.md``: an evaluation as markdown tables, ready for ``benchmarks/RESULTS.md``."""
from __future__ import annotations

import statistics
from pathlib import Path

from ..train.metrics import read_metrics

WARMUP_STEPS = 5  # left out of tokens/s: start-up, compilation and autotuning


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def training_record(run: Path) -> dict:
    """The run's training losses by step (overall, and per task of a mix) and its median tokens/s after
    the first steps, from its ``metrics.jsonl``; kept in ``eval.json`` so that plots and tables need no
    run directory."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return {"curves": {}, "tokens_per_s": None}
    rows = read_metrics(path)
    rates = [r["tokens_per_s"] for step, r in rows.items() if step > WARMUP_STEPS] or \
        [r["tokens_per_s"] for r in rows.values()]
    names = sorted({key for r in rows.values() for key in r if key == "loss" or key.startswith("loss/")})
    return {"curves": {name: [[step, r[name]] for step, r in rows.items() if name in r] for name in names},
            "tokens_per_s": statistics.median(rates) if rates else None}


def _grid(name: str, task: str, result: dict) -> list[str]:
    grid = result[task]["accuracy"]
    depths = list(next(iter(grid.values())))
    per_cell = "samples per cell" if task == "passkey" else "samples per length, queries binned by depth"
    lines = [f"{name}, {task} accuracy ({result[task]['samples']} {per_cell}; answer tokens: per-token accuracy "
             "and loss in nats over all depths):", "",
             "| length | " + " | ".join(f"depth {float(d):g}" for d in depths) + " | mean | answer tokens |",
             "|---|" + "---|" * (len(depths) + 2)]
    for length, row in grid.items():
        answer = result[task].get("answer_tokens", {}).get(length)
        tokens = f"{answer['accuracy']:.2f} / {answer['nll']:.2f}" if answer else "-"
        lines.append(f"| {length} | " + " | ".join(_fmt(row[d]) for d in depths)
                     + f" | {_fmt(_mean(row.values()))} | {tokens} |")
    return lines + [""]


def _needle_grid(name: str, result: dict) -> list[str]:
    grid = result["passkey"]["needle_chosen_by_layer"]
    depths = list(next(iter(grid.values())))
    lines = [f"{name}, passkey: the needle among the answer rows' selected blocks (fraction of answer rows and KV "
             "groups; the best layer, and the mean over layers):", "",
             "| length | " + " | ".join(f"depth {float(d):g}" for d in depths) + " |", "|---|" + "---|" * len(depths)]
    for length, row in grid.items():
        lines.append(f"| {length} | " + " | ".join(f"{max(row[d]):.2f} / {_mean(row[d]):.2f}" for d in depths) + " |")
    return lines + [""]


def markdown(result: dict) -> str:
    runs = result["runs"]
    head = ("| run | attention | parameters | steps | training tokens | held-out bits/token | passkey | MQAR | "
            "tokens/s |")
    lines = [f"- {name}: {r['evaluated']['device']}, torch {r['evaluated']['torch']}, {r['evaluated']['date']}: "
             f"`{r['evaluated']['command']}`" for name, r in runs.items() if "evaluated" in r]
    lines += ["",
             "Passkey and MQAR columns: mean accuracy over depths at each run's training length.", "",
             head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in runs.items():
        trained = str(r["trained_seq_length"])
        cells = [name, r["attention"], f"{r['parameters']:,}", str(r["step"]), f"{r['trained_tokens']:,}",
                 _fmt(r.get("heldout", {}).get("bits_per_token"), 4)]
        for task in ("passkey", "mqar"):
            cells.append(_fmt(_mean(r[task]["accuracy"].get(trained, {}).values())) if task in r else "-")
        rate = r["training"]["tokens_per_s"]
        cells.append("-" if rate is None else f"{rate:,.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for name, r in runs.items():
        for task in ("passkey", "mqar"):
            if task in r:
                lines += _grid(name, task, r)
        if "needle_chosen_by_layer" in r.get("passkey", {}):
            lines += _needle_grid(name, r)
    return "\n".join(lines)
