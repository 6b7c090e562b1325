"""nsa-train end to end on Ray with configs/tiny.yaml (2 CPU workers, gloo, context parallelism 2).

The first run starts an embedded local Ray, as the README's command does, and has one worker
killed mid-run: nsa-train restarts the group and training resumes from the last checkpoint.
Then a job on a Ray cluster that this module starts (launch.address) fails while writing a
checkpoint, and a second run resumes from the last complete one. Every resumed step must
reproduce the first run's loss bit for bit. A deterministic failure (divergence) is not
retried; SIGTERM ends a run with the checkpoint a rerun resumes from; an embedded Ray leaves
no temporary files behind. Slow: each run starts Ray workers that import torch and Megatron.
"""
import getpass
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("megatron.core")

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
# A short run: checkpoints at steps 2, 4 and 6.
SHORT = ["train.max_steps=6", "train.checkpoint_interval=2", "train.keep_checkpoints=3"]


def _nsa_train() -> list[str]:
    script = Path(sys.executable).parent / "nsa-train"
    assert script.exists(), f"{script} is missing: install the package (pip install -e .) for the nsa-train command"
    return [str(script)]


def _run(out: Path, *overrides: str, crash: str | None = None, tmpdir: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR", "NSA_TRAIN_CRASH")}
    if crash:
        env["NSA_TRAIN_CRASH"] = crash
    if tmpdir:
        env["TMPDIR"] = str(tmpdir)
    return subprocess.run([*_nsa_train(), "--config", TINY, *SHORT, f"train.output_dir={out}", *overrides],
                          check=False, capture_output=True, text=True, timeout=420, env=env, cwd=out.parent)


def _losses(out: Path) -> list[tuple[int, float]]:
    """(step, loss) of every line of metrics.jsonl, repeats after a restart included."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(row["step"], row["loss"]) for row in rows]


def _latest(out: Path) -> str:
    return (out / "checkpoints" / "latest").read_text().strip()


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, Path]:
    """The README's command (no address: an embedded Ray), with rank 1 killed once after step 5, and
    a system temp directory of its own (short: Ray's socket paths must stay under 108 bytes)."""
    out = tmp_path_factory.mktemp("first") / "run"
    system_tmp = Path(tempfile.mkdtemp(prefix="nsa-test-", dir="/tmp"))
    yield out, _run(out, crash="1:5:step", tmpdir=system_tmp), system_tmp
    shutil.rmtree(system_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_cluster():
    """A 2-CPU Ray cluster for the other runs to join (launch.address)."""
    context = ray.init(address="local", num_cpus=2)
    yield context.address_info["gcs_address"]
    ray.shutdown()


def test_tiny_trains_on_embedded_ray_and_survives_a_killed_worker(first_run):
    out, run, _ = first_run
    log = run.stdout + run.stderr
    assert run.returncode == 0, log
    assert "starting a local Ray" in log
    assert "NSA_TRAIN_CRASH: rank 1 exits at step 5" in log
    # Ray Train restarted both workers; they resumed from the last checkpoint before the kill.
    assert f"resuming from {out / 'checkpoints' / 'step_00000004'} (step 4)" in log
    losses = _losses(out)
    assert [step for step, _ in losses] == [1, 2, 3, 4, 5, 5, 6]  # step 5 before the kill, then again
    assert losses[4][1] == losses[5][1]  # bit for bit
    values = [loss for _, loss in losses]
    assert all(math.isfinite(v) for v in values) and values[-1] < values[0] - 0.1, values
    kept = sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith(".crashed"))  # the hook's
    assert kept == ["latest", "step_00000002", "step_00000004", "step_00000006"]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert f"checkpoints:      {out / 'checkpoints'} (latest: step_00000006)" in run.stdout
    assert f"TensorBoard logs: {out / 'tensorboard'}" in run.stdout


def test_embedded_ray_leaves_nothing_in_the_system_temp_directory(first_run):
    """Ray's session (logs, sockets) and lock files, and the workers' own temporary files, lived in one
    nsa-ray-* directory, deleted at the end (a cache of torch's may stay)."""
    out, run, system_tmp = first_run
    assert run.returncode == 0, run.stdout + run.stderr
    assert [p.name for p in system_tmp.iterdir() if p.name != f"torchinductor_{getpass.getuser()}"] == []


def test_deterministic_failure_in_the_workers_is_not_retried(tmp_path):
    """Divergence (a JobError in every worker) ends the run at once with its own message, although
    launch.max_failures would allow 3 restarts."""
    out = tmp_path / "run"
    run = _run(out, "train.lr=1e6", "train.clip_grad=0", "train.checkpoint_interval=1", "launch.max_failures=3")
    assert run.returncode == 2, run.stdout + run.stderr
    good = out / "checkpoints" / "step_00000001"
    assert run.stderr.splitlines()[-1].startswith(
        f"nsa-train: error: step 2: the loss is nan and the gradient norm nan; training stopped without saving, and "
        f"the last good checkpoint is {good}")
    assert "restart 1 of launch.max_failures" not in run.stderr and "the same command resumes" not in run.stderr
    assert [step for step, _ in _losses(out)] == [1, 2]  # a restart would have run step 2 again
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_00000001"]


def test_sigterm_names_the_checkpoint_and_leaves_no_temporary_files(tmp_path):
    out = tmp_path / "run"
    system_tmp = Path(tempfile.mkdtemp(prefix="nsa-test-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR", "NSA_TRAIN_CRASH")}
    proc = subprocess.Popen([*_nsa_train(), "--config", TINY, "train.max_steps=1000", "train.checkpoint_interval=2",
                             f"train.output_dir={out}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**env, "TMPDIR": str(system_tmp)}, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoints" / "latest").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
        leftovers = [p.name for p in system_tmp.iterdir() if p.name != f"torchinductor_{getpass.getuser()}"]
        shutil.rmtree(system_tmp, ignore_errors=True)
    assert proc.returncode == 143, stdout + stderr
    latest = out / "checkpoints" / _latest(out)
    assert stderr.splitlines()[-1] == f"nsa-train: interrupted by SIGTERM; the same command resumes from {latest}"
    assert leftovers == []


def test_second_run_resumes_bit_for_bit_and_never_uses_an_interrupted_checkpoint(first_run, ray_cluster, tmp_path):
    reference = dict(_losses(first_run[0]))  # steps 1-4 uninterrupted there
    out = tmp_path / "run"
    # Rank 1 dies after writing its shards of the step-4 checkpoint, before the checkpoint is complete;
    # no restarts, so the job fails.
    failed = _run(out, f"launch.address={ray_cluster}", "launch.max_failures=0", crash="1:4:checkpoint")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "training failed" in failed.stderr
    assert _latest(out) == "step_00000002" and (out / "checkpoints" / ".tmp-step_00000004").is_dir()

    second = _run(out, f"launch.address={ray_cluster}")
    log = second.stdout + second.stderr
    assert second.returncode == 0, log
    assert "joining the Ray cluster" in log
    assert "removing interrupted checkpoint" in log and ".tmp-step_00000004" in log
    assert f"resuming from {out / 'checkpoints' / 'step_00000002'} (step 2)" in log
    losses = _losses(out)
    assert [step for step, _ in losses] == [1, 2, 3, 4, 3, 4, 5, 6]
    assert all(reference[step] == loss for step, loss in losses)  # before and after resuming, bit for bit
    assert _latest(out) == "step_00000006"
    assert not list((out / "checkpoints").glob(".tmp-*"))
