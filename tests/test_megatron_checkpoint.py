"""Megatron distributed checkpoints of a GPT model with NSA attention change TP size: saved at TP=2,
loaded at TP=1, saved again and loaded at TP=2 (two gloo ranks, CPU, float32), weights exact and
logits the same at every hop."""
import os
import tempfile

import pytest
import torch

pytest.importorskip("megatron.core")

import torch.distributed as dist  # noqa: E402

from test_megatron_parallel import spawn  # noqa: E402


def _cpu_checkpoint_writer() -> None:
    """Megatron's ``torch_dist`` writer (megatron-core 0.16 to 0.19) on a CPU-only torch: it copies
    tensors to the host with ``non_blocking=True`` and then calls ``torch.cuda.synchronize()``, a
    no-op for CPU tensors that raises without CUDA. (``setup_rank`` already points
    ``torch.cuda.current_device``, which the writer's status flag uses, at the CPU.)"""
    torch.cuda.synchronize = lambda device=None: None


def _logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits: the output layer leaves them split over TP ranks."""
    from megatron.core import tensor_parallel
    positions = torch.arange(tokens.shape[1])[None].expand_as(tokens)
    with torch.no_grad():
        return tensor_parallel.gather_from_tensor_model_parallel_region(model(tokens, positions, None))


def _save(model, directory: str) -> None:
    from megatron.core import dist_checkpointing
    os.makedirs(directory, exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), directory)


def _load(model, directory: str) -> None:
    from megatron.core import dist_checkpointing
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), directory))


def _assert_same_weights(tp1_model, tp2_model, tp_rank: int) -> None:
    """Every TP=2 parameter equals its slice of the TP=1 one, bit for bit."""
    tp1 = dict(tp1_model.named_parameters())
    for name, p in tp2_model.named_parameters():
        full = tp1[name].detach()
        if getattr(p, "tensor_model_parallel", False):
            full = full.chunk(2, dim=p.partition_dim)[tp_rank]
        assert torch.equal(p.detach(), full), name


def _round_trip(rank: int, init_file: str, tmp: str) -> None:
    from megatron.core import dist_checkpointing, parallel_state

    from conftest import assert_close, rel_err
    from test_megatron_layer import learnable_batch
    from test_megatron_parallel import build_gpt, setup_rank
    setup_rank(rank, 2, init_file, 2)
    _cpu_checkpoint_writer()
    tokens, _ = learnable_batch()

    def retile(tp: int) -> None:
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)

    saved_tp2 = build_gpt(2, seed=0)
    expected = _logits(saved_tp2, tokens)
    _save(saved_tp2, os.path.join(tmp, "tp2"))
    # The checkpoint holds global tensors: phi of both KV groups of both layers, whatever the TP size.
    metadata = dist_checkpointing.load_tensors_metadata(os.path.join(tmp, "tp2"))
    w1 = metadata["decoder.layers.self_attention.compress_k.w1"]
    assert w1.global_shape[:2] == (2, 2), w1.global_shape

    retile(1)  # the two ranks are now TP=1 data-parallel replicas
    tp1 = build_gpt(1, seed=1)
    assert rel_err(_logits(tp1, tokens), expected) > 0.1, "a differently seeded model should differ before loading"
    _load(tp1, os.path.join(tmp, "tp2"))
    _assert_same_weights(tp1, saved_tp2, tp_rank=rank)
    assert_close(_logits(tp1, tokens), expected, torch.float32, "TP=2 -> TP=1 logits")
    _save(tp1, os.path.join(tmp, "tp1"))

    retile(2)
    loaded_tp2 = build_gpt(2, seed=2)
    _load(loaded_tp2, os.path.join(tmp, "tp1"))
    _assert_same_weights(tp1, loaded_tp2, tp_rank=parallel_state.get_tensor_model_parallel_rank())
    assert_close(_logits(loaded_tp2, tokens), expected, torch.float32, "TP=1 -> TP=2 logits")
    dist.barrier()


@pytest.mark.timeout(300)
def test_checkpoint_changes_tp_size():
    with tempfile.TemporaryDirectory() as tmp:
        spawn(_round_trip, 2, tmp)
