"""The nsa-train command: bad configs and resources fail before any work, naming the key; --no-ray trains
on Megatron's GPTDataset."""
import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nsa_parallel.job_config import load_job_config
from nsa_parallel.train import cli

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


@pytest.fixture(autouse=True)
def restore_pythonwarnings(monkeypatch):
    monkeypatch.setenv("PYTHONWARNINGS", "")  # nsa-train extends it; undone after each test


@pytest.mark.parametrize("overrides, message", [
    (["train.max_stepz=3"], "max_stepz"),
    (["nsa.select_block_size=48"], "nsa.select_block_size"),
    (["train.seq_length=96"], "train.seq_length (96) must be divisible by 2 x parallel.context_parallel_size"),
    (["parallel.pipeline_model_parallel_size=2", "model.num_layers=3", "parallel.context_parallel_size=1"],
     "model.num_layers (3) must be divisible by parallel.pipeline_model_parallel_size (2)"),
    (["parallel.pipeline_model_parallel_size=2"],
     "launch.num_workers (2) must be a multiple of parallel.tensor_model_parallel_size x "
     "parallel.context_parallel_size x parallel.pipeline_model_parallel_size (1 x 2 x 2 = 4)"),
    (["data.path=/nonexistent/corpus"], "data.path (/nonexistent/corpus): /nonexistent/corpus.bin does not exist"),
])
def test_bad_job_fails_before_any_work_naming_the_key(overrides, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["--config", TINY, f"train.output_dir={out}", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nsa-train: error: ") and message in err, err
    assert not out.exists()


@pytest.mark.parametrize("overrides, message", [
    (["train.lr=-1"], "train.lr (-1.0) must be positive and finite"),
    (["train.lr=0"], "train.lr (0.0) must be positive and finite"),
    (["train.lr=nan"], "train.lr (nan) must be positive and finite"),
    (["train.lr=inf"], "train.lr (inf) must be positive and finite"),
    (["train.min_lr=0.01"], "train.min_lr (0.01) must be in [0, train.lr (0.003)]"),
    (["train.min_lr=-1e-5"], "train.min_lr (-1e-05) must be in [0, train.lr (0.003)]"),
    (["train.warmup_steps=-1"], "train.warmup_steps (-1) must be >= 0"),
    (["train.weight_decay=-0.1"], "train.weight_decay (-0.1) must be finite and >= 0"),
    (["train.weight_decay=inf"], "train.weight_decay (inf) must be finite and >= 0"),
    (["train.clip_grad=nan"], "train.clip_grad (nan) must be finite and >= 0"),
    (["model.rotary_base=0"], "model.rotary_base (0.0) must be positive and finite"),
    (["model.rotary_base=-inf"], "model.rotary_base (-inf) must be positive and finite"),
    (["train.seed=-1"], "train.seed (-1) must be in [0, 2**32)"),
    (["train.lr=[1"], "invalid override"),
    ("syntax", "YAML syntax error at line 4, column 2: found a tab character"),
])
def test_bad_numbers_and_yaml_syntax_are_config_errors(overrides, message, tmp_path, capsys):
    config, out = TINY, tmp_path / "run"
    if overrides == "syntax":  # a tab where YAML wants spaces: line 4, column 2
        config = tmp_path / "broken.yaml"
        config.write_text(f"base: {TINY}\ntrain:\n  lr: 1.0e-3\n \tmin_lr: 1.0e-4\n")
        message, overrides = f"config file {config}: {message}", []
    assert cli.main(["--config", str(config), f"train.output_dir={out}", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nsa-train: error: ") and message in err, err
    assert "Traceback" not in err and not out.exists()


@pytest.mark.parametrize("overrides, message", [
    (["launch.cpus_per_worker=100000"],
     "launch.num_workers (2) x launch.cpus_per_worker (100000) = 200000 CPUs, but this machine has"),
    (["launch.num_workers=1024", "train.global_batch_size=512", "launch.gpus_per_worker=1", "train.precision=bf16"],
     "launch.num_workers (1024)"),
])
def test_more_workers_than_resources_fail_before_ray_starts(overrides, message, tmp_path, capsys):
    ray = pytest.importorskip("ray", reason="the resource check is the Ray launcher's")
    out = tmp_path / "run"
    assert cli.main(["--config", TINY, f"train.output_dir={out}", *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nsa-train: error: ") and message in err, err
    assert not out.exists() and not ray.is_initialized()


def test_no_ray_needs_as_many_processes_as_workers(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["--config", TINY, "--no-ray", f"train.output_dir={out}"]) == 2
    assert "launch.num_workers (2) must equal the number of processes (1) with --no-ray" in capsys.readouterr().err
    assert not out.exists()


ONE_WORKER = ["parallel.context_parallel_size=1", "launch.num_workers=1"]


def _no_ray(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``nsa-train --no-ray`` on configs/tiny.yaml in one process (CP=1)."""
    return subprocess.run([sys.executable, "-m", "nsa_parallel.train", "--config", TINY, "--no-ray", *ONE_WORKER,
                           f"train.output_dir={out}", *overrides], check=False, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _on_disk(out: Path) -> dict[str, str]:
    """The checkpoints directory: each entry, with what ``latest`` names."""
    root = out / "checkpoints"
    return {p.name: p.read_text().strip() if p.name == "latest" else "" for p in sorted(root.iterdir())}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny run of 2 steps on one process, checkpointed at steps 1 and 2."""
    out = tmp_path_factory.mktemp("trained") / "run"
    run = _no_ray(out, "train.max_steps=2", "train.checkpoint_interval=1")
    assert run.returncode == 0, run.stdout + run.stderr
    return out


@pytest.mark.parametrize("overrides, differences", [
    (["model.vocab_size=128"], ["model.vocab_size: 64 in the checkpoint, 128 now"]),
    (["nsa.select_block_size=32", "nsa.num_selected_blocks=3", "nsa.window_size=64"],
     ["nsa.num_selected_blocks: 4 in the checkpoint, 3 now", "nsa.select_block_size: 16 in the checkpoint, 32 now",
      "nsa.window_size: 32 in the checkpoint, 64 now"]),
    (["model.hidden_size=128", "nsa.compress_block_size=8"],
     ["model.hidden_size: 64 in the checkpoint, 128 now", "nsa.compress_block_size: 16 in the checkpoint, 8 now"]),
    (["train.seq_length=1024", "data.num_pairs=20", "train.max_steps=8"],
     ["data.num_pairs: 24 in the checkpoint, 20 now", "train.seq_length: 512 in the checkpoint, 1024 now"]),
])
def test_resume_with_changed_model_or_data_fails_before_any_work(trained, overrides, differences, tmp_path, capsys):
    ray = pytest.importorskip("ray")
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    before = _on_disk(out)
    assert cli.main(["--config", TINY, f"train.output_dir={out}", *ONE_WORKER, *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"nsa-train: error: train.output_dir ({out}) resumes from {out / 'checkpoints' / 'step_00000002'}")
    assert "\n  " + "\n  ".join(differences) + "\n" in err, err  # every differing key, and only those
    assert _on_disk(out) == before and not ray.is_initialized()


def test_resume_lists_the_settings_that_may_change(trained, caplog):
    config = load_job_config(TINY, [f"train.output_dir={trained}", *ONE_WORKER, "train.max_steps=80", "train.lr=1e-3",
                                    "train.log_interval=1", "parallel.tensor_model_parallel_size=2",
                                    "parallel.pipeline_model_parallel_size=2", "launch.num_workers=4"])
    with caplog.at_level(logging.INFO, logger="nsa_parallel.train"):
        cli._check_resume(config)
    assert (f"resuming from {trained / 'checkpoints' / 'step_00000002'} with these settings changed:\n"
            "  launch.num_workers: 1 in the checkpoint, 4 now\n"
            "  parallel.pipeline_model_parallel_size: 1 in the checkpoint, 2 now\n"
            "  parallel.tensor_model_parallel_size: 1 in the checkpoint, 2 now\n"
            "  train.checkpoint_interval: 1 in the checkpoint, 20 now\n"
            "  train.log_interval: 5 in the checkpoint, 1 now\n"
            "  train.lr: 0.003 in the checkpoint, 0.001 now\n"
            "  train.max_steps: 2 in the checkpoint, 80 now") in caplog.text


@pytest.mark.parametrize("damage", ["overwrite 8 KiB", "truncate"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(trained, damage, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    latest, previous = out / "checkpoints" / "step_00000002", out / "checkpoints" / "step_00000001"
    data = max(latest.glob("*.distcp"), key=lambda p: p.stat().st_size)  # tensor data
    size = data.stat().st_size
    if damage == "truncate":
        os.truncate(data, size // 2)
        problem = f"{data.name} has {size // 2} bytes, {size} when written"
    else:
        with open(data, "r+b") as f:
            f.seek(size // 2)
            f.write(bytes(range(256)) * 32)
        problem = f"{data.name} fails its sha256 checksum"
    run = _no_ray(out, "train.max_steps=3", "train.checkpoint_interval=1")
    log = run.stdout + run.stderr
    assert run.returncode == 0, log
    assert f"checkpoint {latest} is damaged: {problem}; falling back to the previous checkpoint" in log
    assert f"resuming from {previous} (step 1)" in log
    # step 2 trained again, bit for bit, and saved in place of the damaged one; step 1 pruned only then
    losses = [(row["step"], row["loss"]) for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]
    assert [step for step, _ in losses] == [1, 2, 2, 3] and losses[1] == losses[2]
    assert _on_disk(out) == {"latest": "step_00000003", "step_00000002": "", "step_00000003": ""}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_names_the_checkpoint_a_rerun_resumes_from(signum, tmp_path):
    pytest.importorskip("megatron.core")
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "nsa_parallel.train", "--config", TINY, "--no-ray", *ONE_WORKER,
                             "train.max_steps=1000", "train.checkpoint_interval=2", f"train.output_dir={out}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoints" / "latest").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, stdout + stderr
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    assert stderr.splitlines()[-1] == f"nsa-train: interrupted by {signum.name}; the same command resumes from {latest}"
    assert "Traceback" not in stderr


def _tensors(checkpoint: Path, tmp_path: Path) -> dict:
    """A Megatron (torch_dist) checkpoint's tensors, read without a process group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(checkpoint, tmp_path / "flat.pt")
    return {k: v for k, v in torch.load(tmp_path / "flat.pt", weights_only=False).items() if torch.is_tensor(v)}


def test_non_finite_loss_stops_training_and_keeps_the_good_checkpoints(tmp_path):
    pytest.importorskip("megatron.core")
    out = tmp_path / "run"
    run = _no_ray(out, "train.lr=1e6", "train.clip_grad=0", "train.max_steps=6", "train.checkpoint_interval=1",
                  "train.keep_checkpoints=1")
    assert run.returncode == 2, run.stdout + run.stderr
    good = out / "checkpoints" / "step_00000001"
    assert (f"nsa-train: error: step 2: the loss is nan and the gradient norm nan; training stopped without saving, "
            f"and the last good checkpoint is {good} (a rerun resumes from it)") in run.stderr
    assert "Traceback" not in run.stderr and "the same command resumes" not in run.stderr
    assert _on_disk(out) == {"latest": "step_00000001", "step_00000001": ""}  # step 1 neither replaced nor pruned
    tensors = _tensors(good, tmp_path)
    assert len(tensors) > 50 and all(torch.isfinite(t).all() for t in tensors.values())


def _indexed_dataset(prefix: Path, vocab: int, eod: int | None = None) -> None:
    import numpy
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=numpy.int32)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        doc = torch.randint(0, vocab - 1, (int(torch.randint(50, 400, (1,), generator=g)),), generator=g)
        if eod is not None:
            doc = torch.cat([doc, torch.tensor([eod])])
        builder.add_document(doc, [len(doc)])
    builder.finalize(f"{prefix}.idx")


def _code_corpus(prefix: Path) -> None:
    """benchmarks/make_code_corpus.py --eod over a few files: byte tokens and EOD 256 (uint16)."""
    spec = importlib.util.spec_from_file_location("make_code_corpus", ROOT / "benchmarks" / "make_code_corpus.py")
    mcc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mcc)
    mcc.write_corpus(mcc.source_files(ROOT / "nsa_parallel" / "train"), prefix, max_bytes=2**20, eod=True)


@pytest.mark.parametrize("corpus, vocab_size, largest", [("code", 256, 256), ("int32", 48, 62)])
def test_token_ids_beyond_the_vocabulary_fail_before_any_work(corpus, vocab_size, largest, tmp_path, capsys):
    pytest.importorskip("megatron.core")
    ray = pytest.importorskip("ray")
    prefix, out = tmp_path / "corpus", tmp_path / "run"
    _code_corpus(prefix) if corpus == "code" else _indexed_dataset(prefix, vocab=64)
    assert cli.main(["--config", TINY, f"train.output_dir={out}", f"data.path={prefix}",
                     f"model.vocab_size={vocab_size}", "train.max_steps=2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"nsa-train: error: data.path ({prefix}) holds token id {largest} (the largest found), "
                          f"but model.vocab_size is {vocab_size}"), err
    assert not out.exists() and not ray.is_initialized()


@pytest.mark.parametrize("eod", [None, 63], ids=["across-documents", "packed-documents"])
def test_no_ray_trains_on_megatron_gpt_dataset(tmp_path, eod):
    pytest.importorskip("megatron.core")
    prefix, out = tmp_path / "corpus", tmp_path / "run"
    _indexed_dataset(prefix, vocab=64, eod=eod)
    documents = [] if eod is None else [f"data.eod_token={eod}", "train.micro_batch_size=2"]
    run = subprocess.run(
        [sys.executable, "-m", "nsa_parallel.train", "--config", TINY, "--no-ray", f"data.path={prefix}",
         "parallel.context_parallel_size=1", "launch.num_workers=1", "train.max_steps=2",
         "train.checkpoint_interval=2", f"train.output_dir={out}", *documents],
        check=False, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout + run.stderr
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(3.0 < loss < 6.0 for loss in losses), losses  # ~log(64) at the start
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert (out / "data_cache").is_dir()  # GPTDataset's index cache
    assert f"checkpoints:      {out / 'checkpoints'} (latest: step_00000002)" in run.stdout


def test_packed_documents_train_alike_at_cp1_cp2_and_pp2(tmp_path):
    """data.eod_token under context parallelism: every document padded to whole zigzag chunks and
    split on its own; the losses equal one rank's (to float32 summation order). Under pipeline
    parallelism the stages exchange each micro-batch's shape first (its length varies)."""
    pytest.importorskip("megatron.core")
    prefix = tmp_path / "corpus"
    _indexed_dataset(prefix, vocab=64, eod=63)
    common = ["--config", TINY, "--no-ray", f"data.path={prefix}", "data.eod_token=63", "train.max_steps=2",
              "train.checkpoint_interval=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {
        "cp1": [sys.executable, "-m", "nsa_parallel.train", *common, "parallel.context_parallel_size=1",
                "launch.num_workers=1", f"train.output_dir={tmp_path / 'cp1'}"],
        "cp2": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "nsa_parallel.train", *common, f"train.output_dir={tmp_path / 'cp2'}"],
        "pp2": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "-m", "nsa_parallel.train", *common, "parallel.context_parallel_size=1",
                "parallel.pipeline_model_parallel_size=2", f"train.output_dir={tmp_path / 'pp2'}"],
    }
    losses = {}
    for name, cmd in runs.items():
        run = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600, env=env)
        assert run.returncode == 0, run.stdout + run.stderr
        metrics = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        losses[name] = [json.loads(line)["loss"] for line in metrics]
    assert len(losses["cp1"]) == 2
    assert losses["cp2"] == pytest.approx(losses["cp1"], rel=1e-5)
    assert losses["pp2"] == pytest.approx(losses["cp1"], rel=1e-5)
