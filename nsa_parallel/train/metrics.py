"""Training metrics, written by rank 0: TensorBoard scalars and ``metrics.jsonl``.

``metrics.jsonl`` has one JSON object per step with exact values (floats round-trip), for
plots and for comparing runs. A resumed run appends to it, so a step repeated after a
restart appears twice (the later line is the one that counts); TensorBoard drops the
repeated steps' old events itself (``purge_step``).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from .paths import RunPaths

log = logging.getLogger(__name__)


class MetricsWriter:
    def __init__(self, paths: RunPaths, start_step: int):
        self.jsonl = paths.metrics
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # e.g. a bare GPU image; metrics.jsonl still has everything
            log.warning("tensorboard is not installed, so no TensorBoard logs (pip install tensorboard)")
            self.tensorboard = None
        else:
            self.tensorboard = SummaryWriter(str(paths.tensorboard), purge_step=start_step + 1)

    def write(self, step: int, values: dict[str, float]) -> None:
        with open(self.jsonl, "a") as f:  # whole lines, readable while the run goes on
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tensorboard is not None:
            for name, value in values.items():
                self.tensorboard.add_scalar(f"train/{name}", value, step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def read_metrics(path: Path) -> dict[int, dict[str, float]]:
    """Each step's values from a ``metrics.jsonl``, the last line of a step winning."""
    rows = {}
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            rows[row.pop("step")] = row
    return dict(sorted(rows.items()))
