"""The segment-wise compression ``phi`` (BlockCompressor) against the block-by-block reference, float64."""
import pytest
import torch

from nsa_parallel import NSAConfig, reference
from nsa_parallel.compression import BlockCompressor


@pytest.mark.parametrize("l,d,seq_len,groups,dim,hidden", [
    (32, 16, 300, 2, 64, None),   # T not a multiple of l or d
    (32, 16, 31, 1, 64, None),    # T < l: no block
    (32, 16, 32, 3, 32, 48),      # exactly one block, hidden != dim
    (16, 16, 100, 2, 16, 8),      # l = d: blocks do not overlap
    (64, 16, 257, 1, 16, None),   # l/d = 4 overlapping segments
    (24, 8, 77, 4, 8, 16),        # l/d = 3
])
def test_matches_reference_forward_and_gradients(l, d, seq_len, groups, dim, hidden):
    cfg = NSAConfig(compress_block_size=l, compress_stride=d, select_block_size=4 * l, window_size=64)
    torch.manual_seed(seq_len)
    phi = BlockCompressor(groups, dim, cfg, hidden_size=hidden, dtype=torch.float64)
    with torch.no_grad():  # non-zero biases and positions so every term is checked
        for p in (phi.position, phi.b1, phi.b2):
            p.normal_()
    x = torch.randn(2, seq_len, groups, dim, dtype=torch.float64, requires_grad=True)
    params = [x, phi.position, phi.w1, phi.b1, phi.w2, phi.b2]
    out = phi(x)
    ref = reference.compress_tokens(x, phi.position, phi.w1, phi.b1, phi.w2, phi.b2, cfg)
    assert out.shape == ref.shape == (2, cfg.num_compressed(seq_len), groups, dim)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, params, grad, materialize_grads=True)
    want = torch.autograd.grad(ref, params, grad, materialize_grads=True)
    for name, a, b in zip(("x", "position", "w1", "b1", "w2", "b2"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def test_autocast_output_takes_the_matmul_dtype():
    """Under autocast the layer's queries come out of bf16 matmuls; the compressed keys must match them."""
    phi = BlockCompressor(2, 32, NSAConfig())
    x = torch.randn(1, 100, 2, 32, dtype=torch.bfloat16)
    with torch.autocast("cpu", torch.bfloat16):
        assert phi(x).dtype == torch.bfloat16
