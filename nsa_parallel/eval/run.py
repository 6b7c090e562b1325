"""A trained run for evaluation: its latest checkpoint, its config (the checkpoint's ``job.yaml``), its model.

Everything that can be wrong with a run directory is a :class:`RunError` naming the file:
no directory, no checkpoint, a ``latest`` naming an incomplete one, a missing ``job.yaml``,
a config whose model does not match the checkpoint's tensors, a checkpoint that cannot be read.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from megatron.core.models.gpt import GPTModel
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

from ..job_config import JobConfig, load_job_config
from ..train.checkpoint import checkpoint_tensor_shapes, load_checkpoint, verify_checkpoint
from ..train.checkpoint_dirs import checkpoint_name, latest_name
from ..train.model import build_model
from ..train.optimizer import DIST_CKPT_METADATA
from ..train.paths import RunPaths
from .errors import RunError

JOB_YAML = "job.yaml"


def find_checkpoint(run: Path, step: int | None = None) -> Path:
    """The checkpoint of ``step``, or the one ``run``'s ``latest`` names, with its ``job.yaml``."""
    if not run.is_dir():
        raise RunError(f"--run {run}: no such directory (a train.output_dir that nsa-train wrote)")
    root = RunPaths(run).checkpoints
    if step is not None:
        path = root / checkpoint_name(step)
        if not (path / "metadata.json").is_file():
            kept = sorted(p.name for p in root.glob("step_*") if (p / "metadata.json").is_file()) if root.is_dir() else []
            raise RunError(f"--step {step}: {run} has no complete checkpoint {path.name} (it has {kept or 'none'})")
        return _with_config(path)
    name = latest_name(root) if root.is_dir() else None
    if name is None:
        raise RunError(f"--run {run}: no checkpoint ({root}/latest does not exist)")
    path = root / name
    if not (path / "metadata.json").is_file():
        raise RunError(f"{root}/latest names {path}, which is not a complete checkpoint")
    return _with_config(path)


def _with_config(path: Path) -> Path:
    if not (path / JOB_YAML).is_file():
        raise RunError(f"{path / JOB_YAML} is missing: the run's config is not known")
    return path


def run_config(checkpoint: Path, overrides: list[str]) -> JobConfig:
    try:
        return load_job_config(checkpoint / JOB_YAML, overrides)
    except ValueError as err:
        raise RunError(f"{checkpoint / JOB_YAML}: {err}") from None


def eval_config(config: JobConfig, device: torch.device, max_seq_length: int) -> JobConfig:
    """The trained config as one process builds it here: no parallelism, fp32 off the GPU."""
    on_gpu = device.type == "cuda"
    return dataclasses.replace(
        config,
        parallel=dataclasses.replace(config.parallel, tensor_model_parallel_size=1, context_parallel_size=1,
                                     pipeline_model_parallel_size=1),
        train=dataclasses.replace(config.train, seq_length=max(max_seq_length, config.train.seq_length),
                                  precision=config.train.precision if on_gpu else "fp32"),
        launch=dataclasses.replace(config.launch, num_workers=1, gpus_per_worker=int(on_gpu)))


def _check_shapes(checkpoint: Path, model: GPTModel) -> None:
    """Every tensor the model expects is in the checkpoint with the same global shape."""
    try:
        saved = checkpoint_tensor_shapes(checkpoint)
    except (Exception, CheckpointException) as err:  # a damaged metadata file: torch, pickle or OS errors
        raise RunError(f"checkpoint {checkpoint} cannot be read: {err}") from None
    for tensor in model.sharded_state_dict(metadata=DIST_CKPT_METADATA).values():
        key, shape = getattr(tensor, "key", ""), getattr(tensor, "global_shape", None)
        if shape is None or key.endswith("_extra_state"):  # plain objects carry no shape
            continue
        if key not in saved:
            raise RunError(f"checkpoint {checkpoint} has no tensor {key}: {checkpoint / JOB_YAML} describes "
                           "another model (model.attention?)")
        if tuple(saved[key]) != tuple(shape):
            raise RunError(f"checkpoint {checkpoint} does not match its config {checkpoint / JOB_YAML}: {key} is "
                           f"{tuple(saved[key])} in the checkpoint, {tuple(shape)} for the config's model "
                           "(model.* or nsa.compress_block_size differ)")


def prepare_run(run: Path, overrides: list[str] = (), corpus: str | None = None,
                step: int | None = None) -> tuple[Path, JobConfig]:
    """The run's checkpoint (``step``'s, else the latest) and its config, checked without building anything."""
    checkpoint = find_checkpoint(run, step)
    config = run_config(checkpoint, [*overrides, *([f"data.path={corpus}"] if corpus else [])])
    path = config.data.path
    if path is None:
        raise RunError(f"{checkpoint / JOB_YAML}: the run has no data.path, and the quality tasks need a byte "
                       "corpus: pass --corpus PREFIX (benchmarks/make_code_corpus.py makes one)")
    for suffix in (".bin", ".idx"):
        if not Path(path + suffix).is_file():
            raise RunError(f"data.path ({path}) of {checkpoint / JOB_YAML}: {path}{suffix} does not exist "
                           "(pass --corpus PREFIX where the corpus is now)")
    return checkpoint, config


def load_model(checkpoint: Path, config: JobConfig, device: torch.device, max_seq_length: int) -> GPTModel:
    """Builds the run's model on ``device`` (Megatron's parallel state set up for a world of one)
    and loads the checkpoint's weights into it."""
    problem = verify_checkpoint(checkpoint)  # against the checksums nsa-train wrote beside it
    if problem:
        raise RunError(f"checkpoint {checkpoint} is damaged: {problem}")
    model = build_model(eval_config(config, device, max_seq_length), device)
    _check_shapes(checkpoint, model)
    try:
        loaded = load_checkpoint(checkpoint, {"model": model.sharded_state_dict(metadata=DIST_CKPT_METADATA)})
        model.load_state_dict(loaded["model"])
    except (Exception, CheckpointException) as err:  # torch, pickle or OS errors from a damaged checkpoint
        raise RunError(f"checkpoint {checkpoint} cannot be loaded: {type(err).__name__}: {err}") from None
    return model.eval()
