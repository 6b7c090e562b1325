"""Packed sequences: documents back to back in one row, each NSA on its own (NativeSparseAttention)."""
import copy

import pytest
import torch

from nsa_parallel import NativeSparseAttention, NSAConfig
from nsa_parallel.core import document_bounds

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


def test_document_bounds_skips_empty_documents():
    assert document_bounds(torch.tensor([0, 0, 5, 5, 9]), 9) == [(0, 5), (5, 9)]


# --- packed documents under context parallelism (Megatron's THD layout: each document split alone) ---

CP_DOCS = [0, 64, 64, 192, 256]  # document lengths split into 2P chunks of whole selection blocks


def _shard_positions(layout: str, world: int, rank: int) -> torch.Tensor:
    """This rank's tokens: its ``layout`` share of every document, documents back to back."""
    from nsa_parallel.context_parallel import ShardLayout

    return torch.cat([a + ShardLayout(layout, world, b - a).local_positions(rank)
                      for a, b in zip(CP_DOCS, CP_DOCS[1:]) if b > a])


def _run_packed_cp(rank: int, world: int, init_file: str, layout: str, ref: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = layer("reference", torch.float64)
        pos = _shard_positions(layout, world, rank)
        x = ref["x"][:, pos].clone().requires_grad_()
        out = model(x, cu_seqlens=torch.tensor(CP_DOCS), cp_group=dist.group.WORLD, cp_layout=layout)
        out.backward(ref["up"][:, pos])
        torch.testing.assert_close(out, ref["out"][:, pos], rtol=0, atol=1e-9)
        torch.testing.assert_close(x.grad, ref["grad_x"][:, pos], rtol=0, atol=1e-9)
        for name, p in model.named_parameters():
            grad = p.grad.clone()
            dist.all_reduce(grad)
            torch.testing.assert_close(grad, ref["grads"][name], rtol=1e-9, atol=1e-9, msg=name)
        with pytest.raises(ValueError, match=r"document 1 \(tokens 64 to 136\) under context parallelism"):
            model(x, cu_seqlens=torch.tensor([0, 64, 136, 256]), cp_group=dist.group.WORLD, cp_layout=layout)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_packed_documents_under_context_parallelism_equal_one_rank(layout):
    import os
    import tempfile

    import torch.multiprocessing as mp

    model = layer("reference", torch.float64)
    x = torch.randn(1, CP_DOCS[-1], 64, dtype=torch.float64, requires_grad=True)
    up = torch.randn_like(x)
    out = model(x, cu_seqlens=torch.tensor(CP_DOCS))
    out.backward(up)
    ref = {"x": x.detach(), "up": up, "out": out.detach(), "grad_x": x.grad,
           "grads": {n: p.grad for n, p in model.named_parameters()}}
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_run_packed_cp, args=(2, os.path.join(tmp, "init"), layout, ref), nprocs=2)
