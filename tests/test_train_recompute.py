"""Megatron's activation recomputation as nsa-train config keys (CPU, a gloo world of one): recomputing runs the
recomputed part again in the backward pass and gives the loss and gradients of keeping every activation; bad
settings are errors naming the keys."""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron.core import parallel_state  # noqa: E402

from nsa_parallel.job_config import load_job_config  # noqa: E402
from nsa_parallel.train.cpu_stand_ins import cpu_stand_ins  # noqa: E402
from nsa_parallel.train.data import step_microbatches, token_source  # noqa: E402
from nsa_parallel.train.model import build_model, init_model_parallel  # noqa: E402

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
ONE = ["parallel.context_parallel_size=1", "launch.num_workers=1", "train.global_batch_size=1"]
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("gloo_world_of_one")


def _step(overrides: list[str], counted: str) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """(loss, every parameter's gradient, how often the first layer's ``counted`` submodule ran) for one
    forward and backward pass of configs/tiny.yaml with ``overrides``, on its first sample."""
    config = load_job_config(TINY, [*ONE, *overrides])
    init_model_parallel(config, CPU)
    try:
        model = build_model(config, CPU)
        calls = []
        model.decoder.layers[0].get_submodule(counted).register_forward_hook(lambda *args: calls.append(1))
        mb = step_microbatches(token_source(config, Path(tempfile.gettempdir())), 0, config, 0, 1, 0, 1, CPU)[0]
        with cpu_stand_ins():  # Megatron's checkpointing saves and restores the (CUDA) RNG
            per_token = model(mb["tokens"], mb["position_ids"], None, labels=mb["labels"])
            loss = (per_token * mb["loss_mask"]).sum() / mb["loss_mask"].sum()
            loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, len(calls)
    finally:
        parallel_state.destroy_model_parallel()


FULL_ATTENTION = ["model.attention=full"]


@pytest.mark.parametrize("attention, recompute, counted", [
    ([], ["train.recompute_granularity=full", "train.recompute_method=uniform", "train.recompute_num_layers=1"], ""),
    ([], ["train.recompute_granularity=full", "train.recompute_method=block", "train.recompute_num_layers=1"], ""),
    ([], ["train.recompute_granularity=selective"], "self_attention.core_attention"),
    ([], ["train.recompute_granularity=selective", "train.recompute_modules=[core_attn]"],
     "self_attention.core_attention.compress_k"),
    (FULL_ATTENTION, ["train.recompute_granularity=selective"], "self_attention.core_attention"),
    (FULL_ATTENTION, ["train.recompute_granularity=full", "train.recompute_method=uniform",
                      "train.recompute_num_layers=2"], ""),
], ids=["nsa-full-uniform", "nsa-full-block", "nsa-selective-core_attn", "nsa-selective-core_attn-phi",
        "sdpa-selective-core_attn", "sdpa-full-uniform"])
def test_recomputation_gives_the_loss_and_gradients_of_none(attention, recompute, counted):
    loss, grads, ran = _step(attention, counted)
    loss_r, grads_r, ran_r = _step([*attention, *recompute], counted)
    assert (ran, ran_r) == (1, 2)  # recomputed in the backward pass, once
    assert torch.equal(loss_r, loss)
    assert grads_r.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_r[name], grad, rtol=1e-6, atol=1e-9, msg=name)


@pytest.mark.parametrize("overrides, message", [
    (["train.recompute_granularity=partial"], "train.recompute_granularity ('partial') must be null, 'full' or"),
    (["train.recompute_granularity=full"], "train.recompute_method (None) must be one of ('uniform', 'block')"),
    (["train.recompute_granularity=full", "train.recompute_method=block"],
     "train.recompute_num_layers (None) must be between 1 and the layers per pipeline stage, model.num_layers / "
     "parallel.pipeline_model_parallel_size (2)"),
    (["train.recompute_granularity=full", "train.recompute_method=uniform", "train.recompute_num_layers=2",
      "parallel.pipeline_model_parallel_size=2", "launch.num_workers=2"],
     "train.recompute_num_layers (2) must be between 1 and the layers per pipeline stage"),
    (["train.recompute_granularity=full", "train.recompute_method=uniform", "train.recompute_num_layers=2",
      "model.num_layers=3"], "train.recompute_num_layers (2) must divide the layers per pipeline stage (3)"),
    (["train.recompute_method=uniform"], "train.recompute_method ('uniform') applies to "
                                         "train.recompute_granularity=full only (it is null)"),
    (["train.recompute_granularity=full", "train.recompute_method=block", "train.recompute_num_layers=1",
      "train.recompute_modules=[mlp]"], "train.recompute_modules (['mlp']) applies to "
                                        "train.recompute_granularity=selective only (it is full)"),
    (["train.recompute_granularity=selective", "train.recompute_modules=[moe]"],
     "train.recompute_modules (['moe']) must be a non-empty list of ('core_attn', 'mlp', 'layernorm')"),
    (["train.recompute_granularity=selective", "train.recompute_modules=[mlp]", "model.attention=full"],
     "train.recompute_modules: mlp is refused: megatron-core (0.16 to 0.19) recomputes the MLP"),
    (["train.recompute_granularity=selective", "train.recompute_modules=[layernorm]"],
     "train.recompute_modules: layernorm is refused: megatron-core (0.16 to 0.19) takes every "
     "CheckpointWithoutOutput for an fp8 one"),
])
def test_bad_recompute_settings_name_the_keys(overrides, message):
    with pytest.raises(ValueError) as err:
        load_job_config(TINY, [*ONE, *overrides])
    assert message in str(err.value)
