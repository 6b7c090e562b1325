"""``nsa-train --config FILE [--no-ray] [key=value ...]``: trains NSA GPT from a job config.

The config, the resources and the data are checked before anything starts or is
written: an error names the config key and exits with status 2. Then the job runs on
Ray (an embedded local Ray, or the cluster at ``launch.address`` / ``RAY_ADDRESS``) or,
with ``--no-ray``, in this process (or one per ``torchrun`` rank). At the end it prints
where the checkpoints and TensorBoard logs are. Exit status: 0 done; 1 a failure the same
command may get past (it resumes from the latest checkpoint); 2 a ``JobError``, found up
front or by the workers (config, data, checkpoint, divergence), which it would repeat;
130/143 interrupted by SIGINT/SIGTERM, with one line naming the checkpoint a rerun resumes from.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
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
        if config.train.init_from:
            from .init_from import check_init_from
            log.info("starting from the weights of %s", check_init_from(config))
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


_signals: list[int] = []  # received by _terminate; Ray re-raises its KeyboardInterrupt as a new one


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM: noted, then raised like SIGINT's ``KeyboardInterrupt`` so that the same clean-up runs."""
    _signals.append(signum)
    raise KeyboardInterrupt


def _train(run: Callable[[], None], no_ray: bool) -> int:
    """Runs ``run``; returns the exit status."""
    try:
        run()
    except KeyboardInterrupt:
        return 128 + (_signals[-1] if _signals else signal.SIGINT)
    except JobError as err:  # the same command would fail alike: no traceback, no "resumes"
        print(f"nsa-train: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # on Ray, the worker's traceback is in the log already
        log.error("training failed: %s", err, exc_info=no_ray)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_console()
    try:
        config = load_job_config(args.config, args.overrides)
        # Workers and nsa-eval may run elsewhere (another directory, another node): give them absolute paths.
        config.train.output_dir = str(Path(config.train.output_dir).resolve())
        if config.data.path is not None:
            config.data.path = str(Path(config.data.path).resolve())
        if config.train.init_from:
            config.train.init_from = str(Path(config.train.init_from).resolve())
        run = _prepare(config, args.no_ray)
    except ValueError as err:
        print(f"nsa-train: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nsa-train: interrupted before training started", file=sys.stderr)
        return 128 + signal.SIGINT
    previous = signal.signal(signal.SIGTERM, _terminate)  # after _prepare: ray.init sets its own
    try:
        status = _train(run, args.no_ray)
    finally:
        signal.signal(signal.SIGTERM, previous)
    paths = RunPaths(Path(config.train.output_dir))
    if int(os.environ.get("RANK", "0")) != 0:
        return status
    if paths.checkpoints.is_dir():
        _report(paths)
    if status == 1:
        print("nsa-train: training failed; the same command resumes from the latest checkpoint", file=sys.stderr)
    elif status > 128:
        from .resume_config import resume_point

        point = resume_point(paths.checkpoints) if paths.checkpoints.is_dir() else None
        rerun = f"the same command resumes from {point}" if point else "no checkpoint yet: the same command starts afresh"
        print(f"nsa-train: interrupted by {signal.Signals(status - 128).name}; {rerun}", file=sys.stderr)
    return status
