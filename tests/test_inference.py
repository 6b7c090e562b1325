"""Decoding: a prefilled prompt then one token at a time equals one training forward over the whole
sequence (``nsa_core``, what every layer calls); batched sequences of different lengths equal
each decoded alone; the decode kernels equal the decode reference; bad input is a clear error."""
import copy

import pytest
import torch

from conftest import DEVICE, KERNEL_DTYPES, TOLERANCE, gpu, rel_err
from nsa_parallel.compression import BlockCompressor
from nsa_parallel.config import NSAConfig
from nsa_parallel.core import KV, BranchKV, Compressors, nsa_core
from nsa_parallel.inference import NSAKVCache, decode, prefill
from nsa_parallel.inference.attention import reference_decode
from nsa_parallel.rotary import rotary_angles
from nsa_kernels import decode as decode_kernels

# Boundaries at multiples of d=4, l=8, l'=16 and w=24.
CFG = NSAConfig(compress_block_size=8, compress_stride=4, select_block_size=16, num_selected_blocks=4, window_size=24)
# A compression block longer than a selection block; a window that is a multiple of nothing.
CFG_WIDE = NSAConfig(compress_block_size=12, compress_stride=4, select_block_size=8, num_selected_blocks=3,
                     window_size=5)


def make_inputs(cfg: NSAConfig, batch: int, seq: int, heads: int = 4, groups: int = 2, dk: int = 16, dv: int = 16,
                seed: int = 0) -> dict:
    """One layer's tensors after its projections (float64, CPU) and its two ``phi``."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    torch.manual_seed(seed)
    return dict(q=randn(batch, seq, heads, dk), gate_logits=randn(batch, seq, heads, 3),
                kv=BranchKV(*(KV(randn(batch, seq, groups, dk), randn(batch, seq, groups, dv)) for _ in range(3))),
                phi=Compressors(BlockCompressor(groups, dk, cfg, dtype=torch.float64),
                                BlockCompressor(groups, dv, cfg, dtype=torch.float64)))


def cast(inp: dict, dtype: torch.dtype, device=DEVICE, rows=slice(None)) -> dict:
    """The inputs of batch ``rows`` in ``dtype`` on ``device`` (phi copied)."""
    def move(t):
        return t[rows].to(device, dtype)

    return dict(q=move(inp["q"]), gate_logits=move(inp["gate_logits"]), kv=inp["kv"].map(move),
                phi=Compressors(*(copy.deepcopy(phi).to(device, dtype) for phi in inp["phi"])))


def forward(inp: dict, cfg: NSAConfig) -> torch.Tensor:
    """The training path over the whole sequence, float64 reference: ``[B, T, H, dv]``."""
    rotary = rotary_angles(torch.arange(inp["q"].shape[1]), inp["q"].shape[-1])
    with torch.no_grad():
        return nsa_core(inp["q"], inp["kv"], inp["gate_logits"], inp["phi"], cfg, rotary=rotary, backend="reference")


def generate(inp: dict, cfg: NSAConfig, lengths: list[int], steps: int, backend: str,
             capacity: int | None = None) -> list[torch.Tensor]:
    """Prefills sequence ``b`` with its first ``lengths[b]`` tokens (right-padded batch), then decodes
    ``steps`` tokens per sequence together; returns each sequence's outputs ``[lengths[b]+steps, H, dv]``."""
    q = inp["q"]
    batch, total, _, dk = q.shape
    groups, dv = inp["kv"].cmp.v.shape[2:]
    capacity = capacity or total
    cache = NSAKVCache(cfg, batch, capacity, groups, dk, dv, device=q.device, dtype=q.dtype)
    rotary = rotary_angles(torch.arange(capacity, device=q.device), dk)
    prompt = max(lengths)

    def at(idx):  # row b's token idx[b]: [B, 1, ...]
        def rows(t):
            return t[torch.arange(batch, device=q.device), idx][:, None]
        return rows(q), inp["kv"].map(rows), rows(inp["gate_logits"])

    lens = torch.tensor(lengths, device=q.device)
    first = prefill(cache, q[:, :prompt], inp["kv"].map(lambda t: t[:, :prompt]), inp["gate_logits"][:, :prompt],
                    inp["phi"], rotary, lengths=lens, backend=backend)
    outs = [decode(cache, *at(lens + step), inp["phi"], rotary, backend=backend) for step in range(steps)]
    decoded = torch.cat(outs, dim=1) if outs else first[:, :0]
    return [torch.cat([first[b, :n], decoded[b]]) for b, n in enumerate(lengths)]


def worst_token_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest per-token relative error ``||out_t - ref_t|| / ||ref_t||`` over tokens ``[T, H, dv]``."""
    return max(rel_err(o, r) for o, r in zip(out, ref))


def boundary_prompts(cfg: NSAConfig, total: int) -> list[int]:
    """Prompt lengths at multiples of d, l, l' and w, plus and minus one, and all shorter than ``l``."""
    sizes = (cfg.compress_stride, cfg.compress_block_size, cfg.select_block_size, cfg.window_size)
    around = {m * s + e for s in sizes for m in (1, 2, 3) for e in (-1, 0, 1)}
    return sorted({p for p in around | set(range(1, cfg.compress_block_size)) if 0 < p < total})


@pytest.mark.parametrize("cfg", [CFG, CFG_WIDE], ids=["l8-d4-ls16-w24", "l12-d4-ls8-w5"])
def test_reference_decode_equals_forward(cfg):
    """float64: every prompt length around a boundary, then decoding up to T (every later position
    is decoded once from some prompt), in a cache larger than the sequence."""
    total = 3 * max(cfg.select_block_size, cfg.window_size) + 2
    inp = make_inputs(cfg, 2, total)
    ref = forward(inp, cfg)
    for prompt in boundary_prompts(cfg, total):
        outs = generate(inp, cfg, [prompt, prompt], total - prompt, "reference", capacity=total + 13)
        for b, out in enumerate(outs):
            err = worst_token_error(out, ref[b])
            assert err <= 1e-9, f"prompt {prompt}, sequence {b}: worst token error {err:.2e}"


@pytest.mark.parametrize("prompt,total", [(5, 9), (15, 18), (23, 26)])
def test_triton_decode_equals_forward(prompt, total, monkeypatch):
    """float32 Triton (prefill through the training kernels, then the decode kernels) against the
    float64 reference forward. Decoding crosses the first finished compression block (position 7),
    a new selection block (16) and the window ring's wrap (24)."""
    monkeypatch.setattr(decode_kernels, "BLOCK_N", 16)
    inp = make_inputs(CFG, 2, total, seed=1)
    ref = forward(inp, CFG)
    outs = generate(cast(inp, torch.float32), CFG, [prompt, prompt], total - prompt, "triton")
    for b, out in enumerate(outs):
        err = worst_token_error(out, ref[b])
        assert err <= 1e-5, f"sequence {b}: worst token error {err:.2e}"


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_batched_equals_alone(backend, monkeypatch):
    """Three sequences of different prompt lengths decoded together equal each decoded alone."""
    monkeypatch.setattr(decode_kernels, "BLOCK_N", 16)
    lengths, steps = [5, 17, 12], (10 if backend == "reference" else 2)
    dtype, device, tol = (torch.float64, "cpu", 1e-12) if backend == "reference" else (torch.float32, DEVICE, 1e-6)
    inp = make_inputs(CFG, 3, max(lengths) + steps, seed=2)
    together = generate(cast(inp, dtype, device), CFG, lengths, steps, backend)
    for b, n in enumerate(lengths):
        alone = generate(cast(inp, dtype, device, slice(b, b + 1)), CFG, [n], steps, backend)[0]
        assert together[b].shape == alone.shape
        err = worst_token_error(together[b], alone)
        assert err <= tol, f"sequence {b}: {err:.2e}"


@pytest.mark.parametrize("cfg", [CFG, CFG_WIDE], ids=["l8-d4-ls16-w24", "l12-d4-ls8-w5"])
@pytest.mark.parametrize("splits", [None, (1, 1, 1), (3, 2, 2)])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_decode_kernels_match_reference(cfg, splits, dtype, monkeypatch):
    """nsa_decode against reference_decode (float64, same rounded inputs) on one random cache:
    outputs and chosen blocks, for sequences with no compressed block yet, one, many, and a full
    cache; one split per branch and several (compressed tiles of 16 rows). 16-bit caches take TMA
    tiles (under the interpreter too; l'=8 selected blocks are gathered), float32 gathers."""
    monkeypatch.setattr(decode_kernels, "BLOCK_N", 16)
    seq, heads, groups, dk, dv = 200, 4, 2, 16, 32
    lengths = torch.tensor([1, cfg.compress_block_size - 1, cfg.compress_block_size, 77, seq], device=DEVICE)
    gen = torch.Generator().manual_seed(3)
    rows = (cfg.num_compressed(seq), seq, min(cfg.window_size, seq))
    caches = [torch.randn(len(lengths), n, groups, d, generator=gen) for n in rows for d in (dk, dv)]
    q, gates = torch.randn(len(lengths), heads, dk, generator=gen), torch.rand(len(lengths), heads, 3, generator=gen)
    q, gates, caches = q.to(dtype), gates.to(dtype), [c.to(dtype) for c in caches]
    ref, ref_blocks = reference_decode(q.double(), gates.double(), *(c.double() for c in caches), lengths.cpu(), cfg,
                                       0.3)
    out, blocks = decode_kernels.nsa_decode(
        q.to(DEVICE), gates.to(DEVICE), *(c.to(DEVICE) for c in caches), lengths,
        compress_block_size=cfg.compress_block_size, compress_stride=cfg.compress_stride,
        select_block_size=cfg.select_block_size, num_selected=cfg.num_selected_blocks, scale=0.3, splits=splits,
        return_blocks=True)
    assert torch.equal(blocks.cpu(), ref_blocks)
    assert worst_token_error(out, ref) <= TOLERANCE[dtype]


def test_decode_exact_ties_prefer_lower_ids(monkeypatch):
    """As in the training kernel's test: l = d and l' = 2d with zero compressed keys, so every fully
    seen block scores exactly the same in any summation order; the lowest ids must win."""
    monkeypatch.setattr(decode_kernels, "BLOCK_N", 16)
    cfg = NSAConfig(compress_block_size=8, compress_stride=8, select_block_size=16, num_selected_blocks=5)
    seq, lengths = 200, torch.tensor([70, 128, 129, 200], device=DEVICE)
    gen = torch.Generator().manual_seed(7)
    caches = [torch.randn(4, n, 2, 16, generator=gen) for n in (cfg.num_compressed(seq),) * 2 + (seq,) * 2
              + (cfg.window_size,) * 2]
    caches[0].zero_()
    q, gates = torch.randn(4, 4, 16, generator=gen), torch.rand(4, 4, 3, generator=gen)
    _, ref_blocks = reference_decode(q.double(), gates.double(), *(c.double() for c in caches), lengths.cpu(), cfg,
                                     0.25)
    _, blocks = decode_kernels.nsa_decode(
        q.to(DEVICE), gates.to(DEVICE), *(c.to(DEVICE) for c in caches), lengths, compress_block_size=8,
        compress_stride=8, select_block_size=16, num_selected=5, scale=0.25, return_blocks=True)
    own = (lengths.cpu() - 1) // 16  # forced 0, own - 1, own; blocks 1 and 2 fill the free slots
    expected = torch.stack([0 * own, 0 * own + 1, 0 * own + 2, own - 1, own], -1)[:, None].expand(-1, 2, -1)
    assert torch.equal(ref_blocks, expected)
    assert torch.equal(blocks.cpu(), expected)


def test_dense_decode_matches_reference(monkeypatch):
    """The benchmark's split-K dense baseline: causal attention over each sequence's rows."""
    from nsa_parallel import reference

    monkeypatch.setattr(decode_kernels, "BLOCK_N", 16)
    gen = torch.Generator().manual_seed(4)
    k, v = torch.randn(3, 70, 2, 16, generator=gen), torch.randn(3, 70, 2, 16, generator=gen)
    q, lengths = torch.randn(3, 4, 16, generator=gen), torch.tensor([1, 33, 70])
    seen = (torch.arange(70)[None, :] < lengths[:, None])[:, None, None, :]
    ref = reference.masked_attention(q.double()[:, None], k.double(), v.double(), seen, 0.25)[:, 0]
    out = decode_kernels.dense_decode(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), lengths.to(DEVICE), scale=0.25,
                                      splits=3)
    assert worst_token_error(out, ref) <= 1e-5


def test_bytes_per_sequence():
    cache = NSAKVCache(CFG, 2, 100, 2, 16, 8)
    per = cache.bytes_per_sequence()
    token = 2 * (16 + 8) * 4  # G * (dk + dv) * float32
    assert CFG.num_compressed(100) == 24
    assert per == {"selection": 100 * token, "window": 24 * token, "compressed": 24 * token,
                   "raw_block": 8 * token, "lengths": 8, "total": (100 + 24 + 24 + 8) * token + 8}


def test_errors_name_the_rule_and_change_nothing():
    cfg = CFG
    inp = make_inputs(cfg, 3, 20)
    cache = NSAKVCache(cfg, 2, 16, 2, 16, dtype=torch.float64)
    rotary = rotary_angles(torch.arange(20), 16)

    def prompt(batch, length, **kw):
        return prefill(cache, inp["q"][:batch, :length], inp["kv"].map(lambda t: t[:batch, :length]),
                       inp["gate_logits"][:batch, :length], inp["phi"], rotary, backend="reference", **kw)

    def step(batch, t, **kw):
        return decode(cache, inp["q"][:batch, t:t + 1], inp["kv"].map(lambda x: x[:batch, t:t + 1]),
                      inp["gate_logits"][:batch, t:t + 1], inp["phi"], rotary, backend="reference", **kw)

    with pytest.raises(RuntimeError, match=r"call prefill\(\) first"):
        step(2, 0)
    with pytest.raises(ValueError, match=r"batch \(3\) must be at most max_batch \(2\)"):
        prompt(3, 4)
    with pytest.raises(ValueError, match=r"prompt length \(17\) must be at most max_seq_len \(16\)"):
        prompt(2, 17)
    with pytest.raises(ValueError, match=r"lengths \(\[3, 9\]\) must lie in 0 \.\. 8"):
        prompt(2, 8, lengths=torch.tensor([3, 9]))
    assert cache.batch_size is None and not cache.lengths.any(), "a refused prefill changed the cache"

    prompt(2, 15)
    with pytest.raises(ValueError, match=r"decode batch \(1\) must equal the prefilled batch \(2\)"):
        step(1, 15)
    with pytest.raises(ValueError, match="run_phi=False, but this step finishes a compression block"):
        step(2, 15, run_phi=False)  # blocks end at positions 7, 11, 15, ...
    assert cache.lengths.tolist() == [15, 15], "a refused step changed the cache"
    step(2, 15)
    with pytest.raises(ValueError, match=r"a sequence of 16 tokens cannot grow: max_seq_len \(16\)"):
        step(2, 16)
    cache.reset()
    with pytest.raises(RuntimeError, match=r"call prefill\(\) first \(after reset\(\) too\)"):
        step(2, 0)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_decode_paper_settings(dtype):
    """The paper's block sizes (l=32, d=16, l'=64, n=16, w=512), 16 heads in 2 groups, d=128: decoding
    from 1030 (and 1013) to 1100 tokens (new selection block at 1088) against the float64 reference
    forward, within the dtype's tolerance or, where the training path itself (the Triton forward
    in the same dtype, same inputs) is further off, within twice its error: in bf16 a near-tie
    can choose another block in either path."""
    cfg, steps = NSAConfig(), 70
    lengths = [1030, 1013]
    inp = make_inputs(cfg, 2, max(lengths) + steps, heads=16, groups=2, dk=128, dv=128, seed=5)
    ref = forward(inp, cfg)
    low = cast(inp, dtype, "cuda")
    rotary = rotary_angles(torch.arange(ref.shape[1], device="cuda"), 128)
    with torch.no_grad():
        train = nsa_core(low["q"], low["kv"], low["gate_logits"], low["phi"], cfg, rotary=rotary, backend="triton")
    outs = generate(low, cfg, lengths, steps, "triton")
    for b, (out, n) in enumerate(zip(outs, lengths)):
        err = rel_err(out[n:], ref[b, n:n + steps])
        train_err = rel_err(train[b, n:n + steps], ref[b, n:n + steps])
        assert err <= max(TOLERANCE[dtype], 2 * train_err), f"sequence {b}: {err:.2e} (training path {train_err:.2e})"


@gpu
def test_cuda_graph_decode_step():
    """One decode step (append, phi, the five decode kernels) captured in a CUDA graph and replayed
    equals the same steps run eagerly on a twin cache, bit for bit; the device lengths advance."""
    cfg = NSAConfig()
    total, prompt, steps = 1200, 1000, 20
    inp = cast(make_inputs(cfg, 2, total, heads=16, groups=2, dk=128, dv=128, seed=6), torch.bfloat16, "cuda")
    rotary, phi = rotary_angles(torch.arange(total, device="cuda"), 128), inp["phi"]
    caches = [NSAKVCache(cfg, 2, total, 2, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    lengths = torch.tensor([prompt, prompt - 37], device="cuda")
    for cache in caches:
        prefill(cache, inp["q"][:, :prompt], inp["kv"].map(lambda t: t[:, :prompt]), inp["gate_logits"][:, :prompt],
                phi, rotary, lengths=lengths, backend="triton")
    eager, graphed = caches

    def token(step):
        idx = (lengths + step, torch.arange(2, device="cuda"))
        pick = lambda t: t[idx[1], idx[0]][:, None]  # noqa: E731
        return pick(inp["q"]), inp["kv"].map(pick), pick(inp["gate_logits"])

    static_q, static_kv, static_g = token(0)
    static_q, static_g = static_q.clone(), static_g.clone()
    static_kv = static_kv.map(torch.clone)
    # Warm-up (compiles every kernel) on the eager cache, on a side stream as torch.cuda.graph asks.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        expected = [decode(eager, *token(0), phi, rotary, backend="triton", run_phi=True)]
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = decode(graphed, static_q, static_kv, static_g, phi, rotary, backend="triton", run_phi=True)
    got = []
    for step in range(steps):
        q, kv, g = token(step)
        static_q.copy_(q), static_g.copy_(g)
        for static, new in zip((t for pair in static_kv for t in pair), (t for pair in kv for t in pair)):
            static.copy_(new)
        graph.replay()
        got.append(static_out.clone())
        if step:
            expected.append(decode(eager, q, kv, g, phi, rotary, backend="triton", run_phi=True))
    torch.cuda.synchronize()
    for step, (a, b) in enumerate(zip(got, expected)):
        assert torch.equal(a, b), f"step {step}: graph replay differs from eager"
    graphed.sync_host_lengths()
    assert graphed.lengths.tolist() == eager.lengths.tolist() == (lengths + steps).tolist()
