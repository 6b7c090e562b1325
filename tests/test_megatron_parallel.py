"""NSA in Megatron-core over two gloo ranks: TP=2 equals TP=1, phi's sharded state dict is split by
KV group, and bad head/group splits fail clearly. (Sequence parallelism is not tested here: without
apex, Megatron's torch norms refuse sequence_parallel.)"""
import os
import tempfile
import warnings

import pytest
import torch

pytest.importorskip("megatron.core")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402


def _setup(rank: int, world: int, init_file: str, tp: int) -> None:
    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)


def _model(tp: int, seed: int, **kw):
    from test_megatron_layer import tiny_config, tiny_gpt
    torch.manual_seed(seed)
    return tiny_gpt(tiny_config(tensor_model_parallel_size=tp, **kw), "none")


def _loss_and_grads(model) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    from test_megatron_layer import SEQ, learnable_batch
    tokens, labels = learnable_batch()
    model.zero_grad()
    loss = model(tokens, torch.arange(SEQ)[None].expand_as(tokens), None, labels=labels).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


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
    _setup(rank, 1, init_file, 1)
    model = _model(1, seed=0)
    loss, grads = _loss_and_grads(model)
    torch.save({"params": {n: p.detach() for n, p in model.named_parameters()}, "loss": loss, "grads": grads},
               os.path.join(tmp, "ref.pt"))


def _tp2(rank: int, init_file: str, tmp: str) -> None:
    _setup(rank, 2, init_file, 2)
    from nsa_parallel.megatron import NSASelfAttention, get_gpt_layer_nsa_spec
    from test_megatron_layer import TINY, tiny_config

    ref = torch.load(os.path.join(tmp, "ref.pt"))
    model = _model(2, seed=1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(_shard(model, ref["params"], rank, 2)[name])
    loss, grads = _loss_and_grads(model)
    torch.testing.assert_close(loss, ref["loss"], rtol=1e-5, atol=1e-6)
    for name, g in _shard(model, ref["grads"], rank, 2).items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=f"grad {name}")
    # phi shards with its KV groups. Global dims: (layer, group, ...); this rank holds group `rank`.
    w1 = model.sharded_state_dict()["decoder.layers.0.self_attention.compress_k.w1"]
    assert w1.global_shape[:2] == (2, 2) and w1.local_shape[0] == 1 and w1.global_offset[:2] == (0, rank)

    # heads/groups that do not split over the TP group: a ValueError naming the field
    spec = get_gpt_layer_nsa_spec(TINY, backend="reference").submodules.self_attention
    for heads, groups, field in ((6, 3, "num_query_groups"), (3, 1, "num_attention_heads")):
        with pytest.raises(ValueError, match=field):
            NSASelfAttention(tiny_config(num_attention_heads=heads, num_query_groups=groups),
                             spec.submodules, layer_number=1, **spec.params)
    dist.barrier()


def test_tp2_matches_tp1_and_shards_phi_by_kv_group():
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    old_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (tests_dir, old_path) if p)  # spawned ranks import helpers
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for fn, world in ((_tp1_reference, 1), (_tp2, 2)):
                mp.spawn(fn, args=(tempfile.mktemp(dir=tmp), tmp), nprocs=world, join=True)
    finally:
        os.environ["PYTHONPATH"] = old_path
