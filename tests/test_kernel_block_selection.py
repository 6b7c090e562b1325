"""nsa_kernels.select_blocks against reference.select_blocks run in float64."""
import pytest
import torch

from conftest import DEVICE, KERNEL_DTYPES, near_tie_rows
from nsa_parallel import ops, reference
from nsa_parallel.compression import compressed_positions
from nsa_parallel.config import NSAConfig
from nsa_kernels import block_selection
from nsa_kernels.block_selection import select_blocks


def _inputs(cfg, batch, seq_len, heads, groups, head_dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    num_cmp = cfg.num_compressed(seq_len)
    q = 2 * torch.randn(batch, seq_len, heads, head_dim, generator=gen)
    k_cmp = torch.randn(batch, num_cmp, groups, head_dim, generator=gen)
    return q.to(dtype).to(DEVICE), k_cmp.to(dtype).to(DEVICE)


def _cmp_probs(q, k_cmp, cfg, scale):
    """float64 compression probabilities ``[B, H, T, Tc]`` and lse ``[B, H, T]``."""
    q, k_cmp = q.double(), k_cmp.double()
    t = torch.arange(q.shape[1], device=q.device)
    ends = compressed_positions(torch.arange(k_cmp.shape[1], device=q.device), cfg)
    scores = torch.einsum("bthd,bshd->bhts", q, reference.expand_kv_heads(k_cmp, q.shape[2])) * scale
    return reference.masked_softmax(scores, ends[None, :] <= t[:, None])


def _run(q, k_cmp, cfg, scale):
    _, lse = _cmp_probs(q, k_cmp, cfg, scale)
    return select_blocks(
        q, k_cmp, lse.float(),
        compress_block_size=cfg.compress_block_size, compress_stride=cfg.compress_stride,
        select_block_size=cfg.select_block_size, num_selected=cfg.num_selected_blocks, scale=scale,
    )


def _check_structure(out, cfg, query_offset=0):
    """Ascending ids, -1 only at the end, forced blocks present, no block after its query
    (query t at position query_offset + t)."""
    seq_len, n, ls = out.shape[1], cfg.num_selected_blocks, cfg.select_block_size
    out = out.long()
    valid = out >= 0
    assert not (~valid[..., :-1] & valid[..., 1:]).any(), "-1 padding before a chosen block"
    ids = torch.where(valid, out, torch.iinfo(torch.int64).max)
    assert (ids[..., 1:] > ids[..., :-1]).logical_or(~valid[..., 1:]).all(), "ids not strictly ascending"
    t = query_offset + torch.arange(seq_len, device=out.device)[None, :, None, None]
    assert (torch.where(valid, out * ls, 0) <= t).all(), "a chosen block starts after its query"
    own = t // ls
    for forced in (torch.zeros_like(own), own, own - 1):
        present = (out == forced).any(-1) | (forced[..., 0] < 0)
        assert present.all(), "a forced block is missing"
    eligible = (t[..., 0] // ls + 1).clamp(max=n)
    assert (valid.sum(-1) == eligible).all(), "not min(n, eligible) blocks chosen"


# (l, d, l', n), B, T, H, G, dk
CASES = [
    ((16, 8, 16, 5), 1, 300, 4, 2, 64),  # group size 2, T not a multiple of l'
    ((16, 8, 16, 4), 2, 131, 8, 2, 192),  # B=2, head dim 192 (padded to 256), group size 4
    ((32, 16, 64, 4), 1, 300, 4, 4, 64),  # paper's l, d, l'; group size 1
    ((32, 8, 16, 5), 1, 300, 16, 1, 64),  # l > l'; group size 16
    ((16, 8, 24, 4), 1, 500, 4, 2, 64),  # l'/d = 3: padded compressed tile, two tiles
    ((16, 16, 32, 5), 1, 250, 2, 1, 64),  # l = d: no carry into the next tile
    ((16, 8, 32, 4), 1, 25, 2, 1, 64),  # T < l': a single selection block
    ((32, 16, 64, 4), 2, 20, 4, 2, 64),  # T < l: no compressed key, lse all -inf
    ((16, 8, 16, 4), 1, 1, 2, 2, 64),  # T = 1
    ((32, 16, 64, 4), 1, 300, 32, 1, 64),  # group size 32: heads spread over more lanes
    ((16, 8, 24, 4), 1, 300, 6, 2, 64),  # group size 3: a padding head in each group
]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "l{}-d{}-ls{}-n{}-B{}-T{}-H{}-G{}-dk{}".format(*c[0], *c[1:]))
def test_matches_reference(case, dtype):
    (l, d, ls, n), batch, seq_len, heads, groups, head_dim = case
    cfg = NSAConfig(compress_block_size=l, compress_stride=d, select_block_size=ls, num_selected_blocks=n)
    scale = head_dim ** -0.5
    q, k_cmp = _inputs(cfg, batch, seq_len, heads, groups, head_dim, dtype)
    out = _run(q, k_cmp, cfg, scale)
    assert out.dtype == torch.int32 and out.shape == (batch, seq_len, groups, n)
    _check_structure(out, cfg)

    # Rows whose n-th and (n+1)-th float64 scores are within 1e-4 may order either way.
    ref, near = near_tie_rows(q, k_cmp, cfg, scale)
    differ = (out.cpu() != ref).any(-1)
    assert not (differ & ~near).any(), f"{int((differ & ~near).sum())} rows differ without a near tie"
    assert near.float().mean() < 0.02, f"{int(near.sum())} of {near.numel()} rows are near ties"
    if near.any():
        print(f"{int(near.sum())} near-tie rows excluded, {int(differ.sum())} differ")


@pytest.mark.parametrize("groups", [1, 4])
def test_exact_ties_prefer_lower_ids(groups):
    # l = d and l' = 2d with zero compressed keys: every fully visible block
    # scores exactly 2/#visible per head in any summation order, so all
    # non-forced blocks tie and the lowest ids must win.
    cfg = NSAConfig(compress_block_size=8, compress_stride=8, select_block_size=16, num_selected_blocks=5)
    q, k_cmp = _inputs(cfg, 2, 200, 4, groups, 64, torch.float32, seed=1)
    k_cmp = torch.zeros_like(k_cmp)
    out = _run(q, k_cmp, cfg, 0.125)
    assert torch.equal(out, reference.select_blocks(q.double(), k_cmp.double(), cfg, 0.125))
    t = torch.arange(200, device=DEVICE)
    late = t >= 4 * 16  # own block >= 4: forced 0, own-1, own; blocks 1, 2 fill the free slots
    expected = torch.stack([0 * t, 0 * t + 1, 0 * t + 2, t // 16 - 1, t // 16], -1)[late]
    assert torch.equal(out[:, late].long(), expected[None, :, None].expand(2, -1, groups, -1))


def test_chunked_scores_match_single_pass(monkeypatch):
    cfg = NSAConfig(compress_block_size=16, compress_stride=8, select_block_size=16, num_selected_blocks=4)
    q, k_cmp = _inputs(cfg, 2, 290, 4, 2, 64, torch.float32, seed=2)
    whole = _run(q, k_cmp, cfg, 0.125)
    # Room for 64 query rows of B * G * Ns floats: five chunks.
    monkeypatch.setattr(block_selection, "SCORE_BUFFER_BYTES", 64 * 2 * 2 * 19 * 4)
    assert torch.equal(_run(q, k_cmp, cfg, 0.125), whole)


def test_deterministic():
    cfg = NSAConfig(compress_block_size=32, compress_stride=8, select_block_size=16, num_selected_blocks=5)
    q, k_cmp = _inputs(cfg, 1, 230, 8, 2, 64, torch.float16, seed=3)
    assert torch.equal(_run(q, k_cmp, cfg, 0.125), _run(q, k_cmp, cfg, 0.125))


# --- queries as a shard of a longer sequence (context parallelism) --------------------------

def _offset_inputs(cfg, batch, seq_len, heads, groups, head_dim, dtype, query_offset, seed=0):
    """q for positions query_offset .. query_offset+T-1 and the compressed keys of 0 .. query_offset+T-1."""
    gen = torch.Generator().manual_seed(seed)
    q = 2 * torch.randn(batch, seq_len, heads, head_dim, generator=gen)
    k_cmp = torch.randn(batch, cfg.num_compressed(query_offset + seq_len), groups, head_dim, generator=gen)
    return q.to(dtype).to(DEVICE), k_cmp.to(dtype).to(DEVICE)


def _offset_lse(q, k_cmp, cfg, scale, query_offset):
    """float64 compression-branch lse ``[B, H, T]`` of queries at query_offset + t."""
    q, k_cmp = q.double(), k_cmp.double()
    t = query_offset + torch.arange(q.shape[1], device=q.device)
    ends = compressed_positions(torch.arange(k_cmp.shape[1], device=q.device), cfg)
    scores = torch.einsum("bthd,bshd->bhts", q, reference.expand_kv_heads(k_cmp, q.shape[2])) * scale
    return reference.masked_softmax(scores, ends[None, :] <= t[:, None])[1]


def _offset_near_tie_rows(q, k_cmp, cfg, scale, query_offset, rel_gap=1e-4):
    """conftest.near_tie_rows for queries at query_offset + t."""
    scores = reference.selection_scores(q.double().cpu(), k_cmp.double().cpu(), cfg, scale, query_offset)
    ref = reference.top_blocks(scores, cfg, query_offset)
    n = cfg.num_selected_blocks
    if scores.shape[-1] <= n:
        return ref, torch.zeros(ref.shape[:3], dtype=torch.bool)
    ranked = reference.selection_keys(scores, cfg, query_offset).sort(dim=-1, descending=True).values
    last_in, first_out = ranked[..., n - 1], ranked[..., n]
    both_scores = torch.isfinite(last_in) & torch.isfinite(first_out)
    near = (last_in - first_out).abs() <= rel_gap * last_in.abs().clamp(min=1e-30)
    return ref, both_scores & near


def _assert_offset_selection(out, q, k_cmp, cfg, scale, query_offset):
    ref, near = _offset_near_tie_rows(q, k_cmp, cfg, scale, query_offset)
    assert torch.equal(ref, reference.select_blocks(q.double().cpu(), k_cmp.double().cpu(), cfg, scale,
                                                    query_offset))
    differ = (out.cpu() != ref).any(-1)
    assert not (differ & ~near).any(), f"{int((differ & ~near).sum())} rows differ without a near tie"
    assert near.float().mean() < 0.02, f"{int(near.sum())} of {near.numel()} rows are near ties"


# (l, d, l', n), B, T, H, G, dk, query_offset
OFFSET_CASES = [
    ((16, 8, 16, 5), 1, 60, 4, 2, 64, 0),  # no offset, through the query_offset path
    ((16, 8, 16, 5), 1, 60, 4, 1, 64, 32),  # offset a multiple of l'; group size 4
    ((16, 8, 24, 4), 1, 50, 4, 2, 64, 37),  # offset not a multiple of l'; l'/d = 3
    ((32, 16, 64, 4), 1, 10, 4, 1, 64, 37),  # T shorter than one block (own blocks 0 and 1)
    ((16, 8, 16, 5), 1, 20, 8, 2, 192, 300),  # S >> T: whole tiles before the diagonal; dk 192, group 4
    ((32, 8, 16, 5), 2, 30, 16, 1, 64, 301),  # l > l' (carry across tiles), group 16, B = 2
    ((32, 16, 64, 4), 2, 20, 4, 2, 64, 5),  # query_offset + T < l: no compressed key
]


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize(
    "case", OFFSET_CASES, ids=lambda c: "l{}-d{}-ls{}-n{}-B{}-T{}-H{}-G{}-dk{}-offset{}".format(*c[0], *c[1:]))
def test_query_offset_matches_reference(case, dtype):
    """Queries at query_offset + t with the float64 lse of those positions: global block ids,
    forced blocks 0, p // l' and p // l' - 1, against reference.select_blocks(query_offset=...)."""
    (l, d, ls, n), batch, seq_len, heads, groups, head_dim, qo = case
    cfg = NSAConfig(compress_block_size=l, compress_stride=d, select_block_size=ls, num_selected_blocks=n)
    scale = head_dim ** -0.5
    q, k_cmp = _offset_inputs(cfg, batch, seq_len, heads, groups, head_dim, dtype, qo)
    out = select_blocks(
        q, k_cmp, _offset_lse(q, k_cmp, cfg, scale, qo).float(),
        compress_block_size=l, compress_stride=d, select_block_size=ls, num_selected=n, scale=scale,
        query_offset=qo,
    )
    assert out.dtype == torch.int32 and out.shape == (batch, seq_len, groups, n)
    _check_structure(out, cfg, qo)
    _assert_offset_selection(out, q, k_cmp, cfg, scale, qo)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("case", [OFFSET_CASES[2], OFFSET_CASES[4]], ids=["offset37", "offset300"])
def test_query_offset_through_ops(case, dtype):
    """ops.select_blocks(backend="triton", query_offset=...) with the lse of the Triton compressed
    branch (key_offset = l - 1 - query_offset) against the float64 reference."""
    (l, d, ls, n), batch, seq_len, heads, groups, head_dim, qo = case
    cfg = NSAConfig(compress_block_size=l, compress_stride=d, select_block_size=ls, num_selected_blocks=n)
    q, k_cmp = _offset_inputs(cfg, batch, seq_len, heads, groups, head_dim, dtype, qo, seed=1)
    out = ops.select_blocks(q, k_cmp, cfg, backend="triton", query_offset=qo)
    _check_structure(out, cfg, qo)
    _assert_offset_selection(out, q, k_cmp, cfg, head_dim ** -0.5, qo)


def test_query_offset_chunked_scores_match_single_pass(monkeypatch):
    cfg = NSAConfig(compress_block_size=16, compress_stride=8, select_block_size=16, num_selected_blocks=4)
    qo = 37
    q, k_cmp = _offset_inputs(cfg, 2, 100, 4, 2, 64, torch.float32, qo, seed=2)
    lse = _offset_lse(q, k_cmp, cfg, 0.125, qo).float()

    def run():
        return select_blocks(q, k_cmp, lse, compress_block_size=16, compress_stride=8, select_block_size=16,
                             num_selected=4, scale=0.125, query_offset=qo)

    whole = run()
    # Room for 24 query rows of B * G * Ns floats: five chunks.
    monkeypatch.setattr(block_selection, "SCORE_BUFFER_BYTES", 24 * 2 * 2 * 9 * 4)
    assert torch.equal(run(), whole)
