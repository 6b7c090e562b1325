"""nsa-train with pipeline parallelism (Megatron's schedules and layer split; CPU, gloo): PP=2 trains as
PP=1 does, alone and with context or tensor parallelism, and a checkpoint saved at one PP size resumes at
the other."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def _train(out: Path, *overrides: str, tp: int = 1, cp: int = 1, pp: int = 1) -> list[dict]:
    """``nsa-train --no-ray`` on configs/tiny.yaml in ``tp x cp x pp`` processes; the metrics, one row a step."""
    workers = tp * cp * pp
    module = ["-m", "nsa_parallel.train", "--config", TINY, "--no-ray", f"train.output_dir={out}",
              f"parallel.tensor_model_parallel_size={tp}", f"parallel.context_parallel_size={cp}",
              f"parallel.pipeline_model_parallel_size={pp}", f"launch.num_workers={workers}",
              "train.checkpoint_interval=2", *overrides]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={workers}"] if workers > 1 else []
    run = subprocess.run([sys.executable, *launcher, *module], check=False, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout + run.stderr
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _same(a: dict, b: dict) -> None:
    """The same step: loss and gradient norm to float32 rounding."""
    assert a["step"] == b["step"]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


@pytest.fixture(scope="module")
def pp1(tmp_path_factory) -> tuple[Path, list[dict]]:
    """PP=1 in one process, 3 steps, checkpoints at steps 2 and 3."""
    out = tmp_path_factory.mktemp("pp1") / "run"
    return out, _train(out, "train.max_steps=3")


def test_pp2_trains_as_pp1_and_checkpoints_resume_at_the_other_size(pp1, tmp_path):
    out1, reference = pp1
    # PP=2 from scratch: the same initial model (each layer drawn from its own seed) and the same steps.
    rows = _train(tmp_path / "pp2", "train.max_steps=2", pp=2)
    assert len(rows) == 2
    for a, b in zip(rows, reference):
        _same(a, b)
    # Saved at PP=2, resumed at PP=1: step 3 as the uninterrupted run's.
    _same(_train(tmp_path / "pp2", "train.max_steps=3")[-1], reference[2])
    # Saved at PP=1 (step 2), resumed at PP=2.
    back = tmp_path / "pp1_to_pp2"
    shutil.copytree(out1, back)
    shutil.rmtree(back / "checkpoints" / "step_00000003")
    (back / "checkpoints" / "latest").write_text("step_00000002\n")
    _same(_train(back, "train.max_steps=3", pp=2)[-1], reference[2])


@pytest.mark.parametrize("with_parallelism", ["context", "tensor"])
def test_pp2_with_context_or_tensor_parallelism_on_4_workers(pp1, with_parallelism, tmp_path):
    if with_parallelism == "context":  # CP=2 starts from CP=1's model
        sizes, reference = {"cp": 2}, pp1[1]
    else:  # NSA's TP=2 layers draw other initial weights than TP=1's (NSASelfAttention's compressor init)
        sizes = {"tp": 2}
        reference = _train(tmp_path / "pp1", "train.max_steps=2", **sizes)
    rows = _train(tmp_path / "pp2", "train.max_steps=2", pp=2, **sizes)
    assert len(rows) == 2
    for a, b in zip(rows, reference):
        _same(a, b)


def test_pp_size_may_change_on_resume_on_cpus_not_on_gpus():
    """Megatron's distributed optimizer (GPUs, ``dp_reshardable``) reshards over data parallelism only."""
    from nsa_parallel.train.resume_config import is_fixed

    assert not is_fixed("parallel.pipeline_model_parallel_size", on_gpu=False)
    assert is_fixed("parallel.pipeline_model_parallel_size", on_gpu=True)
