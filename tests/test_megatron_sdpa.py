"""SDPACoreAttention (torch's fused SDPA in Megatron's core_attention slot) at world size 1 (gloo, CPU):
equals a float64 dense causal attention and Megatron's DotProductAttention, refuses by name what it
cannot honour; nsa-train's full-attention model trains on the CPU with Megatron's rotary embedding."""
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")

import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state, tensor_parallel  # noqa: E402
from megatron.core.models.gpt import GPTModel, gpt_layer_specs  # noqa: E402
from megatron.core.packed_seq_params import PackedSeqParams  # noqa: E402
from megatron.core.transformer.dot_product_attention import DotProductAttention  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from torch.nn.attention import SDPBackend  # noqa: E402

from nsa_parallel.megatron import (  # noqa: E402
    CPURotaryEmbedding, SDPACoreAttention, choose_backend, get_gpt_layer_sdpa_spec)
from nsa_parallel.megatron.sdpa_attention import FUSED_BACKENDS  # noqa: E402

from conftest import DEVICE, ON_GPU, assert_close, check_forward_backward, gpu  # noqa: E402
from test_megatron_layer import VOCAB, model_parallel, tiny_config  # noqa: E402, F401 (model_parallel: autouse fixture)

ROOT = Path(__file__).resolve().parents[1]
SEQ, BATCH, HEADS, GROUPS, HEAD_DIM = 37, 2, 4, 2, 16  # odd length, GQA: 2 heads per KV group


class _CPUBuffer:
    def get_tensor(self, shape, dtype, name, mem_alloc_context=None):
        return torch.empty(shape, dtype=dtype)


@pytest.fixture
def dot_product_attention_on_cpu(monkeypatch):
    """Megatron's DotProductAttention allocates its score buffer on CUDA and forks the model-parallel CUDA RNG
    for dropout (0 here); the same on the CPU. Its causal mask is also made on CUDA, so tests pass one."""
    monkeypatch.setattr(parallel_state, "get_global_memory_buffer", _CPUBuffer)
    monkeypatch.setattr(tensor_parallel.get_cuda_rng_tracker(), "fork", contextlib.nullcontext)


def causal_mask(seq: int) -> torch.Tensor:
    return torch.ones(seq, seq, dtype=torch.bool).triu(1)[None, None]  # Megatron's: True = masked out


def dense_causal(q, k, v, scale):
    """The float64 reference: softmax of the masked ``q k^T * scale``, KV groups repeated to the heads."""
    repeat = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(repeat, 2), v.repeat_interleave(repeat, 2)
    scores = torch.einsum("qbhd,kbhd->bhqk", q, k) * scale
    scores = scores.masked_fill(causal_mask(q.shape[0]), float("-inf"))
    out = torch.einsum("bhqk,kbhd->qbhd", scores.softmax(-1), v)
    return out.reshape(q.shape[0], q.shape[1], -1)


def core_attention(config=None, layer_number: int = 1, **params) -> SDPACoreAttention:
    return SDPACoreAttention(config or tiny_config(), layer_number=layer_number, attn_mask_type=AttnMaskType.causal,
                             attention_type="self", **params)


def qkv(dtype=torch.float32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SEQ, BATCH, n, HEAD_DIM, generator=g, dtype=dtype) for n in (HEADS, GROUPS, GROUPS)]


@pytest.mark.parametrize("dtype", [torch.float32] + ([torch.bfloat16] if ON_GPU else []))
@pytest.mark.parametrize("softmax_scale", [None, 0.3])
def test_core_attention_equals_dense_causal_float64(dtype, softmax_scale):
    core = core_attention(softmax_scale=softmax_scale).to(DEVICE)
    scale = softmax_scale or HEAD_DIM ** -0.5
    check_forward_backward(lambda q, k, v: core(q, k, v, None), lambda q, k, v: dense_causal(q, k, v, scale),
                           qkv(), dtype, f"SDPACoreAttention softmax_scale={softmax_scale}")


def test_plain_causal_mask_accepted():
    q, k, v = qkv()
    core = core_attention()
    assert torch.equal(core(q, k, v, causal_mask(SEQ)), core(q, k, v, None))


def test_attention_dropout_applies_in_training_only():
    q, k, v = qkv()
    core = core_attention(tiny_config(attention_dropout=0.5))
    ref = dense_causal(q.double(), k.double(), v.double(), HEAD_DIM ** -0.5)
    assert_close(core.eval()(q, k, v, None), ref, torch.float32, "eval")
    assert not torch.allclose(core.train()(q, k, v, None), ref.float())
    assert core_attention(tiny_config(attention_dropout=0.5), attention_dropout=0.0).dropout_p == 0.0


def test_query_key_layer_scaling_and_fp16_softmax_are_the_same_attention(dot_product_attention_on_cpu):
    """DotProductAttention divides the scores by layer_number and multiplies them back before its fp32
    softmax: the attention does not change, so SDPACoreAttention accepts the flag."""
    q, k, v = qkv()
    for config in (tiny_config(apply_query_key_layer_scaling=True), tiny_config(attention_softmax_in_fp32=False)):
        megatron = DotProductAttention(config, layer_number=3, attn_mask_type=AttnMaskType.causal,
                                       attention_type="self")
        assert_close(core_attention(config, layer_number=3)(q, k, v, None), megatron(q, k, v, causal_mask(SEQ)),
                     torch.float32, "against DotProductAttention")


@pytest.mark.parametrize("field, config", [
    ("context_parallel_size", dict(context_parallel_size=2)),
    ("window_size", dict(window_size=(8, 0))),
    ("softmax_type", dict(softmax_type="off-by-one")),
    ("qk_clip", dict(qk_clip=True)),
    ("log_max_attention_logit", dict(log_max_attention_logit=True)),
])
def test_unsupported_config_refused_at_construction(field, config):
    with pytest.raises(ValueError, match=field):
        core_attention(tiny_config(**config))


def test_unsupported_arguments_refused_by_name():
    with pytest.raises(ValueError, match="attn_mask_type"):
        SDPACoreAttention(tiny_config(), 1, AttnMaskType.padding, "self")
    q, k, v = qkv()
    core = core_attention()
    padding = causal_mask(SEQ).clone()
    padding[..., -3:] = True
    refused = [
        ("attention_mask", dict(attention_mask=padding)),
        ("attention_mask", dict(attention_mask=causal_mask(SEQ).float())),  # additive: not Megatron's bool mask
        ("attention_bias", dict(attention_bias=torch.zeros(1, HEADS, SEQ, SEQ))),
        ("packed_seq_params", dict(packed_seq_params=PackedSeqParams(qkv_format="thd"))),
        ("attn_mask_type", dict(attn_mask_type=AttnMaskType.no_mask)),
        ("key has", dict(key=k[:-1], value=v[:-1])),  # a KV cache: is_causal would align the mask wrongly
    ]
    for name, kwargs in refused:
        with pytest.raises(ValueError, match=name):
            core(**{"query": q, "key": k, "value": v, "attention_mask": None, **kwargs})


def test_sdpa_spec_is_megatrons_local_spec_but_core_attention():
    sdpa, local = get_gpt_layer_sdpa_spec(), gpt_layer_specs.get_gpt_layer_local_spec()
    assert sdpa.submodules.self_attention.submodules.core_attention is SDPACoreAttention
    assert local.submodules.self_attention.submodules.core_attention is DotProductAttention
    for name in ("linear_qkv", "linear_proj", "q_layernorm", "k_layernorm"):
        assert getattr(sdpa.submodules.self_attention.submodules, name) == \
            getattr(local.submodules.self_attention.submodules, name)
    for name in ("input_layernorm", "pre_mlp_layernorm", "mlp", "sharded_state_dict_keys_map"):
        # repr: megatron-core 0.19's mlp is a functools.partial, equal only to itself
        assert repr(getattr(sdpa.submodules, name)) == repr(getattr(local.submodules, name))
    with pytest.raises(ValueError, match="multi_latent_attention"):
        get_gpt_layer_sdpa_spec(multi_latent_attention=True)


def _rope_gpt(config, spec) -> GPTModel:
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=SEQ,
                     position_embedding_type="rope")
    model.rotary_pos_emb = CPURotaryEmbedding(config.kv_channels, 1.0, use_cpu_initialization=True)
    return model


def test_gpt_with_sdpa_spec_equals_megatron_local_spec(dot_product_attention_on_cpu):
    torch.manual_seed(0)
    config = tiny_config()
    local = _rope_gpt(config, gpt_layer_specs.get_gpt_layer_local_spec())
    sdpa = _rope_gpt(config, get_gpt_layer_sdpa_spec())
    sdpa.load_state_dict(local.state_dict())
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(SEQ)[None].expand_as(tokens)
    # DotProductAttention makes its own causal mask on CUDA, so both get Megatron's mask.
    assert_close(sdpa(tokens, positions, causal_mask(SEQ)), local(tokens, positions, causal_mask(SEQ)),
                 torch.float32, "logits")


class _FakeCPGroup:
    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


@pytest.mark.parametrize("interleaved", [False, True])
def test_cpu_rotary_is_megatrons_table(interleaved):
    rope = CPURotaryEmbedding(HEAD_DIM, 1.0, rotary_interleaved=interleaved, use_cpu_initialization=True)
    freqs = rope.get_freqs_non_repeated(64)
    table = (torch.stack([freqs, freqs], -1).flatten(-2) if interleaved else torch.cat([freqs, freqs], -1))
    assert rope(64).device.type == "cpu" and torch.equal(rope(64), table[:, None, None, :])
    # Megatron's per-CP-rank slice (rope_utils.get_pos_emb_on_this_cp_rank): chunks r and 2*cp-1-r of 2*cp.
    for rank in range(2):
        chunks = table[:, None, None, :].view(4, 16, 1, 1, HEAD_DIM)
        assert torch.equal(rope(64, cp_group=_FakeCPGroup(2, rank)), chunks[[rank, 3 - rank]].flatten(0, 1))
    assert torch.equal(rope(64, packed_seq=True, cp_group=_FakeCPGroup(2, 1)), rope(64))


def test_cpu_full_attention_model_uses_rotary_positions():
    """Without positions, one causal attention layer's last output ignores the order of the tokens before it
    (deeper, earlier layers' outputs would already differ); nsa-train's CPU full-attention model must not."""
    from nsa_parallel.job_config import load_job_config
    from nsa_parallel.train.model import build_model
    config = load_job_config(ROOT / "configs" / "tiny.yaml", ["model.attention=full", "model.num_layers=1",
                                                              "parallel.context_parallel_size=1"])
    torch.manual_seed(0)
    model = build_model(config, torch.device("cpu"))
    assert isinstance(model.rotary_pos_emb, CPURotaryEmbedding)
    assert all(isinstance(layer.self_attention.core_attention, SDPACoreAttention) for layer in model.decoder.layers)
    tokens = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(2))
    swapped = tokens.clone()
    swapped[:, [3, 20]] = tokens[:, [20, 3]]
    positions = torch.arange(SEQ)[None]

    def last_logits(model):
        return model(tokens, positions, None)[:, -1], model(swapped, positions, None)[:, -1]

    assert (torch.ne(*last_logits(model))).any()
    model.position_embedding_type = "none"  # the same weights without rope: the order is invisible
    assert_close(*last_logits(model), torch.float32, "NoPE last logits")


def test_nsa_train_full_attention_on_the_cpu(tmp_path):
    out = tmp_path / "run"
    run = subprocess.run(
        [sys.executable, "-m", "nsa_parallel.train", "--config", str(ROOT / "configs" / "tiny.yaml"), "--no-ray",
         "model.attention=full", "parallel.context_parallel_size=1", "launch.num_workers=1", "train.max_steps=3",
         "train.checkpoint_interval=3", f"train.output_dir={out}"],
        check=False, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout + run.stderr
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(2.0 < loss < 6.0 for loss in losses), losses  # ~log(64) at the start
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000003"


def test_backend_is_math_on_the_cpu():
    assert choose_backend((BATCH, HEADS, SEQ, HEAD_DIM), torch.float32, torch.device("cpu")) == SDPBackend.MATH


@gpu
def test_backend_is_fused_on_the_gpu():
    shape, device = (1, 8, 1024, 64), torch.device("cuda", torch.cuda.current_device())
    choice = choose_backend(shape, torch.bfloat16, device)
    assert choice in FUSED_BACKENDS
    assert choose_backend(shape, torch.bfloat16, device) == choice  # cached
