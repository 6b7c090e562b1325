"""NativeSparseAttention: the whole layer, both backends, and its guards."""
import copy

import pytest
import torch

from nsa_parallel import NativeSparseAttention, NSAConfig
from nsa_parallel.rotary import apply_rotary, rotary_angles

from conftest import DEVICE, assert_close, gpu

SMALL = NSAConfig(compress_block_size=16, compress_stride=8, select_block_size=16, num_selected_blocks=4, window_size=24)


def layer(**kw):
    args = dict(hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=64, v_head_dim=32, config=SMALL)
    args.update(kw)
    return NativeSparseAttention(**args)


@pytest.mark.parametrize("seq", [1, 10, 70])
@pytest.mark.parametrize("shared_kv", [False, True])
def test_shapes_and_finite_gradients(seq, shared_kv):
    m = layer(shared_kv=shared_kv, backend="reference")
    x = torch.randn(2, seq, 64, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_branches_have_independent_kv_by_default():
    assert layer().kv_proj.out_features == 3 * 2 * (64 + 32)
    assert layer(shared_kv=True).kv_proj.out_features == 2 * (64 + 32)


def test_triton_backend_matches_float64_reference():
    torch.manual_seed(0)
    ref = layer(backend="reference").double()
    fast = copy.deepcopy(ref).float().to(DEVICE)
    fast.backend = "triton"
    x = torch.randn(2, 83, 64, dtype=torch.float64)
    xf = x.float().to(DEVICE).requires_grad_()
    x64 = x.clone().requires_grad_()
    y, y64 = fast(xf), ref(x64)
    assert_close(y, y64, torch.float32, "output")
    up = torch.randn_like(y64)
    y.backward(up.float().to(DEVICE))
    y64.backward(up)
    assert_close(xf.grad, x64.grad, torch.float32, "input grad")
    for (name, p), p64 in zip(fast.named_parameters(), ref.parameters()):
        assert_close(p.grad, p64.grad, torch.float32, name)


def test_rotary_depends_on_relative_position_only():
    x, y = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)

    def score(i, j):
        ci, si = rotary_angles(torch.tensor([i]), 16)
        cj, sj = rotary_angles(torch.tensor([j]), 16)
        return (apply_rotary(x, ci, si) * apply_rotary(y, cj, sj)).sum()

    assert torch.allclose(score(7, 3), score(107, 103))
    assert not torch.allclose(score(7, 3), score(7, 4))


def test_context_parallel_arguments():
    m = layer()
    x = torch.randn(1, 8, 64)
    with pytest.raises(ValueError, match=r"cp_layout \('ring'\) must be one of"):
        m(x, cp_layout="ring")


@pytest.mark.parametrize("kwargs, message", [
    ({"num_heads": 6, "num_kv_heads": 4}, "num_heads (6) must be a multiple of num_kv_heads (4)"),
    ({"head_dim": 63}, "head_dim (63) must be even"),
    ({"num_kv_heads": 0}, "num_kv_heads (0) must be positive"),
    ({"backend": "cuda"}, "backend ('cuda') must be one of"),
])
def test_bad_layer_arguments(kwargs, message):
    with pytest.raises(ValueError) as err:
        layer(**kwargs)
    assert message in str(err.value)


@pytest.mark.parametrize("backend, dtype", [("reference", torch.float64), ("triton", torch.float32),
                                            ("triton", torch.float16)])  # float16: the TMA path on sm_90
def test_no_tokens_give_an_empty_output_in_both_backends(backend, dtype):
    m = layer(backend=backend).to(DEVICE, dtype)
    x = torch.randn(2, 0, 64, device=DEVICE, dtype=dtype, requires_grad=True)
    y = m(x)
    assert y.shape == (2, 0, 64) and y.dtype == dtype
    y.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter runs on the CPU only")
def test_bfloat16_under_the_interpreter_is_refused_before_any_work():
    m = layer(backend="triton").to(torch.bfloat16)
    calls = []
    m.q_proj.register_forward_pre_hook(lambda *a: calls.append(a))  # no projection, let alone a kernel
    with pytest.raises(ValueError, match=r"backend 'triton' on the CPU \(Triton's interpreter\) cannot take "
                                         r"bfloat16: the interpreter's tl.dot on bfloat16 is wrong"):
        m(torch.randn(1, 40, 64, dtype=torch.bfloat16))
    assert not calls


@pytest.mark.parametrize("backend", [
    "reference",
    pytest.param("triton", marks=pytest.mark.xfail(strict=True, reason="issue 21: the kernels still multiply a "
                                                   "masked probability by a later non-finite value")),
])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_token_never_reaches_earlier_outputs(backend, bad):
    dtype = torch.float64 if backend == "reference" else torch.float32
    m = layer(backend=backend).to(DEVICE, dtype)
    x = torch.randn(1, 90, 64, device=DEVICE, dtype=dtype)
    clean = m(x)
    for t in (0, 37, 89):  # the first token, one inside a selection block, the last
        y = x.clone()
        y[0, t, 5] = bad
        out = m(y)
        assert torch.equal(out[:, :t], clean[:, :t]), t
        assert not torch.isfinite(out[0, t]).all(), "the bad token's own row shows it"


@gpu
def test_layer_on_gpu_at_paper_settings():
    """float32 on the GPU against float64 at the paper's block sizes (T spans 31 selection blocks),
    then a bf16 forward/backward that must stay finite. bf16 accuracy is checked op by op
    (tests/test_kernel_*.py), where both sides see the same rounded inputs: here bf16
    projections would move near-tied block scores and legitimately change the selection."""
    torch.manual_seed(0)
    ref = NativeSparseAttention(512, 16, 2, 128, config=NSAConfig(), backend="reference").double()
    fast = copy.deepcopy(ref).to("cuda", torch.float32)
    fast.backend = "triton"
    x = torch.randn(1, 2000, 512, dtype=torch.float64)
    assert_close(fast(x.to("cuda", torch.float32)), ref(x), torch.float32, "float32 layer output")
    fast = fast.to(torch.bfloat16)
    xb = x.to("cuda", torch.bfloat16).requires_grad_()
    fast(xb).float().square().mean().backward()
    assert torch.isfinite(xb.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in fast.parameters())
