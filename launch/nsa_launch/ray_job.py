"""Runs ``nsa-train``'s workers with Ray Train on an embedded local Ray or an existing cluster.

With neither ``launch.address`` nor ``RAY_ADDRESS`` (which KubeRay sets for a RayJob's
entrypoint) it starts a local Ray sized to this machine; otherwise it joins the cluster.
``TorchTrainer`` starts ``launch.num_workers`` workers (one per GPU with NCCL, or gloo on
CPUs), sets up ``torch.distributed`` and runs the trainer in each. Workers are packed
node by node, so consecutive ranks (Megatron's TP and CP groups) share a node and a job
of whole nodes spreads over as many nodes. When a worker dies, the whole group is
started again (up to ``launch.max_failures`` times) and the trainer resumes from the
latest checkpoint under ``train.output_dir``, the one source of truth for progress. A
``JobError`` in any worker (bad config, data or checkpoint; divergence) would fail alike
every time, so it is not retried: it ends the run with its own message.

An embedded Ray keeps its session (logs, sockets, object spill) under ``$RAY_TMPDIR/ray``
(else ``$TMPDIR`` or ``/tmp``) and never deletes it, and Ray Train adds lock files there:
every run would leave another set behind, and so do the multiprocessing helpers of Ray's
agents and of the workers, which Ray ends without clean-up. So while an embedded Ray runs,
``RAY_TMPDIR`` and ``TMPDIR`` point at a fresh ``nsa-ray-*`` directory in that place, deleted
when Ray has shut down. (Not under ``train.output_dir``: Ray's socket paths must stay under
108 bytes.)
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import ray

from nsa_parallel.job_config import JobConfig
from nsa_parallel.train.errors import JobError
from nsa_parallel.train.paths import RunPaths

from .resources import check_resources, local_resources

if TYPE_CHECKING:
    from ray.train.torch import TorchTrainer

log = logging.getLogger(__name__)

_TMP_VARS = ("RAY_TMPDIR", "TMPDIR")  # where Ray, then everything else, puts temporary files


def _forwarded_env() -> dict[str, str]:
    """The driver's settings that the workers need wherever they run: nsa-train's own
    ``NSA_TRAIN_*`` variables and the warning filters."""
    return {k: v for k, v in os.environ.items() if k.startswith("NSA_TRAIN_") or k == "PYTHONWARNINGS"}


def _train_worker(loop_config: dict) -> None:
    """Ray Train's per-worker function: torch.distributed is up; train on this worker's device."""
    import ray.train.torch

    from nsa_parallel.train.logs import quiet_libraries
    from nsa_parallel.train.trainer import train

    quiet_libraries()  # Ray Train relays the root logger's records to the driver
    train(loop_config["config"], ray.train.torch.get_device())


def job_error(failure: Exception) -> JobError | None:
    """The deterministic failure among the workers' errors of a failed ``fit()``, if any.

    Ray Train wraps each worker's exception, keeping the original in ``_base_exc`` (Ray
    2.4x-2.6x); without it every failure counts as a worker death and is retried.
    """
    for error in getattr(failure, "worker_failures", {}).values():
        cause = getattr(error, "_base_exc", error)
        if isinstance(cause, JobError):
            return cause
    return None


class RayJob:
    """Starts or joins Ray on construction and checks its resources; :meth:`run` trains.

    Construction raises ``ValueError`` naming ``launch.num_workers`` when the machine or
    cluster is too small, before any worker starts or anything is written.
    """

    def __init__(self, config: JobConfig):
        self.config = config
        self.address = config.launch.address or os.environ.get("RAY_ADDRESS")
        self.ray_tmpdir: str | None = None  # an embedded Ray's temporary files, removed by _shutdown
        self.saved_env: dict[str, str | None] = {}  # what _shutdown restores
        if self.address is None:
            available = local_resources()
            check_resources(config, available, "this machine")  # before starting Ray at all
            log.info("starting a local Ray with %d CPUs and %d GPUs", available["CPU"], available["GPU"])
            system_tmp = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"  # Ray's own order
            self.ray_tmpdir = tempfile.mkdtemp(prefix="nsa-ray-", dir=system_tmp)
            # Ray's processes and the workers inherit these (Ray's agents and Megatron's checkpoint
            # writer start multiprocessing helpers, whose pymp-* directories stay when Ray ends them).
            self.saved_env = {name: os.environ.get(name) for name in _TMP_VARS}
            os.environ.update(dict.fromkeys(_TMP_VARS, self.ray_tmpdir))
            try:
                # "local": a new instance even when `ray start` left one running on this machine.
                ray.init(address="local", num_cpus=int(available["CPU"]), num_gpus=int(available["GPU"]),
                         runtime_env={"env_vars": _forwarded_env()})
            except BaseException:
                self._shutdown()
                raise
        else:
            log.info("joining the Ray cluster at %s", self.address)
            ray.init(address=self.address, runtime_env={"env_vars": _forwarded_env()})
            try:
                check_resources(config, ray.cluster_resources(), f"the Ray cluster at {self.address}")
            except ValueError:
                ray.shutdown()
                raise

    def _trainer(self) -> TorchTrainer:
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        lc = self.config.launch
        paths = RunPaths(Path(self.config.train.output_dir))
        on_gpu = lc.gpus_per_worker > 0
        resources = {"CPU": lc.cpus_per_worker, **({"GPU": lc.gpus_per_worker} if on_gpu else {})}
        return TorchTrainer(
            _train_worker,
            train_loop_config={"config": self.config},
            scaling_config=ScalingConfig(num_workers=lc.num_workers, use_gpu=on_gpu, resources_per_worker=resources,
                                         placement_strategy="PACK"),
            torch_config=TorchConfig(backend="nccl" if on_gpu else "gloo"),
            # Ray Train's own run records; checkpoints are the trainer's (paths.checkpoints). Restarts
            # are run()'s: Ray Train's would retry deterministic failures as well.
            run_config=RunConfig(name=paths.output_dir.name, storage_path=str(paths.ray),
                                 failure_config=FailureConfig(max_failures=0)))

    def run(self) -> None:
        """Trains; raises the workers' ``JobError`` at once, other failures after ``launch.max_failures`` restarts."""
        from ray.train import TrainingFailedError

        RunPaths(Path(self.config.train.output_dir)).output_dir.mkdir(parents=True, exist_ok=True)
        restarts = self.config.launch.max_failures
        try:
            for attempt in range(restarts + 1):
                try:
                    self._trainer().fit()
                    return
                except TrainingFailedError as failure:
                    cause = job_error(failure)
                    if cause is not None:
                        raise cause from None
                    if attempt == restarts:
                        raise
                    log.warning("the workers failed; restart %d of launch.max_failures (%d): they resume from the "
                                "latest checkpoint", attempt + 1, restarts)
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        """Stops an embedded Ray and deletes its temporary files; leaves a joined cluster running."""
        if self.ray_tmpdir is None:
            return
        ray.shutdown()
        for name, value in self.saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(self.ray_tmpdir, ignore_errors=True)
        self.ray_tmpdir = None
