"""``nsa-train --config FILE [--no-ray] [key=value ...]``: trains NSA GPT from a job config.

The config, the resources and the data are checked before anything starts or is
written: an error names the config key and exits with status 2. Then the job runs on
Ray (an embedded local Ray, or the cluster at ``launch.address`` / ``RAY_ADDRESS``) or,
with ``--no-ray``, in this process (or one per ``torchrun`` rank). At the end it prints
where the checkpoints and TensorBoard logs are.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from ..job_config import JobConfig, load_job_config
from .errors import JobError
from .logs import configure_console
from .paths import RunPaths
from .preflight import check_job

log = logging.getLogger("nsa_parallel.train")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nsa-train",
                                description="Trains a Megatron GPT model with NSA attention from a job config.")
    p.add_argument("--config", required=True, help="job config (YAML), e.g. configs/tiny.yaml")
    p.add_argument("--no-ray", action="store_true",
                   help="train in this process (or in each torchrun process) instead of on Ray")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.max_steps=100")
    return p


def _check_resume(config: JobConfig) -> None:
    """The checkpoint this run resumes from, if any, must have been written with the same model and data."""
    from .resume_config import check_resume_config, resume_point

    # The workers verify checksums, and compare again should they fall back to an earlier checkpoint.
    checkpoint = resume_point(RunPaths(Path(config.train.output_dir)).checkpoints)
    if checkpoint is None:
        return
    changed = check_resume_config(config, checkpoint)
    if changed and int(os.environ.get("RANK", "0")) == 0:
        log.info("resuming from %s with these settings changed:\n  %s", checkpoint, "\n  ".join(changed))


def _prepare(config: JobConfig, no_ray: bool) -> Callable[[], None]:
    """Checks everything that can fail before training; returns the function that trains."""
    check_job(config)
    _check_resume(config)
    if no_ray:
        from .single_process import check_single_process, run_single_process
        check_single_process(config)
        return lambda: run_single_process(config)
    try:
        from nsa_launch import RayJob
    except ImportError as err:  # Ray, or the launcher package itself
        raise ValueError(f"the Ray launcher cannot be imported ({err}): install ray[default,train] and this "
                         "package with its launch/ directory, or pass --no-ray") from None
    return RayJob(config).run


def _report(paths: RunPaths) -> None:
    from .checkpoint_dirs import latest_name

    print(f"checkpoints:      {paths.checkpoints} (latest: {latest_name(paths.checkpoints) or 'none'})")
    print(f"TensorBoard logs: {paths.tensorboard}  (view: tensorboard --logdir {paths.tensorboard})")
    print(f"metrics:          {paths.metrics}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_console()
    try:
        config = load_job_config(args.config, args.overrides)
        # Workers may run elsewhere (another directory, another node): give them an absolute path.
        config.train.output_dir = str(Path(config.train.output_dir).resolve())
        run = _prepare(config, args.no_ray)
    except ValueError as err:
        print(f"nsa-train: error: {err}", file=sys.stderr)
        return 2
    status = 0
    try:
        run()
    except JobError as err:  # the same command would fail alike: no traceback, no "resumes"
        print(f"nsa-train: error: {err}", file=sys.stderr)
        status = 2
    except Exception as err:  # on Ray, the worker's traceback is in the log already
        log.error("training failed: %s", err, exc_info=args.no_ray)
        status = 1
    paths = RunPaths(Path(config.train.output_dir))
    if int(os.environ.get("RANK", "0")) == 0 and paths.checkpoints.is_dir():
        _report(paths)
    if status == 1:
        print("nsa-train: training failed; the same command resumes from the latest checkpoint", file=sys.stderr)
    return status
