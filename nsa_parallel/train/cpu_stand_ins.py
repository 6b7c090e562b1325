"""CPU equivalents for what megatron-core sends to CUDA, so that its own code trains on CPUs under gloo.

Megatron's pipeline schedules count tokens in ``torch.zeros(..., device="cuda")``, its p2p
communication allocates receive buffers on ``torch.cuda.current_device()`` and calls
``torch.cuda.synchronize()``, and its activation checkpointing saves and restores the CUDA RNG.
Each of these has a CPU meaning (a CPU tensor, a no-op, no CUDA RNG to keep); nothing else changes.
(Checkpoints need none of this: ``checkpoint.py`` writes them with a host strategy under gloo.)
Torch function modes are not active in the backward pass, so a ``device="cuda"`` factory call made by
recomputation there is not redirected (none is, in the models nsa-train builds).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any
from unittest import mock

import torch
from megatron.core.tensor_parallel import random as megatron_random
from torch.overrides import TorchFunctionMode


class _CudaFactoriesOnCpu(TorchFunctionMode):
    """Tensors asked for on ``device="cuda"`` are made on the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None) -> Any:
        kwargs = kwargs or {}
        device = kwargs.get("device")
        if isinstance(device, str | torch.device) and torch.device(device).type == "cuda":
            kwargs = {**kwargs, "device": "cpu"}
        return func(*args, **kwargs)


@contextlib.contextmanager
def cpu_stand_ins() -> Iterator[None]:
    """Runs megatron-core's CUDA-bound calls on the CPU (see the module's docstring)."""
    with mock.patch.object(torch.cuda, "synchronize", lambda *args, **kwargs: None), \
            mock.patch.object(torch.cuda, "current_device", lambda: "cpu"), \
            mock.patch.object(megatron_random, "_get_cuda_rng_state", lambda *args, **kwargs: None), \
            mock.patch.object(megatron_random, "_set_cuda_rng_state", lambda *args, **kwargs: None), \
            _CudaFactoriesOnCpu():
        yield
