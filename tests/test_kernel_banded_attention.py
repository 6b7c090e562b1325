"""nsa_kernels.banded_attention against the float64 reference (forward, lse, dQ/dK/dV)."""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import pytest
import torch
from conftest import DEVICE, KERNEL_DTYPES, assert_close, check_forward_backward

import nsa_kernels.tma as tma
from nsa_kernels.banded_attention import banded_attention
from nsa_parallel import ops, reference
from nsa_parallel.compression import compressed_positions
from nsa_parallel.config import NSAConfig

# The module itself (the package may re-export the function under the same name).
banded_module = importlib.import_module("nsa_kernels.banded_attention")

L, D = 32, 16  # compression block size and stride of the compressed branch


@dataclass(frozen=True)
class Case:
    branch: str  # "compressed", "window" or "generic" (own stride / offset)
    batch: int
    seq_len: int
    heads: int
    groups: int
    dk: int
    dv: int
    key_stride: int = 1
    key_offset: int = 0
    window: int | None = None

    @property
    def num_keys(self) -> int:
        if self.branch == "compressed":
            return NSAConfig(compress_block_size=L, compress_stride=D).num_compressed(self.seq_len)
        if self.branch == "window":
            return self.seq_len
        return max(self.seq_len - self.key_offset + self.key_stride - 1, 0) // self.key_stride

    @property
    def layout(self) -> dict:
        if self.branch == "compressed":
            return dict(key_stride=D, key_offset=L - 1, window=None)
        if self.branch == "window":
            return dict(key_stride=1, key_offset=0, window=self.window)
        return dict(key_stride=self.key_stride, key_offset=self.key_offset, window=self.window)


CASES = {
    "compressed-group2": Case("compressed", 1, 200, 4, 2, 64, 64),
    "compressed-dk192-dv128": Case("compressed", 1, 100, 2, 1, 192, 128),
    "compressed-two-tokens-B2": Case("compressed", 2, 50, 2, 2, 64, 64),
    "window-B2-group1-dk64-dv128": Case("window", 2, 150, 2, 2, 64, 128, window=100),
    "window-larger-than-T-group4": Case("window", 1, 70, 4, 1, 64, 64, window=512),
    "window-group16": Case("window", 1, 45, 16, 1, 64, 64, window=24),
    "window-B2-group2": Case("window", 2, 100, 4, 2, 64, 64, window=40),
    "window-T1": Case("window", 1, 1, 2, 1, 64, 64, window=512),
    "stride2-offset3-dk128-dv64": Case("generic", 1, 150, 2, 2, 128, 64, key_stride=2, key_offset=3),
}


def _inputs(case: Case, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)

    q = randn(case.batch, case.seq_len, case.heads, case.dk)
    k = randn(case.batch, case.num_keys, case.groups, case.dk)
    v = randn(case.batch, case.num_keys, case.groups, case.dv)
    do = randn(case.batch, case.seq_len, case.heads, case.dv)
    return q, k, v, do


def _visible(case: Case) -> torch.Tensor:
    layout = case.layout
    t = torch.arange(case.seq_len, device=DEVICE)[:, None]
    pos = (torch.arange(case.num_keys, device=DEVICE) * layout["key_stride"] + layout["key_offset"])[None, :]
    visible = pos <= t
    if layout["window"] is not None:
        visible &= pos > t - layout["window"]
    return visible


def _reference(case: Case, q, k, v, scale: float) -> torch.Tensor:
    """The branch's own reference function where there is one, else masked attention."""
    if case.branch == "compressed":
        return reference.compressed_attention(q, k, v, NSAConfig(compress_block_size=L, compress_stride=D), scale)
    if case.branch == "window":
        return reference.window_attention(q, k, v, case.window, scale)
    return reference.masked_attention(q, k, v, _visible(case), scale)


def _reference_lse(case: Case, q, k, scale: float) -> torch.Tensor:
    scores = torch.einsum("bthd,bshd->bhts", q, reference.expand_kv_heads(k, case.heads)) * scale
    return reference.masked_softmax(scores, _visible(case))[1]


def _check(case: Case, dtype: torch.dtype) -> None:
    q, k, v, do = _inputs(case, dtype)
    scale = case.dk**-0.5
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o, lse = banded_attention(*leaves, scale=scale, **case.layout)
    o.backward(do)

    ref_leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref_o = _reference(case, *ref_leaves, scale)
    ref_o.backward(do.double())

    assert o.dtype == dtype and o.shape == (case.batch, case.seq_len, case.heads, case.dv)
    assert_close(o, ref_o, dtype, "o")
    for name, leaf, ref_leaf in zip("qkv", leaves, ref_leaves):
        assert_close(leaf.grad, ref_leaf.grad, dtype, f"d{name}")

    ref_lse = _reference_lse(case, *ref_leaves[:2], scale)
    assert lse.dtype == torch.float32 and lse.shape == (case.batch, case.heads, case.seq_len)
    assert not lse.requires_grad
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty), "-inf exactly on rows that see nothing"
    assert_close(lse[~empty], ref_lse[~empty], dtype, "lse")
    assert (o.permute(0, 2, 1, 3)[empty] == 0).all(), "rows that see nothing give 0"


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name: str, dtype: torch.dtype) -> None:
    _check(CASES[name], dtype)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_no_compressed_token_gives_zeros(dtype: torch.dtype) -> None:
    """T < l: no compression block is complete, so S = 0."""
    case = Case("compressed", 2, L - 3, 4, 2, 64, 64)
    q, k, v, do = _inputs(case, dtype)
    assert k.shape[1] == 0
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o, lse = banded_attention(*leaves, scale=case.dk**-0.5, **case.layout)
    o.backward(do)
    assert (o == 0).all() and torch.isneginf(lse).all()
    for leaf in leaves:
        assert leaf.grad.shape == leaf.shape and (leaf.grad == 0).all()


@pytest.mark.parametrize("dtype", [d for d in KERNEL_DTYPES if d != torch.float32], ids=str)
@pytest.mark.parametrize("name", ["compressed-group2", "window-B2-group1-dk64-dv128", "stride2-offset3-dk128-dv64"])
def test_gather_tiles(name: str, dtype: torch.dtype, monkeypatch) -> None:
    """16-bit inputs with power-of-two dims stream their tiles by TMA where they can; the gather
    path they fall back to (older GPUs, unaligned tensors) must stay right too."""
    monkeypatch.setattr(tma, "ENABLED", False)
    _check(CASES[name], dtype)



@pytest.mark.skipif(DEVICE.type != "cuda", reason="GPU only: checks compiled, pipelined loops, which the interpreter does not have")
@pytest.mark.timeout(240)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_short_loops_finish(dtype: torch.dtype) -> None:
    """Lengths where programs' tile loops run 0, 1, 2 or 3 times, on every kernel: a 2-stage TMA
    pipeline once hung in dK/dV when its loop ran exactly once (group 1, T=50)."""
    for seq_len in (17, 33, 50, 64, 65, 100, 129, 200):
        for batch in (1, 2):
            for heads, groups in ((2, 2), (4, 2), (16, 1)):
                _check(Case("compressed", batch, seq_len, heads, groups, 64, 64), dtype)
                _check(Case("window", batch, seq_len, heads, groups, 64, 64, window=40), dtype)

@pytest.mark.parametrize(
    "tiles", [banded_module._Tiles(16, 32, 4, 1), banded_module._Tiles(64, 64, 4, 1)], ids=["m16-n32", "m64-n64"]
)
@pytest.mark.parametrize("name", ["window-B2-group1-dk64-dv128", "stride2-offset3-dk128-dv64"])
def test_tile_sizes_do_not_change_results(name: str, tiles, monkeypatch) -> None:
    if DEVICE.type == "cuda":
        pytest.skip("tile override applies to the interpreter only")
    monkeypatch.setattr(banded_module, "_INTERPRETER_TILES", tiles)
    _check(CASES[name], torch.float32)


@pytest.mark.parametrize("splits", [3, 8])
@pytest.mark.parametrize("name", ["compressed-group2", "window-B2-group1-dk64-dv128", "window-group16"])
def test_dkdv_splits_do_not_change_results(name: str, splits: int, monkeypatch) -> None:
    """dK/dV from key tiles cut into any number of slices, including more slices than edge tiles."""
    monkeypatch.setattr(banded_module, "_dkdv_splits", lambda *args: splits)
    _check(CASES[name], torch.float32)


def test_dkdv_splits_follow_the_work() -> None:
    """H100 shape (132 SMs, 64 x 64 dK/dV tiles, T=64k, 4 KV heads of 16 query heads): the
    compressed branch's key tiles, the first seen by every query, are split; the sliding
    window's small uniform ones are not."""
    t = 65536
    shape = dict(group=16, units=4, block_m=64, block_n=64, num_sms=132)
    assert banded_module._dkdv_splits(t, (t - L) // D + 1, D, L - 1, t, **shape) >= 4
    assert banded_module._dkdv_splits(t, t, 1, 0, 512, **shape) == 1


@pytest.mark.parametrize(
    "seq_len,key_stride,key_offset,window",
    [(130, 1, 0, 31), (130, 1, 0, 33), (130, 1, 0, 63), (130, 1, 0, 64), (130, 2, 0, 31),
     (130, 3, 5, 40), (130, 5, 2, 64), (130, 15, 0, None), (64, 33, 0, None), (130, 16, 31, 48)],
)
def test_band_edges_on_tile_edges(seq_len: int, key_stride: int, key_offset: int, window: int | None) -> None:
    """Bands whose edges fall on and beside tile edges (interpreter tiles: 32 queries x 16 keys)."""
    _check(Case("generic", 1, seq_len, 2, 1, 64, 64, key_stride, key_offset, window), torch.float32)


def test_rejects_bad_arguments() -> None:
    q = torch.zeros(1, 8, 4, 64, device=DEVICE)
    k = torch.zeros(1, 8, 3, 64, device=DEVICE)
    with pytest.raises(ValueError, match="multiple"):
        banded_attention(q, k, k, key_stride=1, key_offset=0, window=None, scale=1.0)
    k = torch.zeros(1, 8, 2, 64, device=DEVICE)
    with pytest.raises(ValueError, match="window"):
        banded_attention(q, k, k, key_stride=1, key_offset=0, window=0, scale=1.0)


# --- queries as a shard of a longer sequence (context parallelism) --------------------------

# Compressed branch and window of the ops' query_offset cases (l = 32, d = 16 as above, l' = 16).
OFFSET_CONFIG = NSAConfig(compress_block_size=L, compress_stride=D, select_block_size=16, num_selected_blocks=4,
                          window_size=24)

# name: (query_offset, T, H, G, dk, dv)
OFFSET_CASES = {
    "offset0-group2": (0, 50, 4, 2, 64, 64),
    "offset-multiple-of-ls-group4": (32, 40, 4, 1, 64, 64),
    "offset37-dk64-dv128": (37, 30, 2, 1, 64, 128),
    "offset37-T-shorter-than-block-group4": (37, 5, 4, 1, 64, 64),
    "offset300-S-much-larger-than-T": (300, 20, 2, 1, 64, 64),
    "offset37-dk192-dv128": (37, 20, 2, 1, 192, 128),
}


def _offset_inputs(name: str, branch: str):
    qo, t, h, g, dk, dv = OFFSET_CASES[name]
    gen = torch.Generator().manual_seed(qo + t)
    s = OFFSET_CONFIG.num_compressed(qo + t) if branch == "compressed" else qo + t
    q = torch.randn(1, t, h, dk, generator=gen)
    return qo, q, torch.randn(1, s, g, dk, generator=gen), torch.randn(1, s, g, dv, generator=gen)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("name", list(OFFSET_CASES))
def test_compressed_query_offset(name: str, dtype: torch.dtype) -> None:
    """ops.compressed_attention(query_offset=...): banded with key_offset = l - 1 - query_offset
    (negative past the first block), against the float64 reference, forward, lse and dQ/dK/dV."""
    qo, q, k, v = _offset_inputs(name, "compressed")
    check_forward_backward(
        lambda q, k, v: ops.compressed_attention(q, k, v, OFFSET_CONFIG, backend="triton", query_offset=qo),
        lambda q, k, v: ops.compressed_attention(q, k, v, OFFSET_CONFIG, backend="reference", query_offset=qo),
        [q, k, v], dtype, name)
    if dtype != torch.float32:
        return
    _, lse = ops.compressed_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), OFFSET_CONFIG, backend="triton",
                                      query_offset=qo, return_lse=True)
    ends = compressed_positions(torch.arange(k.shape[1]), OFFSET_CONFIG)
    scores = torch.einsum("bthd,bshd->bhts", q.double(), reference.expand_kv_heads(k.double(), q.shape[2]))
    visible = ends[None, :] <= qo + torch.arange(q.shape[1])[:, None]
    ref_lse = reference.masked_softmax(scores * q.shape[-1] ** -0.5, visible)[1]
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse.cpu()), empty)
    assert_close(lse.cpu()[~empty], ref_lse[~empty], dtype, "lse")


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("name", list(OFFSET_CASES))
def test_window_query_offset(name: str, dtype: torch.dtype) -> None:
    """ops.window_attention(query_offset=...): banded with key_offset = -query_offset over the
    halo and the shard's own keys, against the float64 reference, forward and dQ/dK/dV."""
    qo, q, k, v = _offset_inputs(name, "window")
    w = OFFSET_CONFIG.window_size
    check_forward_backward(
        lambda q, k, v: ops.window_attention(q, k, v, w, backend="triton", query_offset=qo),
        lambda q, k, v: ops.window_attention(q, k, v, w, backend="reference", query_offset=qo),
        [q, k, v], dtype, name)


@pytest.mark.parametrize("window", [None, 20, 75])
def test_query_offset_window_reaching_past_the_halo(window: int | None) -> None:
    """Window branch with w > T (and no window): every halo key within w is visible."""
    qo, t = 45, 30
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, t, 4, 64, generator=gen), torch.randn(1, qo + t, 2, 64, generator=gen),
               torch.randn(1, qo + t, 2, 64, generator=gen))
    w = qo + t if window is None else window
    check_forward_backward(
        lambda q, k, v: banded_attention(q, k, v, key_stride=1, key_offset=-qo, window=window, scale=0.125)[0],
        lambda q, k, v: reference.window_attention(q, k, v, w, 0.125, qo),
        [q, k, v], torch.float32, f"window {window}")


@pytest.mark.parametrize(
    "seq_len,key_stride,key_offset,window,extra_keys",
    [(40, 1, -100, 30, 0), (40, 1, -37, 31, 5), (70, 3, -50, None, 3), (40, 16, -100, 48, 2),
     (33, 16, -65, None, 4), (20, 1, -80, 16, 20)],
)
def test_negative_key_offset_and_unseen_keys(seq_len, key_stride, key_offset, window, extra_keys) -> None:
    """Keys at negative positions (and keys past the last query: ``extra_keys``); keys no query sees
    (below every window or after the last query) get exactly zero dK/dV."""
    case = Case("generic", 1, seq_len, 4, 2, 64, 64, key_stride, key_offset, window)
    num_keys = case.num_keys + extra_keys
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, seq_len, 4, 64, generator=gen, device="cpu").to(DEVICE).requires_grad_()
    k = torch.randn(1, num_keys, 2, 64, generator=gen).to(DEVICE).requires_grad_()
    v = torch.randn(1, num_keys, 2, 64, generator=gen).to(DEVICE).requires_grad_()
    o, _ = banded_attention(q, k, v, key_stride=key_stride, key_offset=key_offset, window=window, scale=0.125)
    do = torch.randn(o.shape, generator=gen).to(DEVICE)
    o.backward(do)

    t = torch.arange(seq_len)[:, None]
    pos = (torch.arange(num_keys) * key_stride + key_offset)[None, :]
    visible = (pos <= t) & ((pos > t - window) if window is not None else True)
    high = [x.detach().cpu().double().requires_grad_() for x in (q, k, v)]
    ref_o = reference.masked_attention(*high, visible, 0.125)
    ref_o.backward(do.cpu().double())
    assert_close(o, ref_o, torch.float32, "o")
    for name, a, b in zip("qkv", (q, k, v), high):
        assert_close(a.grad, b.grad, torch.float32, f"d{name}")
    unseen = ~visible.any(0)
    assert unseen.any()
    assert (k.grad.cpu()[:, unseen] == 0).all() and (v.grad.cpu()[:, unseen] == 0).all()


@pytest.mark.parametrize("splits", [2, 8])
def test_query_offset_dkdv_splits_do_not_change_results(splits: int, monkeypatch) -> None:
    """Split dK/dV key tiles with keys at negative positions (compressed and window branch)."""
    monkeypatch.setattr(banded_module, "_dkdv_splits", lambda *args: splits)
    test_compressed_query_offset("offset300-S-much-larger-than-T", torch.float32)
    test_window_query_offset("offset37-dk64-dv128", torch.float32)


def test_dkdv_splits_with_query_offset() -> None:
    """H100 shape, a shard of T=16k queries at 48k..64k: the window's unseen halo tiles do no
    work (no split). In the compressed branch every query sees all the key tiles of the halo
    (positions < 0), so the work is nearly uniform and needs at most 2 slices; counting the
    negative positions as queries (an unclamped range start) would ask for 4."""
    t, qo = 16384, 49152
    shape = dict(group=16, units=4, block_m=64, block_n=64, num_sms=132)
    assert banded_module._dkdv_splits(t, qo + t, 1, -qo, 512, **shape) == 1
    assert banded_module._dkdv_splits(t, (qo + t - L) // D + 1, D, L - 1 - qo, t + qo - L + 1, **shape) <= 2
