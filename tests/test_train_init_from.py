"""train.init_from: a new run starts from another run's weights (step 0, fresh optimizer), at another
length if it likes; a different model or a missing checkpoint fails before any work."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nsa_parallel.train import cli

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
ONE_WORKER = ["launch.num_workers=1", "parallel.context_parallel_size=1"]

pytest.importorskip("megatron.core")


def _no_ray(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nsa_parallel.train", "--config", TINY, "--no-ray", *ONE_WORKER,
                           f"train.output_dir={out}", *overrides], check=False, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _weights(checkpoint: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = tmp_path / f"{checkpoint.parent.parent.name}.pt"
    dcp_to_torch_save(checkpoint, flat)
    return {k: v for k, v in torch.load(flat, weights_only=False).items()
            if torch.is_tensor(v) and not k.startswith("optimizer")}


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("init") / "short"
    # Another seed than the runs below: their own initialisation differs from these weights.
    run = _no_ray(out, "train.max_steps=2", "train.checkpoint_interval=2", "train.seed=7")
    assert run.returncode == 0, run.stdout + run.stderr
    return out


def test_a_longer_run_starts_from_the_weights_and_then_resumes_from_its_own(short_run, tmp_path):
    out = tmp_path / "long"
    # lr so small that one step leaves the weights where init_from put them
    long = ("train.seq_length=1024", "train.lr=1e-10", "train.min_lr=0", "train.weight_decay=0",
            "train.checkpoint_interval=1", f"train.init_from={short_run}")
    run = _no_ray(out, "train.max_steps=1", *long)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log
    source = short_run / "checkpoints" / "step_00000002"
    assert f"weights from {source} (train.init_from); step, optimizer and schedule start afresh" in log
    assert "steps 1 to 1" in log
    before, after = _weights(source, tmp_path), _weights(out / "checkpoints" / "step_00000001", tmp_path)
    assert before.keys() == after.keys() and len(before) > 20
    for key, weight in before.items():
        torch.testing.assert_close(after[key], weight, rtol=0, atol=1e-6, msg=key)
    # A fresh initialisation is nowhere near: the check above would catch weights left unloaded.
    fresh = _no_ray(tmp_path / "fresh", "train.max_steps=1", *long[:-1])
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    fresh_weights = _weights(tmp_path / "fresh" / "checkpoints" / "step_00000001", tmp_path)
    assert max((fresh_weights[k] - w).abs().max().item() for k, w in before.items()) > 1e-2

    rerun = _no_ray(out, "train.max_steps=2", *long)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"resuming from {out / 'checkpoints' / 'step_00000001'}" in rerun.stdout + rerun.stderr
    assert "train.init_from" not in rerun.stdout + rerun.stderr, "its own checkpoint wins once it has one"


@pytest.mark.parametrize("overrides, message", [
    (["model.hidden_size=128", "nsa.window_size=64"],
     "its weights are of another model:\n  model.hidden_size: 64 in the checkpoint, 128 now\n"
     "  nsa.window_size: 32 in the checkpoint, 64 now\n"),
    (["model.attention=full"], "model.attention: 'nsa' in the checkpoint, 'full' now"),
])
def test_another_model_fails_before_any_work(short_run, overrides, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["--config", TINY, "--no-ray", *ONE_WORKER, f"train.output_dir={out}",
                     f"train.init_from={short_run}", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"nsa-train: error: train.init_from ({short_run / 'checkpoints' / 'step_00000002'})")
    assert message in err, err
    assert not out.exists()


def test_a_directory_without_a_checkpoint_fails_before_any_work(tmp_path, capsys):
    out, empty = tmp_path / "run", tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["--config", TINY, "--no-ray", *ONE_WORKER, f"train.output_dir={out}",
                     f"train.init_from={empty}"]) == 2
    assert (f"train.init_from ({empty}) is neither a complete checkpoint (a step_N directory) nor a run directory "
            f"with one ({empty / 'checkpoints'}/latest)") in capsys.readouterr().err
    assert not out.exists()
