"""Shared test set-up: Triton runs under its interpreter when there is no GPU."""
import os
import tempfile

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


@pytest.fixture(scope="module")
def gloo_world_of_one():
    """A gloo process group of this process alone (what Megatron's CPU code paths need), unless one exists."""
    import torch.distributed as dist

    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
    yield
    if owned:
        dist.destroy_process_group()


def dense_attention(q, k, v, visible, scale):
    """Attention from the textbook formula over a dense mask broadcastable to ``[B, H, T, S]``; rows with
    nothing visible give 0. The oracle the reference itself is checked against."""
    h = q.shape[2]
    k, v = k.repeat_interleave(h // k.shape[2], dim=2), v.repeat_interleave(h // v.shape[2], dim=2)
    s = torch.einsum("bthd,bshd->bhts", q, k) * scale
    s = s.masked_fill(~visible, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.einsum("bhts,bshd->bthd", p, v)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` computed in float64."""
    out, ref = out.detach().cpu().double(), ref.detach().cpu().double()
    assert torch.isfinite(out).all(), "non-finite values"
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    err = rel_err(out, ref)
    assert err <= TOLERANCE[dtype], f"{what}: relative error {err:.3e} > {TOLERANCE[dtype]:.0e} ({dtype})"


def near_tie_rows(q: torch.Tensor, k_cmp: torch.Tensor, config, scale: float, rel_gap: float = 1e-4):
    """Float64 reference selection and a mask of rows whose n-th and (n+1)-th best scores are
    within ``rel_gap``: floating-point rounding may legitimately order those either way."""
    from nsa_parallel import reference

    scores = reference.selection_scores(q.double().cpu(), k_cmp.double().cpu(), config, scale)
    ref = reference.top_blocks(scores, config)
    n = config.num_selected_blocks
    if scores.shape[-1] <= n:
        return ref, torch.zeros(ref.shape[:3], dtype=torch.bool)
    ranked = reference.selection_keys(scores, config).sort(dim=-1, descending=True).values
    last_in, first_out = ranked[..., n - 1], ranked[..., n]
    both_scores = torch.isfinite(last_in) & torch.isfinite(first_out)
    near = (last_in - first_out).abs() <= rel_gap * last_in.abs().clamp(min=1e-30)
    return ref, both_scores & near


def assert_same_selection(idx: torch.Tensor, q: torch.Tensor, k_cmp: torch.Tensor, config, scale: float,
                          max_near_tie_fraction: float = 0.02) -> None:
    """``idx`` equals the float64 reference selection on every row but near-ties, which must be rare."""
    ref, near = near_tie_rows(q, k_cmp, config, scale)
    assert near.float().mean().item() <= max_near_tie_fraction, f"{int(near.sum())} near-tie rows"
    differs = (idx.cpu() != ref).any(-1) & ~near
    assert not differs.any(), f"{int(differs.sum())} rows select other blocks than the reference"


def check_forward_backward(fn, ref_fn, inputs, dtype: torch.dtype, what: str = "") -> None:
    """Runs ``fn`` on ``inputs`` cast to ``dtype`` and ``ref_fn`` on them in float64; compares the
    output and the gradient of every floating input under one random upstream gradient."""
    low = [t.to(DEVICE, dtype).requires_grad_() if t.is_floating_point() else t.to(DEVICE) for t in inputs]
    high = [t.detach().cpu().double().requires_grad_() if t.is_floating_point() else t.cpu() for t in low]
    out = fn(*low)
    ref = ref_fn(*high)
    assert_close(out, ref, dtype, f"{what} output")
    upstream = torch.randn(ref.shape, dtype=torch.float64)
    out.backward(upstream.to(out.device, out.dtype))
    ref.backward(upstream)
    for i, (a, b) in enumerate(zip(low, high)):
        if a.is_floating_point():
            assert_close(a.grad, b.grad, dtype, f"{what} grad of input {i}")


def byte_corpus(prefix, documents: int = 200) -> list[bytes]:
    """Documents of distinct text (document ``i`` repeats its own lines), written as a byte-level
    Megatron indexed dataset at ``prefix`` (.bin/.idx), like benchmarks/make_code_corpus.py's."""
    import numpy
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    texts = [(f"def f{i}(x):\n    return x + {i}\n" * (5 + i % 7)).encode() for i in range(documents)]
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=numpy.uint8)
    for text in texts:
        builder.add_document(numpy.frombuffer(text, dtype=numpy.uint8), [len(text)])
    builder.finalize(f"{prefix}.idx")
    return texts
