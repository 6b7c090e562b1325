"""NSA in Megatron-core over two gloo ranks: TP=2, with and without sequence parallelism, equals TP=1;
phi starts as at TP=1 and its sharded state dict is split by KV group; bad head/group splits fail before any
allocation.

``setup_rank`` and ``spawn`` are shared with ``test_megatron_checkpoint.py``."""
import contextlib
import dataclasses
import os
import tempfile
import warnings
from collections.abc import Callable

import pytest
import torch

pytest.importorskip("megatron.core")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402


def setup_rank(rank: int, world: int, init_file: str, tp: int) -> None:
    """gloo process group and Megatron parallel state; Megatron's CUDA-only calls made CPU-safe."""
    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state, tensor_parallel
    # Sequence-parallel gathers/scatters and the checkpoint writer's status flag allocate on
    # torch.cuda.current_device(); every model here lives on the CPU.
    torch.cuda.current_device = lambda: torch.device("cpu")
    # Under sequence parallelism the embedding's dropout forks the model-parallel CUDA RNG
    # stream; dropout is 0 in these tests, so the fork has nothing to do.
    tensor_parallel.get_cuda_rng_tracker().fork = contextlib.nullcontext
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)


def spawn(fn: Callable[..., None], world: int, *args) -> None:
    """Runs ``fn(rank, init_file, *args)`` on ``world`` processes that can import the test helpers."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    old_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (tests_dir, old_path) if p)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(fn, args=(os.path.join(tmp, "init"), *args), nprocs=world, join=True)
    finally:
        os.environ["PYTHONPATH"] = old_path


class SequenceParallelLayerNorm(torch.nn.LayerNorm):
    """torch LayerNorm marking its parameters ``sequence_parallel`` as apex's and TE's norms do.

    Megatron's stock torch norm refuses ``sequence_parallel``; the fused norms it
    would use instead need apex or Transformer Engine, which CPU CI lacks.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        for p in self.parameters():
            p.sequence_parallel = config.sequence_parallel


def build_gpt(tp: int, seed: int, sequence_parallel: bool = False):
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from nsa_parallel.megatron import get_gpt_layer_nsa_spec
    from test_megatron_layer import TINY, tiny_config, tiny_gpt
    config = tiny_config(tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel)
    spec = None
    if sequence_parallel:
        layer = get_gpt_layer_nsa_spec(TINY, backend="reference")
        norms = dict(input_layernorm=SequenceParallelLayerNorm, pre_mlp_layernorm=SequenceParallelLayerNorm)
        layer = dataclasses.replace(layer, submodules=dataclasses.replace(layer.submodules, **norms))
        spec = TransformerBlockSubmodules(layer_specs=[layer] * config.num_layers,
                                          layer_norm=SequenceParallelLayerNorm)
    torch.manual_seed(seed)
    return tiny_gpt(config, "rope", spec=spec)


def _loss_and_grads(model) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from test_megatron_layer import SEQ, learnable_batch
    tokens, labels = learnable_batch()
    model.zero_grad()
    loss = model(tokens, torch.arange(SEQ)[None].expand_as(tokens), None, labels=labels).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _allreduce_sequence_parallel_grads(model, group) -> None:
    """What Megatron's ``finalize_model_grads`` does under SP: parameters applied to this rank's
    slice of the sequence (marked ``sequence_parallel``) have partial grads, summed over TP."""
    for p in model.parameters():
        if getattr(p, "sequence_parallel", False):
            dist.all_reduce(p.grad, group=group)


def _shard(model, full: dict[str, torch.Tensor], rank: int, tp: int) -> dict[str, torch.Tensor]:
    """This rank's slice of each full tensor, by Megatron's per-parameter TP attributes."""
    out = {}
    for name, p in model.named_parameters():
        t = full[name]
        if getattr(p, "tensor_model_parallel", False):
            t = t.chunk(tp, dim=p.partition_dim)[rank]
        out[name] = t
    return out


def _tp1_reference(rank: int, init_file: str, tmp: str) -> None:
    setup_rank(rank, 1, init_file, 1)
    model = build_gpt(1, seed=0)
    loss, grads = _loss_and_grads(model)
    torch.save({"params": {n: p.detach() for n, p in model.named_parameters()}, "loss": loss, "grads": grads},
               os.path.join(tmp, "ref.pt"))


def _tp2(rank: int, init_file: str, tmp: str) -> None:
    setup_rank(rank, 2, init_file, 2)
    from megatron.core import parallel_state

    from nsa_parallel.megatron import NSASelfAttention, get_gpt_layer_nsa_spec
    from test_megatron_layer import HUGE, TINY, tiny_config

    ref = torch.load(os.path.join(tmp, "ref.pt"))
    # Seeded as the TP=1 model was, phi starts as that model's phi, split by KV group.
    fresh = build_gpt(2, seed=0)
    for name, p in fresh.named_parameters():
        if ".compress_" in name:
            assert torch.equal(p, _shard(fresh, ref["params"], rank, 2)[name]), name
    for sequence_parallel in (False, True):
        model = build_gpt(2, seed=1, sequence_parallel=sequence_parallel)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(_shard(model, ref["params"], rank, 2)[name])
        loss, _ = _loss_and_grads(model)
        _allreduce_sequence_parallel_grads(model, parallel_state.get_tensor_model_parallel_group())
        torch.testing.assert_close(loss, ref["loss"], rtol=1e-5, atol=1e-6)
        for name, g in _shard(model, ref["grads"], rank, 2).items():
            torch.testing.assert_close(dict(model.named_parameters())[name].grad, g, rtol=1e-4, atol=1e-6,
                                       msg=f"grad {name} (sequence_parallel={sequence_parallel})")
        if sequence_parallel:
            # phi and the gate bias act after linear_kv/linear_gate gathered the whole sequence,
            # so their grads were already complete: the SP all-reduce must leave them alone.
            attention = model.decoder.layers[0].self_attention
            full_sequence = [*attention.core_attention.parameters(), attention.linear_gate.bias]
            assert not any(getattr(p, "sequence_parallel", False) for p in full_sequence)
    # phi shards with its KV groups. Global dims: (layer, group, ...); this rank holds group `rank`. It lives in
    # core_attention; in checkpoints it keeps its key from before it moved there.
    w1 = model.sharded_state_dict()["decoder.layers.0.self_attention.core_attention.compress_k.w1"]
    assert w1.key == "decoder.layers.self_attention.compress_k.w1"
    assert w1.global_shape[:2] == (2, 2) and w1.local_shape[0] == 1 and w1.global_offset[:2] == (0, rank)

    # Heads/groups that do not split over the TP group: a ValueError naming the field, raised
    # before any layer is built (no layer of hidden size HUGE could be allocated).
    spec = get_gpt_layer_nsa_spec(TINY, backend="reference").submodules.self_attention
    for heads, groups, field in ((6, 3, "num_query_groups"), (3, 1, "num_attention_heads")):
        with pytest.raises(ValueError, match=field):
            NSASelfAttention(tiny_config(hidden_size=HUGE, num_attention_heads=heads, num_query_groups=groups),
                             spec.submodules, layer_number=1, **spec.params)
    dist.barrier()


@pytest.mark.timeout(300)
def test_tp2_and_sequence_parallel_match_tp1_and_shard_phi_by_kv_group():
    with tempfile.TemporaryDirectory() as tmp:
        spawn(_tp1_reference, 1, tmp)
        spawn(_tp2, 2, tmp)
