"""``nsa-train --no-ray``: this process is the only worker, or one of ``torchrun``'s.

``torchrun`` sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` and the rendezvous address;
without them this process trains alone. Needs neither Ray nor a cluster (e.g. a bare
GPU image with megatron-core on the path).
"""
from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

import torch
import torch.distributed as dist

from ..job_config import JobConfig
from .trainer import train


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_single_process(config: JobConfig) -> None:
    """Raises ``ValueError`` naming the key when the processes or GPUs do not match the config."""
    workers, world = config.launch.num_workers, _world_size()
    if workers != world:
        raise ValueError(f"launch.num_workers ({workers}) must equal the number of processes ({world}) with "
                         f"--no-ray: set launch.num_workers={world}, or start {workers} processes with torchrun")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if config.launch.gpus_per_worker and torch.cuda.device_count() < local_world:
        raise ValueError(f"launch.gpus_per_worker (1) needs {local_world} GPU(s) here, but "
                         f"{torch.cuda.device_count()} are visible")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """``torch.distributed`` for this process: torchrun's world when it started us, else a world of one."""
    if "WORLD_SIZE" in os.environ:
        init = {"init_method": "env://"}
    else:
        init = {"init_method": f"tcp://127.0.0.1:{_free_port()}", "rank": 0, "world_size": 1}
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **init)
    try:
        yield
    finally:
        dist.destroy_process_group()


def run_single_process(config: JobConfig) -> None:
    on_gpu = config.launch.gpus_per_worker > 0
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if on_gpu else torch.device("cpu")
    with process_group(device):
        train(config, device)
