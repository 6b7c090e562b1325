"""A Megatron GPT with the NSA spec at context_parallel_size=2 (gloo) equals the same model at CP=1:
per-token losses on each rank's zigzag shard, and every gradient summed over the CP group."""
import os
import tempfile
import warnings

import pytest
import torch

pytest.importorskip("megatron.core")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from nsa_parallel.context_parallel import ShardLayout  # noqa: E402

SEQ = 128  # 4 zigzag chunks of 2 selection blocks


def _cpu_rope_slicing() -> None:
    """Megatron's per-CP-rank rope slicing pins memory, which needs CUDA; the same zigzag slice on the CPU."""
    from megatron.core import parallel_state
    from megatron.core.models.common.embeddings import rotary_pos_embedding

    def on_this_cp_rank(emb, seq_dim, cp_group=None):
        world, rank = parallel_state.get_context_parallel_world_size(), parallel_state.get_context_parallel_rank()
        return emb.index_select(seq_dim, ShardLayout("zigzag", world, emb.shape[seq_dim]).local_positions(rank))

    rotary_pos_embedding.get_pos_emb_on_this_cp_rank = on_this_cp_rank


def _gpt(cp: int, position_embedding_type: str):
    from test_megatron_layer import TINY, VOCAB, tiny_config, tiny_gpt
    from nsa_parallel.megatron import get_gpt_layer_nsa_spec
    torch.manual_seed(0)
    config = tiny_config(context_parallel_size=cp, params_dtype=torch.float64)
    model = tiny_gpt(config, position_embedding_type, spec=get_gpt_layer_nsa_spec(TINY, backend="reference"))
    model.decoder.input_tensor = None
    return model.double(), VOCAB


def _batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (2, SEQ + 1), generator=g)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def _losses_and_grads(rank: int, world: int, init_file: str, out_dir: str, pe: str) -> None:
    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(context_parallel_size=world)
    _cpu_rope_slicing()
    try:
        model, vocab = _gpt(world, pe)
        tokens, labels = _batch(vocab)
        positions = ShardLayout("zigzag", world, SEQ).local_positions(rank)
        # Megatron's get_batch gives each CP rank the causal mask's rows of its positions.
        causal = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), 1)[positions][None, None]
        loss = model(tokens[:, positions], positions[None].expand(2, -1), causal, labels=labels[:, positions])
        loss.sum().backward()
        if world > 1:
            from test_megatron_layer import _reset_mask
            with pytest.raises(NotImplementedError, match="under context parallelism is causal"):
                model(tokens[:, positions], positions[None].expand(2, -1), _reset_mask(SEQ, [50])[positions][None, None])
        grads = {}
        for name, p in model.named_parameters():
            grads[name] = p.grad.clone()
            dist.all_reduce(grads[name], group=parallel_state.get_context_parallel_group())
        torch.save({"loss": loss.detach(), "positions": positions, "grads": grads},
                   os.path.join(out_dir, f"cp{world}-rank{rank}.pt"))
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


@pytest.mark.parametrize("position_embedding_type", ["none", "rope"])
def test_cp2_equals_cp1(position_embedding_type):
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2):
            mp.spawn(_losses_and_grads, args=(world, os.path.join(tmp, f"init{world}"), tmp,
                                              position_embedding_type), nprocs=world)
        ref = torch.load(os.path.join(tmp, "cp1-rank0.pt"))
        for rank in range(2):
            got = torch.load(os.path.join(tmp, f"cp2-rank{rank}.pt"))
            torch.testing.assert_close(got["loss"], ref["loss"][:, got["positions"]], rtol=0, atol=1e-9)
            for name, grad in ref["grads"].items():
                torch.testing.assert_close(got["grads"][name], grad, rtol=1e-9, atol=1e-9, msg=name)


DOCS = [0, 64, 64, 128]  # each document splits into 2 x CP chunks of whole selection blocks


def _packed_losses_and_grads(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """A packed row of documents; under CP each rank holds its zigzag share of every document."""
    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state
    from test_megatron_layer import _packed
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(context_parallel_size=world)
    try:
        model, vocab = _gpt(world, "rope")
        tokens, labels = (t[:1] for t in _batch(vocab))
        positions = torch.cat([a + ShardLayout("zigzag", world, b - a).local_positions(rank)
                               for a, b in zip(DOCS, DOCS[1:]) if b > a])
        loss = model(tokens[:, positions], (positions % 64)[None], None, labels=labels[:, positions],
                     packed_seq_params=_packed(DOCS))
        loss.sum().backward()
        grads = {}
        for name, p in model.named_parameters():
            grads[name] = p.grad.clone()
            dist.all_reduce(grads[name], group=parallel_state.get_context_parallel_group())
        torch.save({"loss": loss.detach(), "positions": positions, "grads": grads},
                   os.path.join(out_dir, f"cp{world}-rank{rank}.pt"))
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def test_packed_documents_cp2_equal_cp1():
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2):
            mp.spawn(_packed_losses_and_grads, args=(world, os.path.join(tmp, f"init{world}"), tmp), nprocs=world)
        ref = torch.load(os.path.join(tmp, "cp1-rank0.pt"))
        for rank in range(2):
            got = torch.load(os.path.join(tmp, f"cp2-rank{rank}.pt"))
            torch.testing.assert_close(got["loss"], ref["loss"][:, got["positions"]], rtol=0, atol=1e-9)
            for name, grad in ref["grads"].items():
                torch.testing.assert_close(got["grads"][name], grad, rtol=1e-9, atol=1e-9, msg=name)
