"""Context-parallel NSA on gloo ranks equals single-rank NSA on the full sequence (float64).

Each case shards one sequence over P ranks (contiguous and zigzag), runs
``NativeSparseAttention(x_local, cp_group=...)`` and compares the output, the
input gradient and every parameter gradient (summed over ranks) with the
single-process reference run, to 1e-9.
"""
import os
import tempfile
import zlib
from dataclasses import dataclass, field

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nsa_parallel import NativeSparseAttention, NSAConfig
from nsa_parallel.context_parallel import ShardLayout, ring_attention_bytes

TOL = 1e-9
HIDDEN = 32


@dataclass(frozen=True)
class Case:
    name: str
    world: int
    layout: str
    seq: int
    config: NSAConfig
    heads: int = 4
    groups: int = 2
    dk: int = 8
    dv: int = 6
    batch: int = 2
    shared_kv: bool = False
    zero_queries: bool = False  # q_proj = 0: every score ties, so every query picks the lowest blocks
    extra: dict = field(default_factory=dict, compare=False)


SMALL = NSAConfig(compress_block_size=16, compress_stride=8, select_block_size=16, num_selected_blocks=4,
                  window_size=40)
CASES = [
    # chunks of 128 / 64 tokens: windows, compression blocks and selected blocks straddle rank boundaries
    Case("p2-contiguous", 2, "contiguous", 256, SMALL),
    Case("p2-zigzag", 2, "zigzag", 256, SMALL),
    # group size 1, dk != dv, one K/V for all branches, compression blocks that do not overlap (l == d)
    Case("p2-zigzag-mha-shared", 2, "zigzag", 192, NSAConfig(8, 8, 16, 5, 24), heads=3, groups=3, dk=10, dv=4,
         shared_kv=True),
    # chunks (32 tokens) shorter than the window (40): the halo spans two owners
    Case("p4-contiguous", 4, "contiguous", 256, SMALL),
    Case("p4-zigzag", 4, "zigzag", 256, SMALL),
    # just long enough: one selection block per chunk; more selected blocks than exist
    Case("p4-zigzag-minimal", 4, "zigzag", 128, NSAConfig(16, 8, 16, 16, 40), groups=1),
    Case("p4-contiguous-minimal", 4, "contiguous", 64, NSAConfig(16, 8, 16, 3, 16), heads=8, groups=2, batch=1),
    # compression blocks longer than a chunk; every query selects the same low blocks
    Case("p4-contiguous-ties", 4, "contiguous", 128, NSAConfig(48, 16, 32, 3, 8), zero_queries=True),
]


def _model(case: Case) -> NativeSparseAttention:
    torch.manual_seed(0)
    model = NativeSparseAttention(HIDDEN, case.heads, case.groups, case.dk, case.dv, case.config,
                                  backend="reference", shared_kv=case.shared_kv, dtype=torch.float64)
    if case.zero_queries:
        with torch.no_grad():
            model.q_proj.weight.zero_()
    return model


def _reference(case: Case) -> dict:
    """Single-rank NSA on the full sequence: output and gradients for a fixed upstream gradient."""
    gen = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    x = torch.randn(case.batch, case.seq, HIDDEN, dtype=torch.float64, generator=gen, requires_grad=True)
    grad_out = torch.randn(case.batch, case.seq, HIDDEN, dtype=torch.float64, generator=gen)
    model = _model(case)
    out = model(x)
    out.backward(grad_out)
    return {"x": x.detach(), "grad_out": grad_out, "out": out.detach(), "grad_x": x.grad,
            "grads": {n: p.grad for n, p in model.named_parameters()}}


def _init(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)


def _check_case(case: Case, ref: dict, rank: int) -> None:
    model = _model(case)
    positions = ShardLayout(case.layout, case.world, case.seq).local_positions(rank)
    x = ref["x"][:, positions].clone().requires_grad_()
    out = model(x, cp_group=dist.group.WORLD, cp_layout=case.layout)
    out.backward(ref["grad_out"][:, positions])
    torch.testing.assert_close(out, ref["out"][:, positions], rtol=0, atol=TOL,
                               msg=lambda m: f"{case.name} rank {rank} output: {m}")
    torch.testing.assert_close(x.grad, ref["grad_x"][:, positions], rtol=0, atol=TOL,
                               msg=lambda m: f"{case.name} rank {rank} input grad: {m}")
    for name, p in model.named_parameters():
        grad = p.grad.clone()
        dist.all_reduce(grad)
        torch.testing.assert_close(grad, ref["grads"][name], rtol=TOL, atol=TOL,
                                   msg=lambda m: f"{case.name} rank {rank} grad {name}: {m}")


def _run_cases(rank: int, world: int, init_file: str, cases: list, refs: list) -> None:
    _init(rank, world, init_file)
    try:
        for case, ref in zip(cases, refs):
            _check_case(case, ref, rank)
    finally:
        dist.destroy_process_group()


def _spawn(fn, world: int, *args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(fn, args=(world, os.path.join(tmp, "init"), *args), nprocs=world)


@pytest.mark.parametrize("world", [2, 4])
def test_matches_single_rank(world):
    cases = [c for c in CASES if c.world == world]
    _spawn(_run_cases, world, cases, [_reference(c) for c in cases])


# --- communication accounting -------------------------------------------------

COUNT_CASE = Case("count", 2, "contiguous", 128, NSAConfig(16, 8, 16, 8, 24), batch=2)


def _expected_bytes(case: Case, rank: int) -> dict[str, tuple[int, int]]:
    """Forward (sent, received) bytes by hand for ``COUNT_CASE``: 8 blocks of 16 and n = 8, so
    rank 1's queries select all 4 of rank 0's blocks for every batch row and group."""
    cfg, f64 = case.config, 8
    token = case.batch * case.groups * (case.dk + case.dv) * f64  # one position's K and V, all rows and groups
    halo = ((cfg.window_size - 1) + (cfg.compress_block_size - cfg.compress_stride)) * token
    cmp0 = cfg.num_compressed(64)  # blocks ending in rank 0's tokens
    cmp1 = cfg.num_compressed(128) - cmp0
    blocks = case.batch * case.groups * 4 * cfg.select_block_size * (case.dk + case.dv) * f64
    ids = (1 + case.batch * case.groups * 4) * 8  # one count, then the block ids, int64
    if rank == 0:
        return {"halo": (halo, 0), "compressed": (cmp0 * token, cmp1 * token), "blocks": (blocks, 0),
                "requests": (8, ids)}
    return {"halo": (0, halo), "compressed": (cmp1 * token, cmp0 * token), "blocks": (0, blocks),
            "requests": (ids, 8)}


def _run_counters(rank: int, world: int, init_file: str, ref: dict) -> None:
    _init(rank, world, init_file)
    try:
        _check_case(COUNT_CASE, ref, rank)
        model = _model(COUNT_CASE)
        positions = ShardLayout("contiguous", world, COUNT_CASE.seq).local_positions(rank)
        model(ref["x"][:, positions], cp_group=dist.group.WORLD, cp_layout="contiguous").sum().backward()
        stats = model.comm_stats
        for category, (sent, received) in _expected_bytes(COUNT_CASE, rank).items():
            assert stats.sent["forward", category] == sent, (rank, category, dict(stats.sent))
            assert stats.received["forward", category] == received, (rank, category, dict(stats.received))
            if category != "requests":  # gradients go back the way the data came
                assert stats.sent["backward", category] == received, (rank, category)
                assert stats.received["backward", category] == sent, (rank, category)
    finally:
        dist.destroy_process_group()


def test_comm_counters_match_hand_count():
    _spawn(_run_counters, 2, _reference(COUNT_CASE))


def test_ring_attention_bytes():
    # 2 ranks, 1024 tokens, batch 1, 2 KV heads, dk = dv = 8, fp64: one half of the K/V per direction
    fwd = ring_attention_bytes(1024, 2, 1, 2, 8, 8, 8)
    assert fwd == {"forward": 512 * 2 * 16 * 8, "backward": 2 * 512 * 2 * 16 * 8}


# --- bad input: every rank raises the same clear error, nobody hangs ----------

def _run_bad_input(rank: int, world: int, init_file: str) -> None:
    _init(rank, world, init_file)
    try:
        model = NativeSparseAttention(HIDDEN, 4, 2, 8, config=SMALL, backend="reference", dtype=torch.float64)
        # zigzag over 2 ranks needs a multiple of 4 chunks x 16 = 64 tokens
        with pytest.raises(ValueError, match=r"sequence length \(160\) must be divisible by 4 chunks"):
            model(torch.randn(1, 80, HIDDEN, dtype=torch.float64), cp_group=dist.group.WORLD, cp_layout="zigzag")
        with pytest.raises(ValueError, match="cp_layout"):
            model(torch.randn(1, 64, HIDDEN, dtype=torch.float64), cp_group=dist.group.WORLD, cp_layout="ring")
        # ranks disagree on the local length (data sliced for another group size)
        x = torch.randn(1, 64 if rank == 0 else 32, HIDDEN, dtype=torch.float64)
        with pytest.raises(ValueError, match="differently shaped local queries"):
            model(x, cp_group=dist.group.WORLD)
        # and the group is still usable afterwards
        model(torch.randn(1, 64, HIDDEN, dtype=torch.float64), cp_group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def test_bad_input_raises_on_every_rank():
    _spawn(_run_bad_input, 2)


# --- the Triton kernels inside the context-parallel path: interpreter on gloo, or 2 GPUs on NCCL ----

def _run_triton(rank: int, world: int, init_file: str, case: Case, ref: dict) -> None:
    from conftest import ON_GPU, assert_close
    if ON_GPU:
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world)
    else:
        _init(rank, world, init_file)
    device = torch.device("cuda", rank) if ON_GPU else torch.device("cpu")
    try:
        torch.manual_seed(0)
        model = NativeSparseAttention(HIDDEN, case.heads, case.groups, case.dk, case.dv, case.config,
                                      backend="triton", dtype=torch.float64).to(device, torch.float32)
        positions = ShardLayout(case.layout, world, case.seq).local_positions(rank)
        x = ref["x"][:, positions].to(device, torch.float32).requires_grad_()
        out = model(x, cp_group=dist.group.WORLD, cp_layout=case.layout)
        out.backward(ref["grad_out"][:, positions].to(device, torch.float32))
        assert_close(out, ref["out"][:, positions], torch.float32, f"rank {rank} output")
        assert_close(x.grad, ref["grad_x"][:, positions], torch.float32, f"rank {rank} input grad")
        for name, p in model.named_parameters():
            grad = p.grad.clone()
            dist.all_reduce(grad)
            assert_close(grad, ref["grads"][name], torch.float32, f"rank {rank} grad {name}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2,
                    reason="on GPUs this runs 2 NCCL ranks, one GPU each; this machine has one")
def test_triton_kernels_under_context_parallelism():
    """The kernels (Triton's interpreter without a GPU, compiled on 2 GPUs) inside the CP path, float32,
    against single-rank float64 NSA."""
    case = Case("p2-zigzag-triton", 2, "zigzag", 128, SMALL, batch=1)
    _spawn(_run_triton, 2, case, _reference(case))


# --- long sequence, concentrated selection: far less than ring attention -------------------------

LONG_CONFIG = NSAConfig(32, 16, 32, 4, 64)  # 4096 tokens: 128 selection blocks, 4 picked (3 forced)
LONG_SEQ, LONG_HEADS, LONG_GROUPS, LONG_DK, LONG_DV = 4096, 4, 2, 8, 6


def _mean_phi(x: torch.Tensor) -> torch.Tensor:
    """Compression by the mean of each block: a plain function, so the scores are easy to steer."""
    from nsa_parallel import reference
    return reference.unfold_blocks(x, LONG_CONFIG.compress_block_size, LONG_CONFIG.compress_stride).mean(3)


def _concentrated_inputs() -> tuple[torch.Tensor, ...]:
    """The whole sequence (alike on every rank): every query leans along one direction and only the keys
    of selection block 1 do too, so each query's one free pick is block 1 by a clear margin of score
    (noise everywhere: no two scores tie)."""
    gen = torch.Generator().manual_seed(7)
    direction = torch.randn(LONG_DK, generator=gen, dtype=torch.float64)
    q = direction + 0.1 * torch.randn(1, LONG_SEQ, LONG_HEADS, LONG_DK, generator=gen, dtype=torch.float64)
    k = 0.1 * torch.randn(1, LONG_SEQ, LONG_GROUPS, LONG_DK, generator=gen, dtype=torch.float64)
    block = LONG_CONFIG.select_block_size
    k[:, block:2 * block] += 2.0 * direction
    v = torch.randn(1, LONG_SEQ, LONG_GROUPS, LONG_DV, generator=gen, dtype=torch.float64)
    gates = torch.randn(1, LONG_SEQ, LONG_HEADS, 3, generator=gen, dtype=torch.float64)
    return q, k, v, gates


def _run_long(rank: int, world: int, init_file: str) -> None:
    from nsa_parallel.context_parallel import CommStats, ContextParallel
    from nsa_parallel.core import KV, BranchKV, Compressors, nsa_core
    _init(rank, world, init_file)
    try:
        positions = ShardLayout("contiguous", world, LONG_SEQ).local_positions(rank)
        q, k, v, gates = (t[:, positions].clone().requires_grad_() for t in _concentrated_inputs())
        stats = CommStats()
        out = nsa_core(q, BranchKV(*(KV(k, v),) * 3), gates, Compressors(_mean_phi, _mean_phi), LONG_CONFIG,
                       cp=ContextParallel(dist.group.WORLD, "contiguous", stats), backend="reference")
        out.sum().backward()
        sent, _ = stats.total()
        ring = ring_attention_bytes(LONG_SEQ, world, 1, LONG_GROUPS, LONG_DK, LONG_DV, 8)
        # halo (w-1 + l-d tokens), half the T/d compressed tokens and a few blocks, each way
        assert sent < (ring["forward"] + ring["backward"]) / 8, (rank, sent, ring, str(stats))
    finally:
        dist.destroy_process_group()


def test_comm_far_below_ring_when_selection_concentrates():
    """Scores that are not tied concentrate on one block: the fetch is a handful of blocks and the total
    stays under 1/8 of ring attention's bytes at 4096 tokens."""
    from nsa_parallel import reference
    q, k, _, _ = _concentrated_inputs()
    last = q[:, -256:]  # the queries of the last rank, which fetch from the first
    scores = reference.selection_scores(last, _mean_phi(k), LONG_CONFIG, LONG_DK ** -0.5, LONG_SEQ - 256)
    ranked = reference.selection_keys(scores, LONG_CONFIG, LONG_SEQ - 256).sort(-1, descending=True).values
    free, runner_up = ranked[..., 3], ranked[..., 4]  # after the 3 forced blocks (+inf keys)
    assert torch.isfinite(free).all() and (free > 2 * runner_up).all(), "block 1 must win on score, not by a tie"
    assert reference.top_blocks(scores, LONG_CONFIG, LONG_SEQ - 256)[..., :4].eq(1).any(-1).all()
    _spawn(_run_long, 2)
