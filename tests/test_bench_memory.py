"""benchmarks/bench_memory.py --device cpu --tiny: runs end to end, refuses NSA with selective recomputation,
and full recomputation keeps less for the backward pass at the same loss."""
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
    assert "until the NSASelfAttention redesign" in rows["nsa", "selective"]["refused"]
    for attention in ("nsa", "full"):
        none, full = rows[attention, "none"], rows[attention, "full"]
        assert full["saved_gib"] < none["saved_gib"] / 4 and full["loss"] == pytest.approx(none["loss"], rel=1e-6)
    selective, none = rows["full", "selective"], rows["full", "none"]  # core_attn: the attention's s x s scores
    assert selective["saved_gib"] < none["saved_gib"] and selective["loss"] == pytest.approx(none["loss"], rel=1e-6)
    assert "| nsa | selective | 512 | refused by the config |" in run.stdout
