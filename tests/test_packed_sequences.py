"""Packed sequences: documents back to back in one row, each NSA on its own (NativeSparseAttention)."""
import copy

import pytest
import torch

from nsa_parallel import NativeSparseAttention, NSAConfig
from nsa_parallel.layer import document_bounds

from conftest import DEVICE, ON_GPU, assert_close

SMALL = NSAConfig(compress_block_size=16, compress_stride=8, select_block_size=16, num_selected_blocks=4, window_size=24)
# An empty document, one shorter than a compression block, one not a multiple of any block, a long one.
DOCS = [0, 37, 37, 42, 100, 157]


def layer(backend: str, dtype: torch.dtype) -> NativeSparseAttention:
    torch.manual_seed(0)
    return NativeSparseAttention(64, 4, 2, 32, config=SMALL, backend=backend, dtype=dtype)


@pytest.mark.parametrize("backend, dtype", [("reference", torch.float64), ("triton", torch.float32)]
                         + ([("triton", torch.bfloat16)] if ON_GPU else []))
def test_packed_row_equals_documents_run_alone(backend, dtype):
    """Packed (``backend``, ``dtype``, on the GPU when there is one) against each document run alone
    through the float64 reference: outputs, input and parameter gradients."""
    alone = layer("reference", torch.float64)
    packed = copy.deepcopy(alone).to(DEVICE, dtype)
    packed.backend = backend
    x = torch.randn(1, DOCS[-1], 64, dtype=torch.float64)
    x_packed, x_alone = x.clone().to(DEVICE, dtype).requires_grad_(), x.clone().requires_grad_()
    y_packed = packed(x_packed, cu_seqlens=torch.tensor(DOCS, device=DEVICE))
    y_alone = torch.cat([alone(x_alone[:, a:b]) for a, b in zip(DOCS, DOCS[1:]) if b > a], dim=1)
    assert_close(y_packed, y_alone, dtype, "output")
    up = torch.randn_like(y_alone)
    y_packed.backward(up.to(DEVICE, dtype))
    y_alone.backward(up)
    assert_close(x_packed.grad, x_alone.grad, dtype, "input grad")
    for (name, p), q in zip(packed.named_parameters(), alone.parameters()):
        assert_close(p.grad, q.grad, dtype, name)


def test_documents_do_not_see_each_other():
    m = layer("reference", torch.float64)
    x = torch.randn(1, DOCS[-1], 64, dtype=torch.float64)
    changed = x.clone()
    changed[:, : DOCS[4]] = torch.randn(1, DOCS[4], 64, dtype=torch.float64)  # every document but the last
    cu = torch.tensor(DOCS)
    assert torch.equal(m(x, cu_seqlens=cu)[:, DOCS[4]:], m(changed, cu_seqlens=cu)[:, DOCS[4]:])
    # Without boundaries the last tokens do see the earlier ones.
    assert not torch.equal(m(x)[:, DOCS[4]:], m(changed)[:, DOCS[4]:])


@pytest.mark.parametrize("cu, message", [
    (torch.tensor([1, 50, 157]), "start at 0 and end at the number of tokens"),
    (torch.tensor([0, 50, 156]), "start at 0 and end at the number of tokens"),
    (torch.tensor([0, 60, 50, 157]), "non-decreasing"),
    (torch.tensor([[0, 157]]), "1-D integer tensor"),
    (torch.tensor([0.0, 157.0]), "1-D integer tensor"),
    (torch.tensor([0]), "1-D integer tensor"),
])
def test_bad_boundaries_raise_before_any_work(cu, message):
    m = layer("reference", torch.float64)
    x = torch.randn(1, 157, 64, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match=message):
        m(x, cu_seqlens=cu)
    with pytest.raises(ValueError, match="batch must be 1"):
        m(torch.randn(2, 157, 64, dtype=torch.float64), cu_seqlens=torch.tensor([0, 157]))
    with pytest.raises(NotImplementedError, match="context parallelism"):
        m(x, cu_seqlens=torch.tensor([0, 157]), cp_group=object())


def test_document_bounds_skips_empty_documents():
    assert document_bounds(torch.tensor([0, 0, 5, 5, 9]), 9) == [(0, 5), (5, 9)]
