"""benchmarks/bench_memory.py --device cpu --tiny: runs end to end, and full and selective recomputation keep
less for the backward pass at the same loss, for NSA and full attention alike."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

ROOT = Path(__file__).resolve().parents[1]


def test_bench_memory_tiny_on_the_cpu(tmp_path):
    out = tmp_path / "memory.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_memory.py"), "--device", "cpu", "--tiny",
                          "--seqs", "512", "--json", str(out)], check=False, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout + run.stderr
    rows = {(r["attention"], r["recompute"]): r for r in json.loads(out.read_text())["rows"]}
    assert sorted(rows) == sorted((a, r) for a in ("nsa", "full") for r in ("none", "full", "selective"))
    for attention in ("nsa", "full"):
        none, full, selective = (rows[attention, r] for r in ("none", "full", "selective"))
        assert full["saved_gib"] < none["saved_gib"] / 4 and full["loss"] == pytest.approx(none["loss"], rel=1e-6)
        # core_attn: SDPA's s x s scores; NSA's branch outputs, block ids and rotated copies
        assert selective["saved_gib"] < none["saved_gib"]
        assert selective["loss"] == pytest.approx(none["loss"], rel=1e-6)
