"""Where a job writes, all under ``train.output_dir``."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunPaths:
    output_dir: Path

    @property
    def checkpoints(self) -> Path:
        """Megatron distributed checkpoints and the ``latest`` pointer (see ``checkpoint``)."""
        return self.output_dir / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        return self.output_dir / "tensorboard"

    @property
    def metrics(self) -> Path:
        """One JSON object per step (see ``metrics``)."""
        return self.output_dir / "metrics.jsonl"

    @property
    def data_cache(self) -> Path:
        """Megatron ``GPTDataset`` index caches (with ``data.path``)."""
        return self.output_dir / "data_cache"

    @property
    def ray(self) -> Path:
        """Ray Train's own run records (the launcher's ``storage_path``)."""
        return self.output_dir / "ray"
