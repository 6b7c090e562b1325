"""Public ops and nsa_core, both backends, forward and gradients against a dense float64 oracle.

The oracle is written here from the design brief's definitions (a ``[T, S]`` mask and the textbook
softmax, rotary written out), not with ``reference``'s chunked code, so the reference backend is
checked too, not compared with itself.
"""
import pytest
import torch

from nsa_parallel import KV, BranchKV, Compressors, NSAConfig, nsa_core, ops
from nsa_parallel.rotary import Rotary

from conftest import DEVICE, assert_same_selection, check_forward_backward, dense_attention

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
        k=torch.randn(b, t, g, dk), v=torch.randn(b, t, g, dv), gates=torch.randn(b, t, h, 3), cfg=cfg,
        scale=dk ** -0.5,
    )


# --- the oracle: masks straight from the definitions -------------------------------------------

def compressed_mask(seq: int, num_compressed: int, cfg: NSAConfig) -> torch.Tensor:
    """Query t sees compressed token i iff its block [i*d, i*d + l) ends at or before t."""
    t = torch.arange(seq)[:, None]
    return torch.arange(num_compressed)[None, :] * cfg.compress_stride + cfg.compress_block_size - 1 <= t


def window_mask(seq: int, window: int) -> torch.Tensor:
    t, s = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
    return (s <= t) & (s > t - window)


def selected_mask(idx: torch.Tensor, heads: int, cfg: NSAConfig) -> torch.Tensor:
    """``[B, H, T, S]``: key s is seen iff its block s // l' is in the query's group's list and s <= t."""
    seq = idx.shape[1]
    key_block = torch.arange(seq) // cfg.select_block_size
    picked = (idx.long()[..., None] == key_block).any(-2)  # [B, T, G, S]
    picked = picked.repeat_interleave(heads // idx.shape[2], dim=2).permute(0, 2, 1, 3)
    return picked & (torch.arange(seq)[None, :] <= torch.arange(seq)[:, None])


def mean_phi(cfg: NSAConfig):
    """A compression ``phi`` simple enough to write out: the mean of each block [i*d, i*d + l)."""
    def phi(x: torch.Tensor) -> torch.Tensor:
        n = cfg.num_compressed(x.shape[1])
        blocks = [x[:, i * cfg.compress_stride:i * cfg.compress_stride + cfg.compress_block_size].mean(1)
                  for i in range(n)]
        return torch.stack(blocks, 1) if blocks else x[:, :0]
    return phi


def rotate(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotate-half rotary of ``x [B, S, heads, d]`` at ``positions [S]``."""
    d = x.shape[-1]
    angles = positions.double()[:, None] * base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = (torch.cat([f(angles)] * 2, -1)[None, :, None].to(x.dtype) for f in (torch.cos, torch.sin))
    return x * cos + torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1) * sin


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_compressed_attention(case, backend):
    x = make(case)
    visible = compressed_mask(x["q"].shape[1], x["k_cmp"].shape[1], x["cfg"])
    check_forward_backward(
        lambda q, k, v: ops.compressed_attention(q, k, v, x["cfg"], backend=backend),
        lambda q, k, v: dense_attention(q, k, v, visible, x["scale"]),
        [x["q"], x["k_cmp"], x["v_cmp"]], DTYPE, case)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_window_attention(case, backend):
    x = make(case)
    w = x["cfg"].window_size
    check_forward_backward(
        lambda q, k, v: ops.window_attention(q, k, v, w, backend=backend),
        lambda q, k, v: dense_attention(q, k, v, window_mask(q.shape[1], w), x["scale"]),
        [x["q"], x["k"], x["v"]], DTYPE, case)


@pytest.mark.parametrize("case", CASES)
def test_select_blocks(case):
    """The kernel against the reference (whose scores test_reference checks against a brute-force sum)."""
    x = make(case)
    q, k_cmp = x["q"].to(DEVICE), x["k_cmp"].to(DEVICE)
    idx = ops.select_blocks(q, k_cmp, x["cfg"], backend="triton")
    assert idx.shape == (*q.shape[:2], k_cmp.shape[2], x["cfg"].num_selected_blocks)
    assert_same_selection(idx, q, k_cmp, x["cfg"], x["scale"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_selection_attention(case, backend):
    x = make(case)
    idx = ops.select_blocks(x["q"].double(), x["k_cmp"].double(), x["cfg"], backend="reference")
    visible = selected_mask(idx, x["q"].shape[2], x["cfg"])
    check_forward_backward(
        lambda q, k, v, i: ops.selection_attention(q, k, v, i, x["cfg"], backend=backend),
        lambda q, k, v, i: dense_attention(q, k, v, visible, x["scale"]),
        [x["q"], x["k"], x["v"], idx], DTYPE, case)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_nsa_core(case, backend):
    """Rotary (compressed keys at their block's last token), compression, the three gated branches; the
    oracle uses the blocks the backend selected (selection itself is compared, near-ties aside, above)."""
    x = make(case)
    cfg, scale, phi = x["cfg"], x["scale"], mean_phi(x["cfg"])
    seq, heads = x["q"].shape[1:3]
    pos = torch.arange(seq)
    ends = torch.arange(cfg.num_compressed(seq)) * cfg.compress_stride + cfg.compress_block_size - 1
    q_rot, k_cmp = rotate(x["q"], pos), rotate(phi(x["k"]), ends)
    idx = ops.select_blocks(q_rot.to(DEVICE), k_cmp.to(DEVICE), cfg, backend=backend).cpu()
    rotary = Rotary(*(f(pos.double()[:, None] * 10000.0 ** (-torch.arange(0, x["q"].shape[-1], 2) / x["q"].shape[-1]))
                      .repeat(1, 2).to(DEVICE) for f in (torch.cos, torch.sin)))

    def oracle(q, k, v, g):
        q, k_rot, g = rotate(q, pos), rotate(k, pos), torch.sigmoid(g)
        return (g[..., 0:1] * dense_attention(q, rotate(phi(k), ends), phi(v), compressed_mask(seq, len(ends), cfg), scale)
                + g[..., 1:2] * dense_attention(q, k_rot, v, selected_mask(idx, heads, cfg), scale)
                + g[..., 2:3] * dense_attention(q, k_rot, v, window_mask(seq, cfg.window_size), scale))

    check_forward_backward(
        lambda q, k, v, g: nsa_core(q, BranchKV(*(KV(k, v),) * 3), g, Compressors(phi, phi), cfg, rotary=rotary,
                                    backend=backend),
        oracle, [x["q"], x["k"], x["v"], x["gates"]], DTYPE, case)


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
