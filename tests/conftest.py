"""Shared test set-up: Triton runs under its interpreter when there is no GPU."""
import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")

# Norm-wise relative error allowed against the float64 reference, by input dtype.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}

# The Triton interpreter computes tl.dot on bfloat16 operands wrongly on CPU, so
# bf16 is a GPU-only case.
KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])

gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device; run on the device machine")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` computed in float64."""
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), "non-finite values"
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    err = rel_err(out, ref)
    assert err <= TOLERANCE[dtype], f"{what}: relative error {err:.3e} > {TOLERANCE[dtype]:.0e} ({dtype})"
