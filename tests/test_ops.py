"""Public ops, both backends, forward and gradients against the float64 reference."""
import pytest
import torch

from nsa_parallel import KV, BranchKV, Compressors, NSAConfig, nsa_core, ops, reference

from conftest import DEVICE, assert_same_selection, check_forward_backward

SMALL = NSAConfig(compress_block_size=16, compress_stride=8, select_block_size=16, num_selected_blocks=4, window_size=24)

# name: (batch, seq, heads, kv_heads, dk, dv, config)
CASES = {
    "one_token": (1, 1, 2, 1, 64, 64, SMALL),
    "shorter_than_l_b2_dv128": (2, 13, 4, 2, 64, 128, SMALL),
    "group16_ragged": (1, 45, 16, 1, 64, 64, SMALL),
    "group1_dk192": (1, 150, 4, 4, 192, 128, SMALL),
    "group2_b2": (2, 77, 8, 4, 128, 64, SMALL),
    "paper_blocks_window_gt_seq": (1, 100, 8, 2, 64, 64, NSAConfig(num_selected_blocks=3)),
}
BACKENDS = ["reference", "triton"]
DTYPE = torch.float32


def make(case):
    b, t, h, g, dk, dv, cfg = CASES[case]
    tc = cfg.num_compressed(t)
    return dict(
        q=torch.randn(b, t, h, dk), k_cmp=torch.randn(b, tc, g, dk), v_cmp=torch.randn(b, tc, g, dv),
        k=torch.randn(b, t, g, dk), v=torch.randn(b, t, g, dv), gates=torch.rand(b, t, h, 3), cfg=cfg,
        scale=dk ** -0.5,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_compressed_attention(case, backend):
    x = make(case)
    check_forward_backward(
        lambda q, k, v: ops.compressed_attention(q, k, v, x["cfg"], backend=backend),
        lambda q, k, v: reference.compressed_attention(q, k, v, x["cfg"], x["scale"]),
        [x["q"], x["k_cmp"], x["v_cmp"]], DTYPE, case)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_window_attention(case, backend):
    x = make(case)
    w = x["cfg"].window_size
    check_forward_backward(
        lambda q, k, v: ops.window_attention(q, k, v, w, backend=backend),
        lambda q, k, v: reference.window_attention(q, k, v, w, x["scale"]),
        [x["q"], x["k"], x["v"]], DTYPE, case)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_select_blocks(case, backend):
    x = make(case)
    q, k_cmp = x["q"].to(DEVICE), x["k_cmp"].to(DEVICE)
    idx = ops.select_blocks(q, k_cmp, x["cfg"], backend=backend)
    assert idx.shape == (*q.shape[:2], k_cmp.shape[2], x["cfg"].num_selected_blocks)
    assert_same_selection(idx, q, k_cmp, x["cfg"], x["scale"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_selection_attention(case, backend):
    x = make(case)
    idx = reference.select_blocks(x["q"].double(), x["k_cmp"].double(), x["cfg"], x["scale"])
    check_forward_backward(
        lambda q, k, v, i: ops.selection_attention(q, k, v, i, x["cfg"], backend=backend),
        lambda q, k, v, i: reference.selection_attention(q, k, v, i, x["cfg"], x["scale"]),
        [x["q"], x["k"], x["v"], idx], DTYPE, case)


def mean_phi(cfg):
    """A compression ``phi`` simple enough to write again by hand: the mean of each block."""
    return lambda x: reference.unfold_blocks(x, cfg.compress_block_size, cfg.compress_stride).mean(3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_nsa_core(case, backend):
    """All three gated branches; the float64 side uses the blocks the backend selected
    (selection itself is compared, near-ties aside, in test_select_blocks)."""
    x = make(case)
    cfg, scale, phi = x["cfg"], x["scale"], mean_phi(x["cfg"])
    idx = ops.select_blocks(x["q"].to(DEVICE), phi(x["k"]).to(DEVICE), cfg, backend=backend).cpu()

    def ref(q, k, v, g):
        g = torch.sigmoid(g)
        return (g[..., 0:1] * reference.compressed_attention(q, phi(k), phi(v), cfg, scale)
                + g[..., 1:2] * reference.selection_attention(q, k, v, idx, cfg, scale)
                + g[..., 2:3] * reference.window_attention(q, k, v, cfg.window_size, scale))

    check_forward_backward(
        lambda q, k, v, g: nsa_core(q, BranchKV(*(KV(k, v),) * 3), g, Compressors(phi, phi), cfg, backend=backend),
        ref, [x["q"], x["k"], x["v"], x["gates"]], DTYPE, case)


def test_auto_backend_is_reference_on_cpu_tensors():
    assert ops.resolve_backend("auto", torch.zeros(1)) == "reference"


BAD = NSAConfig()


@pytest.mark.parametrize("call, message", [
    (lambda: ops.window_attention(torch.zeros(1, 8, 4), torch.zeros(1, 8, 1, 4), torch.zeros(1, 8, 1, 4), 4),
     "q must be 4-D"),
    (lambda: ops.window_attention(torch.zeros(1, 8, 6, 4), torch.zeros(1, 8, 4, 4), torch.zeros(1, 8, 4, 4), 4),
     "query heads (6) must be a multiple of KV heads (4)"),
    (lambda: ops.window_attention(torch.zeros(1, 8, 4, 4), torch.zeros(1, 8, 1, 8), torch.zeros(1, 8, 1, 4), 4),
     "k head dim (8) must equal q head dim (4)"),
    (lambda: ops.window_attention(torch.zeros(1, 8, 4, 4), torch.zeros(1, 8, 1, 4).half(), torch.zeros(1, 8, 1, 4), 4),
     "k dtype (torch.float16) must equal q dtype (torch.float32)"),
    (lambda: ops.window_attention(torch.zeros(1, 8, 4, 4), torch.zeros(1, 9, 1, 4), torch.zeros(1, 9, 1, 4), 4),
     "k length (9) must equal q length (8)"),
    (lambda: ops.window_attention(torch.zeros(1, 8, 4, 4), torch.zeros(1, 8, 1, 4), torch.zeros(1, 8, 1, 4), 0),
     "window_size (0) must be a positive integer"),
    (lambda: ops.window_attention(torch.zeros(1, 8, 4, 4), torch.zeros(1, 8, 1, 4), torch.zeros(1, 8, 1, 4), 4,
                                  backend="cuda"), "backend ('cuda') must be one of"),
    (lambda: ops.compressed_attention(torch.zeros(1, 64, 4, 4), torch.zeros(1, 4, 1, 4), torch.zeros(1, 4, 1, 4), BAD),
     "k_cmp has 4 compressed tokens; a sequence of 64 tokens with compress_block_size 32 and compress_stride 16 has 3"),
    (lambda: ops.selection_attention(torch.zeros(1, 8, 4, 4), torch.zeros(1, 8, 1, 4), torch.zeros(1, 8, 1, 4),
                                     torch.zeros(1, 8, 2, 16, dtype=torch.int32), BAD),
     "block_indices must be [B, T, G, n] = [1, 8, 1, n]"),
    (lambda: ops.combine_branches(*(torch.zeros(1, 8, 4, 4),) * 3, torch.zeros(1, 8, 4, 2)),
     "gates must be [B, T, H, 3]"),
])
def test_bad_input_is_named(call, message):
    with pytest.raises(ValueError) as err:
        call()
    assert message in str(err.value)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("change, message", [
    (lambda idx: idx.float(), "block_indices must be int32 or int64, got torch.float32"),
    (lambda idx: idx.to(torch.int16), "block_indices must be int32 or int64, got torch.int16"),
    (lambda idx: idx.index_fill(-1, torch.tensor([0]), 5), r"block ids 0 \.\. 4 of the 5 blocks"),
    (lambda idx: idx.index_fill(-1, torch.tensor([0]), -2), r"got values from -2"),
    (lambda idx: idx.index_fill(-1, torch.tensor([0, 1]), 2), "must not name a block twice"),
])
def test_selection_attention_refuses_bad_block_indices_alike(backend, change, message):
    """Both backends refuse the same ids before any work: the kernel would count a repeated block twice
    and read out of range where the reference counts it once and masks."""
    q, k = torch.randn(1, 80, 2, 8, device=DEVICE), torch.randn(1, 80, 1, 8, device=DEVICE)
    idx = torch.tensor([0, 1, 3, -1], dtype=torch.int32, device=DEVICE).expand(1, 80, 1, 4)
    ops.selection_attention(q, k, k, idx, SMALL, backend=backend)  # 80 tokens: blocks 0 .. 4
    with pytest.raises(ValueError, match=message):
        ops.selection_attention(q, k, k, change(idx), SMALL, backend=backend)
