"""train.loss_normalization=sample: the mean of each sample's own mean, the same however the global batch
is cut into micro-batches, context-parallel shares and pipeline stages (CPU, gloo)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

from conftest import byte_corpus  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def _losses(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _train(out: Path, corpus: Path, *overrides: str, cp: int = 1, pp: int = 1) -> list[dict]:
    mix = [f"data.path={corpus}", "data.mix.lm=1", "data.mix.passkey=1", "model.vocab_size=320",
           "train.max_steps=2", "train.checkpoint_interval=2", f"train.output_dir={out}", *overrides]
    module = ["-m", "nsa_parallel.train", "--config", TINY, "--no-ray", *mix]
    layout = [f"parallel.context_parallel_size={cp}", f"parallel.pipeline_model_parallel_size={pp}",
              f"launch.num_workers={cp * pp}"]
    if cp * pp == 1:
        cmd = [sys.executable, *module, *layout]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cp * pp}", *module,
               *layout]
    run = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": ""})
    assert run.returncode == 0, run.stdout + run.stderr
    return _losses(out)


def test_sample_normalization_is_the_same_however_the_batch_is_cut(tmp_path):
    byte_corpus(tmp_path / "code")
    sample = ["train.loss_normalization=sample"]
    whole = _train(tmp_path / "mbs4", tmp_path / "code", *sample, "train.micro_batch_size=4")
    for name, rows in {
        "micro-batches of one": _train(tmp_path / "mbs1", tmp_path / "code", *sample),
        "context parallelism 2": _train(tmp_path / "cp2", tmp_path / "code", *sample, cp=2),
        "pipeline parallelism 2": _train(tmp_path / "pp2", tmp_path / "code", *sample, pp=2),
    }.items():
        for a, b in zip(whole, rows):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), name
            for task in ("loss/lm", "loss/passkey"):
                assert (task in a) == (task in b) and a.get(task, 0) == pytest.approx(b.get(task, 0), rel=1e-5)
    # Step 1 (the same initial model): a language-modelling sample has 512 loss tokens and a passkey
    # 5, and each task's samples all have as many, so each task's per-token loss is its samples' mean.
    from nsa_parallel.job_config import load_job_config
    from nsa_parallel.train.data import task_mix

    token = _train(tmp_path / "token", tmp_path / "code", "train.micro_batch_size=4")
    config = load_job_config(TINY, [f"data.path={tmp_path / 'code'}", "data.mix.lm=1", "data.mix.passkey=1",
                                    "model.vocab_size=320"])
    tasks = [task_mix(config).task_of(i) for i in range(config.train.global_batch_size)]
    first = whole[0]
    losses, tokens = {"lm": first.get("loss/lm"), "passkey": first.get("loss/passkey")}, {"lm": 512, "passkey": 5}
    assert first["loss"] == pytest.approx(sum(losses[t] for t in tasks) / len(tasks), rel=1e-5)
    assert token[0]["loss"] == pytest.approx(sum(tokens[t] * losses[t] for t in tasks)
                                             / sum(tokens[t] for t in tasks), rel=1e-5)


def test_sample_normalization_refuses_packed_documents():
    from nsa_parallel.job_config import load_job_config

    with pytest.raises(ValueError, match="train.loss_normalization=sample and data.eod_token cannot be combined"):
        load_job_config(TINY, ["train.loss_normalization=sample", "data.path=/p", "data.eod_token=3",
                               "parallel.context_parallel_size=1", "launch.num_workers=1"])
    with pytest.raises(ValueError, match=r"train.loss_normalization \('mean'\) must be one of"):
        load_job_config(TINY, ["train.loss_normalization=mean"])
