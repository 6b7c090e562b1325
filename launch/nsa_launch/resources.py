"""Does a machine or a Ray cluster have the CPUs and GPUs a job's workers ask for?"""
from __future__ import annotations

import os

from nsa_parallel.job_config import JobConfig


def local_resources() -> dict[str, float]:
    """The CPUs this process may use and the GPUs it sees."""
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return {"CPU": float(cpus), "GPU": float(torch.cuda.device_count())}


def check_resources(config: JobConfig, available: dict[str, float], where: str) -> None:
    """Raises ``ValueError`` naming ``launch.num_workers`` when ``available`` is too small."""
    lc = config.launch
    for kind, per_worker in (("CPU", lc.cpus_per_worker), ("GPU", lc.gpus_per_worker)):
        need, have = lc.num_workers * per_worker, int(available.get(kind, 0))
        if need > have:
            raise ValueError(f"launch.num_workers ({lc.num_workers}) x launch.{kind.lower()}s_per_worker "
                             f"({per_worker}) = {need} {kind}s, but {where} has {have}")
