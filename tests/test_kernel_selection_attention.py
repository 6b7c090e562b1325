"""Selection-attention kernel against the float64 reference (forward and q, k, v gradients)."""
import pytest
import torch

import nsa_kernels.selection_attention as sa
import nsa_kernels.tma as tma
from nsa_parallel import NSAConfig, ops, reference

from conftest import DEVICE, KERNEL_DTYPES, check_forward_backward


def random_selection(batch: int, seq_len: int, groups: int, n: int, block_size: int, seed: int,
                     force_first: bool = False, query_offset: int = 0) -> torch.Tensor:
    """Valid random ``[B, T, G, n]`` selections: distinct ids <= p // l' (query t at position
    p = query_offset + t), the own block always in, 1..n entries per row (so some rows hold only
    their own block), -1 padding; half the rows are shuffled (ids and -1 in any order), the rest
    keep a random (not ascending) order."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = -(-(query_offset + seq_len) // block_size)
    own = ((query_offset + torch.arange(seq_len)) // block_size).view(1, seq_len, 1, 1)
    j = torch.arange(num_blocks)
    score = torch.rand(batch, seq_len, groups, num_blocks, generator=gen)
    if force_first:
        score = torch.where(j == 0, 1.5, score)
    score = torch.where(j == own, 2.0, score)
    score = torch.where(j > own, -1.0, score)
    value, ids = score.sort(-1, descending=True)
    if num_blocks < n:
        pad = (0, n - num_blocks)
        value = torch.nn.functional.pad(value, pad, value=-1.0)
        ids = torch.nn.functional.pad(ids, pad, value=-1)
    value, ids = value[..., :n], ids[..., :n]
    low = 1 + int(force_first)
    count = torch.randint(low, n + 1, (batch, seq_len, groups, 1), generator=gen)
    idx = torch.where((torch.arange(n) < count) & (value >= 0), ids, -1)
    shuffled = idx.gather(-1, torch.rand(idx.shape, generator=gen).argsort(-1))
    idx = torch.where(torch.rand(batch, seq_len, groups, 1, generator=gen) < 0.5, shuffled, idx)
    return idx.to(torch.int32)


def run_case(batch, seq_len, heads, groups, dk, dv, block_size, n, dtype, idx=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_len, heads, dk, generator=gen)
    k = torch.randn(batch, seq_len, groups, dk, generator=gen)
    v = torch.randn(batch, seq_len, groups, dv, generator=gen)
    if idx is None:
        idx = random_selection(batch, seq_len, groups, n, block_size, seed)
    cfg = NSAConfig(compress_block_size=16, compress_stride=16, select_block_size=block_size)
    scale = dk ** -0.5
    check_forward_backward(
        lambda q, k, v, i: sa.selection_attention(q, k, v, i, select_block_size=block_size, scale=scale),
        lambda q, k, v, i: reference.selection_attention(q, k, v, i, cfg, scale),
        [q, k, v, idx], dtype, f"selection_attention {batch}x{seq_len}x{heads}/{groups} dk={dk} dv={dv}",
    )


CASES = {
    # name: (B, T, H, G, dk, dv, l', n)
    "partial_last_block": (1, 72, 4, 2, 64, 64, 32, 3),
    "shorter_than_block": (1, 20, 2, 1, 64, 64, 32, 2),
    "batch2_group1": (2, 40, 2, 2, 64, 64, 16, 3),
    "group4_dk64_dv128": (1, 50, 4, 1, 64, 128, 16, 3),
    "group16": (1, 40, 16, 1, 64, 64, 16, 3),
    "batch2_group16_block32": (2, 70, 32, 2, 64, 64, 32, 3),
    "group48_two_head_chunks": (1, 30, 48, 1, 64, 64, 16, 2),
    "dk192_dv128": (1, 40, 2, 1, 192, 128, 16, 3),
    "dk192_block64": (1, 80, 2, 2, 192, 192, 64, 2),
    "block64": (1, 80, 2, 1, 64, 64, 64, 3),
}


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_random_selection(case, dtype):
    run_case(*CASES[case], dtype)


SIXTEEN_BIT = [d for d in KERNEL_DTYPES if d != torch.float32]


@pytest.mark.parametrize("dtype", SIXTEEN_BIT, ids=str)
@pytest.mark.parametrize("case", ["partial_last_block", "batch2_group1", "group4_dk64_dv128", "block64",
                                  "batch2_group16_block32"])
def test_gather_tiles(monkeypatch, case, dtype):
    """16-bit inputs with power-of-two dims take TMA tiles where they can; the gather path they
    fall back to (older GPUs, unaligned tensors) must stay right too."""
    monkeypatch.setattr(tma, "ENABLED", False)
    run_case(*CASES[case], dtype)


@pytest.mark.parametrize("dtype", SIXTEEN_BIT, ids=str)
def test_tma_tiles_are_used(dtype):
    """The fast path is not silently skipped: TMA descriptors for 16-bit, power-of-two dims."""
    k = torch.zeros(2, 72, 2, 64, dtype=dtype, device=DEVICE)
    v = torch.zeros(2, 72, 2, 128, dtype=dtype, device=DEVICE)
    if DEVICE.type == "cuda" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA needs sm_90 or newer")
    assert sa._kv_descriptors(k, v, 32) is not None
    assert sa._kv_descriptors(k.float(), v.float(), 32) is None
    assert sa._kv_descriptors(torch.zeros(1, 8, 1, 192, dtype=dtype, device=DEVICE), v[:1, :8, :1], 32) is None


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_empty_rows_give_zero(dtype):
    """Rows selecting nothing (all -1) give 0 output and no NaN anywhere."""
    batch, seq_len, groups, n, block_size = 1, 40, 1, 3, 16
    idx = random_selection(batch, seq_len, groups, n, block_size, seed=1)
    idx[:, ::7] = -1
    run_case(batch, seq_len, 2, groups, 64, 64, block_size, n, dtype, idx=idx, seed=1)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_long_reverse_lists(monkeypatch, dtype):
    """Block 0 is selected by every query: its list is cut into many chunks whose partial dK/dV add up."""
    batch, seq_len, heads, groups, n, block_size = 1, 160, 2, 1, 3, 16
    monkeypatch.setattr(sa, "BACKWARD_CHUNK_ROWS", 32)  # 16 queries per chunk for 2 heads per group
    idx = random_selection(batch, seq_len, groups, n, block_size, seed=2, force_first=True)
    assert (idx == 0).any(-1).all()
    run_case(batch, seq_len, heads, groups, 64, 64, block_size, n, dtype, idx=idx, seed=2)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_reference_selector(monkeypatch, dtype):
    """Indices from the reference selector (ascending, forced blocks, -1 tail) on random data."""
    batch, seq_len, heads, groups, dk = 1, 100, 4, 2, 64
    cfg = NSAConfig(compress_block_size=32, compress_stride=16, select_block_size=32, num_selected_blocks=3)
    monkeypatch.setattr(sa, "BACKWARD_CHUNK_ROWS", 64)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(batch, seq_len, heads, dk, generator=gen, dtype=torch.float64)
    k_cmp = torch.randn(batch, cfg.num_compressed(seq_len), groups, dk, generator=gen, dtype=torch.float64)
    idx = reference.select_blocks(q, k_cmp, cfg, dk ** -0.5)
    run_case(batch, seq_len, heads, groups, dk, dk, 32, 3, dtype, idx=idx, seed=3)


def test_reverse_index_covers_every_pair():
    """Each visible (query, block) pair is in exactly one chunk; chunks are bounded; spare rows are empty."""
    batch, seq_len, groups, n, block_size, chunk = 2, 90, 2, 4, 16, 8
    idx = random_selection(batch, seq_len, groups, n, block_size, seed=4, force_first=True)
    idx[0, 5] = -1
    queries, table = sa._reverse_index(idx.to(DEVICE), block_size, chunk)
    queries, table = queries.cpu().long(), table.cpu().long()
    num_blocks = -(-seq_len // block_size)
    seen = []
    for segment, start, end in table.tolist():
        assert 0 <= end - start <= chunk
        b, g, j = segment // (groups * num_blocks), segment // num_blocks % groups, segment % num_blocks
        ts = queries[start:end].tolist()
        assert ts == sorted(ts)
        seen += [(b, t, g, j) for t in ts]
    expected = [(b, t, g, j) for b in range(batch) for t in range(seq_len) for g in range(groups)
                for j in idx[b, t, g].tolist() if j >= 0]
    assert sorted(seen) == sorted(expected)


# --- queries as a shard of a longer sequence (context parallelism) --------------------------

def run_offset_case(batch, seq_len, heads, groups, dk, dv, block_size, n, query_offset, dtype, idx=None, seed=0):
    """ops.selection_attention(backend="triton", query_offset=...) against backend="reference" in
    float64: k, v hold S = query_offset + T keys, query t sits at query_offset + t."""
    gen = torch.Generator().manual_seed(seed)
    num_keys = query_offset + seq_len
    q = torch.randn(batch, seq_len, heads, dk, generator=gen)
    k = torch.randn(batch, num_keys, groups, dk, generator=gen)
    v = torch.randn(batch, num_keys, groups, dv, generator=gen)
    if idx is None:
        idx = random_selection(batch, seq_len, groups, n, block_size, seed, query_offset=query_offset)
    cfg = NSAConfig(compress_block_size=16, compress_stride=16, select_block_size=block_size)
    check_forward_backward(
        lambda q, k, v, i: ops.selection_attention(q, k, v, i, cfg, backend="triton", query_offset=query_offset),
        lambda q, k, v, i: ops.selection_attention(q, k, v, i, cfg, backend="reference", query_offset=query_offset),
        [q, k, v, idx], dtype,
        f"selection_attention offset {query_offset} {batch}x{seq_len}x{heads}/{groups} dk={dk} dv={dv}",
    )


OFFSET_CASES = {
    # name: (B, T, H, G, dk, dv, l', n, query_offset)
    "offset0": (1, 40, 4, 2, 64, 64, 16, 3, 0),
    "offset_multiple_of_block_group4": (1, 40, 4, 1, 64, 64, 16, 3, 32),
    "offset37_dk64_dv128": (1, 30, 2, 1, 64, 128, 16, 3, 37),
    "offset37_shorter_than_block_group4": (1, 5, 4, 1, 64, 64, 16, 3, 37),
    "offset300_S_much_larger_than_T": (1, 20, 2, 1, 64, 64, 16, 4, 300),
    "offset37_dk192_dv128": (1, 20, 2, 1, 192, 128, 16, 3, 37),
    "offset37_block64_dk192_dv192": (1, 20, 2, 2, 192, 192, 64, 2, 37),
    "offset37_batch2_group1": (2, 20, 2, 2, 64, 64, 16, 3, 37),
    # 16 heads a group: dK/dV take each query's heads as one box (TMA on 16-bit inputs)
    "offset37_batch2_group16_dk64_dv128": (2, 24, 32, 2, 64, 128, 16, 3, 37),
}


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("case", list(OFFSET_CASES))
def test_query_offset(case, dtype):
    run_offset_case(*OFFSET_CASES[case], dtype)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_query_offset_long_reverse_lists(monkeypatch, dtype):
    """Block 0, far before the shard, is selected by every query: many chunks add up."""
    batch, seq_len, heads, groups, n, block_size, qo = 1, 80, 2, 1, 3, 16, 53
    monkeypatch.setattr(sa, "BACKWARD_CHUNK_ROWS", 32)
    idx = random_selection(batch, seq_len, groups, n, block_size, seed=2, force_first=True, query_offset=qo)
    assert (idx == 0).any(-1).all()
    run_offset_case(batch, seq_len, heads, groups, 64, 64, block_size, n, qo, dtype, idx=idx, seed=2)


def test_query_offset_reference_selector():
    """Indices from the reference selector with the same offset (forced 0, p // l', p // l' - 1)."""
    batch, seq_len, heads, groups, dk, qo = 1, 40, 4, 2, 64, 70
    cfg = NSAConfig(compress_block_size=32, compress_stride=16, select_block_size=32, num_selected_blocks=3)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(batch, seq_len, heads, dk, generator=gen, dtype=torch.float64)
    k_cmp = torch.randn(batch, cfg.num_compressed(qo + seq_len), groups, dk, generator=gen, dtype=torch.float64)
    idx = reference.select_blocks(q, k_cmp, cfg, dk ** -0.5, qo)
    run_offset_case(batch, seq_len, heads, groups, dk, dk, 32, 3, qo, torch.float32, idx=idx, seed=3)


def test_query_offset_unselected_blocks_get_zero_grads():
    """Keys of blocks no query selected (most of a long prefix) get exactly zero dK/dV."""
    batch, seq_len, heads, groups, n, block_size, qo = 1, 20, 4, 2, 3, 16, 200
    idx = random_selection(batch, seq_len, groups, n, block_size, seed=5, query_offset=qo)
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(batch, seq_len, heads, 64, generator=gen).to(DEVICE).requires_grad_()
    k = torch.randn(batch, qo + seq_len, groups, 64, generator=gen).to(DEVICE).requires_grad_()
    v = torch.randn(batch, qo + seq_len, groups, 64, generator=gen).to(DEVICE).requires_grad_()
    o = sa.selection_attention(q, k, v, idx.to(DEVICE), select_block_size=block_size, scale=0.125, query_offset=qo)
    o.backward(torch.randn(o.shape, generator=gen).to(DEVICE))
    num_blocks = -(-(qo + seq_len) // block_size)
    picked = torch.zeros(batch, groups, num_blocks, dtype=torch.bool)
    for b, t, g, j in (idx >= 0).nonzero().tolist():
        picked[b, g, idx[b, t, g, j]] = True
    unpicked = ~picked.repeat_interleave(block_size, -1)[..., : qo + seq_len].permute(0, 2, 1)  # [B, S, G]
    assert unpicked.any() and not unpicked.all()
    assert (k.grad.cpu()[unpicked] == 0).all() and (v.grad.cpu()[unpicked] == 0).all()
    assert (k.grad.cpu()[~unpicked] != 0).any()


def test_query_offset_reverse_index():
    """With an offset the lists hold positions query_offset + t over ceil((offset + T) / l') blocks."""
    batch, seq_len, groups, n, block_size, chunk, qo = 2, 50, 2, 4, 16, 8, 37
    idx = random_selection(batch, seq_len, groups, n, block_size, seed=4, force_first=True, query_offset=qo)
    queries, table = sa._reverse_index(idx.to(DEVICE), block_size, chunk, qo)
    queries, table = queries.cpu().long(), table.cpu().long()
    num_blocks = -(-(qo + seq_len) // block_size)
    seen = []
    for segment, start, end in table.tolist():
        assert 0 <= end - start <= chunk
        b, g, j = segment // (groups * num_blocks), segment // num_blocks % groups, segment % num_blocks
        seen += [(b, p - qo, g, j) for p in queries[start:end].tolist()]
    expected = [(b, t, g, j) for b in range(batch) for t in range(seq_len) for g in range(groups)
                for j in idx[b, t, g].tolist() if j >= 0]
    assert sorted(seen) == sorted(expected)
