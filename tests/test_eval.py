"""nsa-eval on a tiny run that the test trains: every (length, depth) scored, PNGs written; bad runs
are errors naming the file, raised before any model is built."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")

from conftest import byte_corpus  # noqa: E402
from nsa_parallel.eval import cli  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
LENGTHS, DEPTHS = [128, 256, 512], [0.0, 0.5, 1.0]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def restore_pythonwarnings(monkeypatch):
    monkeypatch.setenv("PYTHONWARNINGS", "")  # the commands extend it; undone after each test


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A 2-step NSA run on the three tasks (CPU, one process)."""
    root = tmp_path_factory.mktemp("eval")
    byte_corpus(root / "code")
    run = subprocess.run(
        [sys.executable, "-m", "nsa_parallel.train", "--config", TINY, "--no-ray", "parallel.context_parallel_size=1",
         "launch.num_workers=1", f"data.path={root / 'code'}", "data.mix.lm=1", "data.mix.passkey=1",
         "data.mix.mqar=1", "model.vocab_size=320", "data.num_pairs=4", "train.seq_length=256",
         "train.max_steps=2", "train.checkpoint_interval=2", f"train.output_dir={root / 'nsa'}"],
        check=False, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout + run.stderr
    return root / "nsa"


def _eval(run: Path, out: Path, *extra: str) -> int:
    return cli.main(["--run", str(run), "--out", str(out), "--seq-lens", ",".join(map(str, LENGTHS)),
                     "--depths", ",".join(map(str, DEPTHS)), "--samples", "2", "--lm-samples", "2", *extra])


def test_every_length_and_depth_is_scored_and_plotted(trained, tmp_path):
    assert _eval(trained, tmp_path / "out") == 0
    result = json.loads((tmp_path / "out" / "eval.json").read_text())
    run = result["runs"]["nsa"]
    assert run["step"] == 2 and run["attention"] == "nsa" and run["trained_seq_length"] == 256
    assert run["parameters"] > 0 and run["evaluated"]["device"] == "cpu"
    assert 0 < run["heldout"]["bits_per_token"] < 16
    curves = run["training"]["curves"]
    assert [step for step, _ in curves["loss"]] == [1, 2] and run["training"]["tokens_per_s"] > 0
    assert set(curves) <= {"loss", "loss/lm", "loss/passkey", "loss/mqar"} and len(curves) > 1
    for task in ("passkey", "mqar"):
        grid = run[task]["accuracy"]
        assert list(grid) == [str(n) for n in LENGTHS]
        for row in grid.values():
            assert list(row) == [str(d) for d in DEPTHS]
            assert all(0.0 <= value <= 1.0 for value in row.values()), row
        for answers in run[task]["answer_tokens"].values():
            assert 0.0 <= answers["accuracy"] <= 1.0 and answers["nll"] > 0
    chosen = run["passkey"]["needle_chosen_by_layer"]  # NSA: per layer, did selection choose the needle
    assert list(chosen) == [str(n) for n in LENGTHS]
    for row in chosen.values():
        assert list(row) == [str(d) for d in DEPTHS]
        assert all(len(layers) == 2 and all(0.0 <= f <= 1.0 for f in layers) for layers in row.values()), row
    for name in ("passkey.png", "mqar.png", "loss_curves.png"):
        assert (tmp_path / "out" / name).read_bytes().startswith(PNG)
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| nsa | nsa |" in summary and "nsa, passkey: the needle among the answer rows' selected blocks" in summary

    # Evaluations made apart merge into one, evaluating nothing.
    other = json.loads((tmp_path / "out" / "eval.json").read_text())
    other["runs"] = {"again": other["runs"]["nsa"]}
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert cli.main(["--merge", str(tmp_path / "out" / "eval.json"), str(tmp_path / "other.json"),
                     "--out", str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged" / "eval.json").read_text())
    assert set(merged["runs"]) == {"nsa", "again"}
    assert (tmp_path / "merged" / "passkey.png").read_bytes().startswith(PNG)


def test_training_logs_each_tasks_loss(trained):
    from nsa_parallel.eval.run import run_config
    from nsa_parallel.train.data import task_mix

    checkpoint = trained / "checkpoints" / "step_00000002"
    config = run_config(checkpoint, [])
    mix, per_step = task_mix(config), config.train.global_batch_size
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        step_tasks = {mix.task_of(i) for i in range((row["step"] - 1) * per_step, row["step"] * per_step)}
        assert {key.removeprefix("loss/") for key in row if key.startswith("loss/")} == step_tasks
        assert all(0 < row[f"loss/{task}"] < 10 for task in step_tasks)


def _copy_run(trained: Path, tmp_path: Path) -> tuple[Path, Path]:
    run = tmp_path / "nsa"
    shutil.copytree(trained, run)
    checkpoint = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    return run, checkpoint


def _fails(capsys, run: Path, out: Path, *needles: str) -> None:
    assert _eval(run, out) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    assert not out.exists(), "nothing is written for a run that cannot be evaluated"


def test_missing_run_directory(tmp_path, capsys):
    _fails(capsys, tmp_path / "nope", tmp_path / "out", f"--run {tmp_path / 'nope'}: no such directory")


def test_lengths_too_short_for_the_tasks(trained, tmp_path, capsys):
    assert cli.main(["--run", str(trained), "--out", str(tmp_path / "out"), "--seq-lens", "64,256"]) == 2
    assert "--seq-lens: 64 is shorter than the" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_needle_chosen_counts_rows_and_groups_per_layer():
    from nsa_parallel.eval.selection import needle_chosen

    # blocks of 4 tokens; the needle covers tokens 9..14: blocks 2 and 3
    ids = torch.full((1, 6, 2, 3), -1, dtype=torch.int32)
    ids[0, 4:, 0] = torch.tensor([0, 3, 5])  # rows 4 and 5, group 0: block 3 chosen
    ids[0, 5, 1] = torch.tensor([1, 2, -1])  # row 5, group 1: block 2 chosen
    other_layer = torch.zeros_like(ids)  # only block 0
    assert needle_chosen([ids, other_layer], torch.tensor([4, 5]), range(9, 15), 4) == [0.75, 0.0]


def test_step_without_a_checkpoint(trained, tmp_path, capsys):
    assert cli.main(["--run", str(trained), "--out", str(tmp_path / "out"), "--step", "7"]) == 2
    assert "--step 7: " in (err := capsys.readouterr().err) and "no complete checkpoint step_00000007" in err
    assert "step_00000002" in err, "the error lists the steps there are"
    assert not (tmp_path / "out").exists()


def test_run_without_a_checkpoint(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _fails(capsys, tmp_path / "empty", tmp_path / "out", "no checkpoint", "latest does not exist")


def test_corrupt_checkpoint(trained, tmp_path, capsys):
    run, checkpoint = _copy_run(trained, tmp_path)
    shard = sorted(checkpoint.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    _fails(capsys, run, tmp_path / "out", f"checkpoint {checkpoint} is damaged", shard.name)
    (checkpoint / "checksums.json").unlink()  # as written before checksums: then loading fails
    _fails(capsys, run, tmp_path / "out", f"checkpoint {checkpoint} cannot be loaded")


def test_config_that_does_not_match_the_checkpoint(trained, tmp_path, capsys):
    run, checkpoint = _copy_run(trained, tmp_path)
    job = checkpoint / "job.yaml"
    job.write_text(job.read_text().replace("hidden_size: 64", "hidden_size: 96"))
    _fails(capsys, run, tmp_path / "out", f"checkpoint {checkpoint} is damaged", "job.yaml")  # its checksum
    (checkpoint / "checksums.json").unlink()  # as written before checksums: the shapes tell
    _fails(capsys, run, tmp_path / "out", f"checkpoint {checkpoint} does not match its config {job}",
           "embedding.word_embeddings.weight is (320, 64) in the checkpoint, (320, 96)")


def test_missing_config_and_missing_corpus(trained, tmp_path, capsys):
    run, checkpoint = _copy_run(trained, tmp_path)
    (checkpoint / "checksums.json").unlink()  # job.yaml is edited below
    job = checkpoint / "job.yaml"
    text = job.read_text()
    job.unlink()
    _fails(capsys, run, tmp_path / "out", f"{job} is missing")
    corpus = next(line.split(": ", 1)[1] for line in text.splitlines() if line.strip().startswith("path:"))
    job.write_text(text.replace(corpus, str(tmp_path / "moved")))
    _fails(capsys, run, tmp_path / "out", f"data.path ({tmp_path / 'moved'})", "pass --corpus PREFIX")
    assert _eval(run, tmp_path / "out", "--corpus", corpus, "--tasks", "lm") == 0
