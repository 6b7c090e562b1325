"""The float64 reference against brute-force definitions (no chunking, dense masks)."""
import pytest
import torch

from nsa_parallel import KV, BranchKV, Compressors, NSAConfig, nsa_core, reference

from conftest import assert_close, dense_attention

F64 = torch.float64
SMALL = NSAConfig(compress_block_size=16, compress_stride=8, select_block_size=16, num_selected_blocks=4, window_size=24)


def rand(*shape):
    return torch.randn(*shape, dtype=F64)


@pytest.mark.parametrize("seq", [7, 16, 150, 301])
def test_compressed_attention_matches_dense(seq):
    cfg = SMALL
    tc = cfg.num_compressed(seq)
    q, k, v = rand(2, seq, 4, 8), rand(2, tc, 2, 8), rand(2, tc, 2, 6)
    t = torch.arange(seq)[:, None]
    visible = torch.arange(tc)[None, :] * cfg.compress_stride + cfg.compress_block_size - 1 <= t
    out = reference.compressed_attention(q, k, v, cfg, 0.3)
    assert_close(out, dense_attention(q, k, v, visible, 0.3), F64)
    assert (out[:, : cfg.compress_block_size - 1] == 0).all()


@pytest.mark.parametrize("seq, window", [(200, 24), (50, 1000), (150, 1)])
def test_window_attention_matches_dense(seq, window):
    q, k, v = rand(1, seq, 4, 8), rand(1, seq, 1, 8), rand(1, seq, 1, 8)
    t, s = torch.arange(seq)[:, None], torch.arange(seq)[None, :]
    visible = (s <= t) & (s > t - window)
    assert_close(reference.window_attention(q, k, v, window, 0.5), dense_attention(q, k, v, visible, 0.5), F64)


def test_selection_attention_matches_dense():
    seq, cfg = 170, SMALL
    q, k, v = rand(2, seq, 4, 8), rand(2, seq, 2, 8), rand(2, seq, 2, 4)
    idx = reference.select_blocks(q, rand(2, cfg.num_compressed(seq), 2, 8), cfg, 0.4)
    visible = torch.zeros(2, 4, seq, seq, dtype=torch.bool)
    for b in range(2):
        for t in range(seq):
            for h in range(4):
                for j in idx[b, t, h // 2].tolist():
                    if j >= 0:
                        lo = j * cfg.select_block_size
                        visible[b, h, t, lo: min(lo + cfg.select_block_size, t + 1)] = True
    out = reference.selection_attention(q, k, v, idx, cfg, 0.4)
    assert_close(out, dense_attention(q, k, v, visible, 0.4), F64)


def test_selection_scores_match_a_brute_force_sum():
    """p_slc[t, h, j] = sum_i overlap(compression block i, selection block j) / d * p_cmp[t, h, i], summed
    over the heads of a group: counted token by token here, with the dense softmax."""
    seq, cfg, scale = 150, SMALL, 0.3
    q, k_cmp = rand(2, seq, 4, 8), rand(2, cfg.num_compressed(seq), 2, 8)
    tc, ns = k_cmp.shape[1], cfg.num_select_blocks(seq)
    visible = (torch.arange(tc)[None, :] * cfg.compress_stride + cfg.compress_block_size - 1
               <= torch.arange(seq)[:, None])
    scores = torch.einsum("bthd,bshd->bhts", q, k_cmp.repeat_interleave(2, dim=2)) * scale
    p_cmp = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1).nan_to_num(0.0)
    weights = torch.zeros(tc, ns, dtype=F64)
    for i in range(tc):
        for token in range(i * cfg.compress_stride, i * cfg.compress_stride + cfg.compress_block_size):
            weights[i, token // cfg.select_block_size] += 1 / cfg.compress_stride
    expected = (p_cmp @ weights).view(2, 2, 2, seq, ns).sum(2).permute(0, 2, 1, 3)
    assert_close(reference.selection_scores(q, k_cmp, cfg, scale), expected, F64)


def test_overlap_weights_paper_defaults():
    w = reference.overlap_weights(64, 16, NSAConfig(), torch.device("cpu"))
    j = 3
    assert w[4 * j - 1: 4 * j + 4, j].tolist() == [1, 2, 2, 2, 1]
    assert w[:, j].sum() == 8  # l'/d sub-blocks, each covered by l/d compression blocks


def test_select_blocks_rules():
    seq, cfg = 333, SMALL
    q, k_cmp = rand(1, seq, 4, 8), rand(1, cfg.num_compressed(seq), 2, 8)
    idx = reference.select_blocks(q, k_cmp, cfg, 0.35)
    assert idx.shape == (1, seq, 2, cfg.num_selected_blocks) and idx.dtype == torch.int32
    ls = cfg.select_block_size
    for t in range(seq):
        own = t // ls
        eligible = own + 1
        for g in range(2):
            chosen = [j for j in idx[0, t, g].tolist() if j >= 0]
            assert chosen == sorted(chosen) and len(set(chosen)) == len(chosen)
            assert len(chosen) == min(cfg.num_selected_blocks, eligible)
            assert {0, own, max(own - 1, 0)} <= set(chosen)
            assert all(j * ls <= t for j in chosen)
            assert idx[0, t, g, len(chosen):].eq(-1).all()


def test_select_blocks_ties_prefer_lower_ids():
    seq, cfg = 200, SMALL
    q, k_cmp = rand(1, seq, 2, 8), torch.zeros(1, cfg.num_compressed(seq), 1, 8, dtype=F64)
    idx = reference.select_blocks(q, k_cmp, cfg, 1.0)
    t = seq - 1  # own block 12, forced 0, 11, 12; with equal scores the free slot takes block 1
    assert idx[0, t, 0].tolist() == [0, 1, 11, 12]


def test_no_nan_before_first_compressed_block():
    cfg = NSAConfig()
    seq = 20  # shorter than one compression block
    q = rand(1, seq, 2, 8).requires_grad_()
    k = rand(1, 0, 1, 8).requires_grad_()
    out = reference.compressed_attention(q, k, k, cfg, 1.0)
    out.sum().backward()
    assert (out == 0).all() and torch.isfinite(q.grad).all()


def test_reference_is_memory_sane_at_4096():
    cfg, seq = NSAConfig(), 4096
    q = rand(1, seq, 2, 16).requires_grad_()
    k = rand(1, seq, 1, 16).requires_grad_()
    g = rand(1, seq, 2, 3)
    phi = Compressors(*(lambda x: reference.unfold_blocks(x, cfg.compress_block_size, cfg.compress_stride).mean(3),) * 2)
    out = nsa_core(q, BranchKV(*(KV(k, k),) * 3), g, phi, cfg, backend="reference")
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()
