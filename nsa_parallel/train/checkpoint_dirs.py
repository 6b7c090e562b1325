"""The layout of ``<output_dir>/checkpoints``: ``step_N/`` checkpoints, the ``latest`` pointer,
interrupted writes, which checkpoint a run resumes from and which are pruned. Torch-free, so
the launching process can use it.
"""
from __future__ import annotations

import logging
import math
import re
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

LATEST = "latest"
TMP_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"step_(\d{8})")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def _steps(root: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every ``step_N`` directory, oldest first."""
    return sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.fullmatch(p.name)))


def latest_name(root: Path) -> str | None:
    """What ``latest`` names, or None before the first checkpoint."""
    pointer = root / LATEST
    return pointer.read_text().strip() if pointer.is_file() else None


def resume_candidates(root: Path) -> list[Path]:
    """The checkpoints a run may resume from, best first: the one ``latest`` names, then every
    earlier ``step_N`` directory, newest first (the fallbacks when it is damaged). Directories
    newer than ``latest`` were never published and are not candidates."""
    named = latest_name(root)
    if named is None:
        return []
    m = _STEP_DIR.fullmatch(named)
    newest = int(m.group(1)) if m else math.inf
    return [root / named] + [p for step, p in reversed(_steps(root)) if step <= newest and p.name != named]


def remove_interrupted(root: Path) -> None:
    """Deletes checkpoints whose writing never finished (rank 0, before any rank saves)."""
    for leftover in root.glob(TMP_PREFIX + "*"):
        log.warning("removing interrupted checkpoint %s", leftover)
        shutil.rmtree(leftover)


def prune(root: Path, newest: int, keep: int) -> None:
    """Keeps the ``keep`` newest checkpoints up to step ``newest`` (just written and verified).

    Directories past ``newest`` (left after resuming from an earlier checkpoint) are kept:
    training replaces each when it saves that step again.
    """
    older = [p for step, p in _steps(root) if step <= newest]
    for old in older[:-keep]:
        shutil.rmtree(old)
