"""NSA in Megatron-core at world size 1 (gloo, CPU): GPT training, equivalence with NativeSparseAttention, guards."""
import warnings

import pytest
import torch

megatron_core = pytest.importorskip("megatron.core")

from megatron.core import parallel_state  # noqa: E402
from megatron.core.models.gpt import GPTModel, gpt_layer_specs  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from nsa_parallel import NativeSparseAttention, NSAConfig  # noqa: E402
from nsa_parallel.megatron import (  # noqa: E402
    NSASelfAttention, get_gpt_decoder_block_nsa_spec, get_gpt_layer_nsa_spec)

from conftest import assert_close  # noqa: E402

TINY = NSAConfig(compress_block_size=16, compress_stride=8, select_block_size=16, num_selected_blocks=4,
                 window_size=32)
SEQ, VOCAB = 96, 32
HUGE = 2 ** 40  # a hidden size no layer can be allocated for


def tiny_config(**kw) -> TransformerConfig:
    args = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=16,
                ffn_hidden_size=128, use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0)
    args.update(kw)
    return TransformerConfig(**args)


def tiny_gpt(config: TransformerConfig, position_embedding_type: str = "none", spec=None) -> GPTModel:
    spec = spec or get_gpt_layer_nsa_spec(TINY, backend="reference")
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=SEQ,
                     position_embedding_type=position_embedding_type)
    if position_embedding_type == "rope":
        rope = model.rotary_pos_emb
        # Megatron's RotaryEmbedding.get_emb moves inv_freq to CUDA; the same table on the CPU:
        rope.get_emb = lambda max_seq_len, offset=0: torch.cat(
            [rope.get_freqs_non_repeated(max_seq_len, offset)] * 2, dim=-1)[:, None, None, :]
    return model


@pytest.fixture(scope="module", autouse=True)
def model_parallel(gloo_world_of_one):
    """gloo, world size 1, TP=1: what Megatron's linear layers need on the CPU."""
    parallel_state.initialize_model_parallel()
    warnings.filterwarnings("ignore", module="megatron")
    yield
    parallel_state.destroy_model_parallel()


def learnable_batch(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """A short random motif repeated: after the first period every token is predictable."""
    g = torch.Generator().manual_seed(1)
    motif = torch.randint(0, VOCAB, (batch, 12), generator=g)
    ids = motif.repeat(1, SEQ // 12 + 1)[:, : SEQ + 1]
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


@pytest.mark.parametrize("position_embedding_type", ["none", "rope"])
def test_gpt_with_nsa_spec_trains(position_embedding_type):
    torch.manual_seed(0)
    model = tiny_gpt(tiny_config(), position_embedding_type)
    assert all(isinstance(layer.self_attention, NSASelfAttention) for layer in model.decoder.layers)
    tokens, labels = learnable_batch()
    positions = torch.arange(SEQ)[None].expand_as(tokens)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = model(tokens, positions, None, labels=labels).mean()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_causal_mask_accepted_padding_mask_rejected():
    torch.manual_seed(0)
    model = tiny_gpt(tiny_config())
    tokens, _ = learnable_batch()
    positions = torch.arange(SEQ)[None].expand_as(tokens)
    causal = torch.triu(torch.ones(SEQ, SEQ, dtype=torch.bool), 1)[None, None]
    assert torch.equal(model(tokens, positions, causal), model(tokens, positions, None))
    padding = causal.clone()
    padding[..., -4:] = True
    with pytest.raises(NotImplementedError, match="causal"):
        model(tokens, positions, padding)


def test_megatron_attention_equals_native_sparse_attention():
    torch.manual_seed(0)
    config = tiny_config(params_dtype=torch.float64, add_bias_linear=False)
    spec = get_gpt_layer_nsa_spec(TINY, backend="reference").submodules.self_attention
    mega = NSASelfAttention(config, spec.submodules, layer_number=1, **spec.params)
    native = NativeSparseAttention(64, 4, 2, 16, config=TINY, backend="reference", dtype=torch.float64)
    groups, hidden = 2, 64
    with torch.no_grad():
        mega.linear_q.weight.copy_(native.q_proj.weight)
        # native kv rows are [branch, group, dk + dv]; Megatron's are group-major [group, branch, dk + dv]
        mega.linear_kv.weight.copy_(native.kv_proj.weight.view(3, groups, -1, hidden).transpose(0, 1)
                                    .reshape(-1, hidden))
        mega.linear_gate.weight.copy_(native.gate_proj.weight)
        mega.linear_gate.bias.copy_(native.gate_proj.bias)
        mega.linear_proj.weight.copy_(native.o_proj.weight)
    mega.core_attention.compress_k.load_state_dict(native.compress_k.state_dict())
    mega.core_attention.compress_v.load_state_dict(native.compress_v.state_dict())

    x = torch.randn(2, 83, hidden, dtype=torch.float64)
    x_native, x_mega = x.clone().requires_grad_(), x.transpose(0, 1).clone().requires_grad_()
    y_native = native(x_native)
    y_mega, bias = mega(x_mega, None)
    assert bias is None
    assert_close(y_mega.transpose(0, 1), y_native, torch.float64, "output")
    up = torch.randn_like(y_native)
    y_native.backward(up)
    y_mega.backward(up.transpose(0, 1))
    assert_close(x_mega.grad.transpose(0, 1), x_native.grad, torch.float64, "input grad")
    pairs = {
        "q": (mega.linear_q.weight, native.q_proj.weight),
        "gate": (mega.linear_gate.weight, native.gate_proj.weight),
        "gate bias": (mega.linear_gate.bias, native.gate_proj.bias),
        "proj": (mega.linear_proj.weight, native.o_proj.weight),
    }
    for name, (a, b) in pairs.items():
        assert_close(a.grad, b.grad, torch.float64, name)
    kv_native = native.kv_proj.weight.grad.view(3, groups, -1, hidden).transpose(0, 1).reshape(-1, hidden)
    assert_close(mega.linear_kv.weight.grad, kv_native, torch.float64, "kv")
    for (name, a), b in zip(mega.core_attention.compress_k.named_parameters(), native.compress_k.parameters()):
        assert_close(a.grad, b.grad, torch.float64, f"compress_k.{name}")


def test_heterogeneous_block_spec():
    torch.manual_seed(0)
    config = tiny_config(num_layers=3)
    block = get_gpt_decoder_block_nsa_spec(config, [True, False, True], TINY, backend="reference")
    model = tiny_gpt(config, spec=block)
    kinds = [type(layer.self_attention).__name__ for layer in model.decoder.layers]
    assert kinds == ["NSASelfAttention", "SelfAttention", "NSASelfAttention"]
    with pytest.raises(ValueError, match="nsa_layers"):
        get_gpt_decoder_block_nsa_spec(config, [True, False])


def _build_attention(config: TransformerConfig, nsa_config=TINY, backend="reference", qk_layernorm=False, **params):
    spec = get_gpt_layer_nsa_spec(nsa_config, backend, qk_layernorm=qk_layernorm).submodules.self_attention
    return NSASelfAttention(config, spec.submodules, layer_number=1, **{**spec.params, **params})


def test_bad_spec_settings_raise_clear_errors():
    with pytest.raises(ValueError, match="compress_block_size"):
        NSAConfig(compress_block_size=12, compress_stride=8)
    with pytest.raises(ValueError, match="num_selected_blocks"):
        NSAConfig(num_selected_blocks=2)
    with pytest.raises(ValueError, match="nsa_config"):
        get_gpt_layer_nsa_spec({"window_size": 32})
    with pytest.raises(ValueError, match="backend"):
        get_gpt_layer_nsa_spec(TINY, backend="cuda")
    with pytest.raises(ValueError, match="multi_latent_attention"):
        get_gpt_layer_nsa_spec(TINY, multi_latent_attention=True)
    if not gpt_layer_specs.HAVE_TE:
        with pytest.raises(ValueError, match="transformer_engine"):
            get_gpt_layer_nsa_spec(TINY, use_transformer_engine=True)


@pytest.mark.parametrize("config_kw, params, match", [
    (dict(kv_channels=15), {}, "kv_channels"),
    (dict(num_attention_heads=6, num_query_groups=4), {}, "num_query_groups"),
    ({}, dict(nsa_config={"window_size": 32}), "nsa_config"),
    ({}, dict(attn_mask_type=AttnMaskType.padding), "attn_mask_type"),
    ({}, dict(backend="cuda"), "backend"),
    # TransformerConfig fields that change attention and that NSA cannot honour, each refused by name
    (dict(attention_dropout=0.1), {}, r"attention_dropout \(0.1\) must be 0"),
    (dict(window_size=(32, 0)), {}, r"window_size \(\(32, 0\)\) must be None"),
    (dict(apply_rope_fusion=True), {}, r"apply_rope_fusion \(True\) must be False"),
    (dict(rotary_interleaved=True), {}, r"rotary_interleaved \(True\) must be False"),
    (dict(softmax_type="off-by-one"), {}, r"softmax_type \('off-by-one'\) must be 'vanilla'"),
    (dict(qk_layernorm=True), {}, r"qk_layernorm \(True\) needs query/key norms in the layer spec"),
    (dict(qk_l2_norm=True), {}, r"qk_l2_norm \(True\) must be False"),
    (dict(attention_output_gate=True), {}, r"attention_output_gate \(True\) must be False"),
    (dict(flash_decode=True), {}, r"flash_decode \(True\) must be False"),
])
def test_bad_attention_settings_fail_before_allocation(config_kw, params, match):
    # No layer of hidden size HUGE can be allocated: a ValueError means the check came first.
    config = tiny_config(hidden_size=HUGE)
    for field, value in config_kw.items():  # set after construction: some need TE to pass Megatron's own checks
        setattr(config, field, value)
    with pytest.raises(ValueError, match=match):
        _build_attention(config, **params)


def test_unsupported_arguments_raise():
    torch.manual_seed(0)
    attn = _build_attention(tiny_config())
    x = torch.randn(40, 1, 64)
    with pytest.raises(ValueError, match="key_value_states"):
        attn(x, None, key_value_states=x)
    unsupported = {
        "packed_seq_params": dict(packed_seq_params=object()),
        "sequence_len_offset comes only with Megatron's flash decode": dict(sequence_len_offset=torch.zeros(1)),
        "attention_bias": dict(attention_bias=torch.zeros(1)),
        "rotary_pos_emb, not precomputed": dict(rotary_pos_cos=torch.zeros(1), rotary_pos_sin=torch.zeros(1)),
        r"not a \(q, k\) pair": dict(rotary_pos_emb=(torch.zeros(40, 1, 1, 16),) * 2),
        "rotary_percent": dict(rotary_pos_emb=torch.zeros(40, 1, 1, 8)),  # rotary_percent=0.5
    }
    for match, kwargs in unsupported.items():
        with pytest.raises(NotImplementedError, match=match):
            attn(x, None, **kwargs)
    with pytest.raises(TypeError, match="unexpected keyword argument 'attn_mask'"):  # not swallowed
        attn(x, None, attn_mask=None)


def test_paper_spec_module_for_megatron_lm():
    """What ``pretrain_gpt.py --spec nsa_parallel.megatron.paper_spec layer_spec`` imports."""
    import importlib
    spec = vars(importlib.import_module("nsa_parallel.megatron.paper_spec"))["layer_spec"]
    assert spec.submodules.self_attention.module is NSASelfAttention
    assert spec.submodules.self_attention.submodules.core_attention.params["nsa_config"] == NSAConfig()


def _packed(cu: list[int], **kw):
    from megatron.core.packed_seq_params import PackedSeqParams

    cu_t = torch.tensor(cu, dtype=torch.int32)
    longest = max(b - a for a, b in zip(cu, cu[1:]))
    args = dict(qkv_format="thd", cu_seqlens_q=cu_t, cu_seqlens_kv=cu_t, max_seqlen_q=longest, max_seqlen_kv=longest)
    args.update(kw)
    return PackedSeqParams(**args)


DOCS = [0, 37, 37, 42, 100, 157]  # an empty document, one shorter than a compression block, ...


@pytest.mark.parametrize("rope", [False, True])
def test_packed_sequences_equal_documents_run_alone(rope):
    torch.manual_seed(0)
    attn = _build_attention(tiny_config(params_dtype=torch.float64, add_bias_linear=False))
    # Megatron's rotary table for packed sequences covers the longest document, positions from 0.
    freqs = torch.rand(64, 1, 1, 16, dtype=torch.float64) * torch.arange(64, dtype=torch.float64)[:, None, None, None]
    kw = dict(rotary_pos_emb=freqs) if rope else {}
    x = torch.randn(DOCS[-1], 1, 64, dtype=torch.float64)
    x_packed, x_alone = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_packed, _ = attn(x_packed, None, packed_seq_params=_packed(DOCS), **kw)
    y_alone = torch.cat([attn(x_alone[a:b], None, **kw)[0] for a, b in zip(DOCS, DOCS[1:]) if b > a])
    assert_close(y_packed, y_alone, torch.float64, "output")
    up = torch.randn_like(y_packed)
    y_packed.backward(up)
    y_alone.backward(up)
    assert_close(x_packed.grad, x_alone.grad, torch.float64, "input grad")


def test_padded_packed_documents_are_exact_on_their_tokens():
    torch.manual_seed(0)
    attn = _build_attention(tiny_config(params_dtype=torch.float64, add_bias_linear=False))
    x = torch.randn(48, 1, 64, dtype=torch.float64)  # documents at [0, 20) and [24, 44), pads after each
    packed = _packed([0, 20, 40], cu_seqlens_q_padded=torch.tensor([0, 24, 48], dtype=torch.int32),
                     cu_seqlens_kv_padded=torch.tensor([0, 24, 48], dtype=torch.int32))
    y, _ = attn(x, None, packed_seq_params=packed)
    for a, b in ((0, 20), (24, 44)):
        assert_close(y[a:b], attn(x[a:b], None)[0], torch.float64, f"document at {a}")


def test_gpt_with_packed_documents_keeps_them_apart():
    torch.manual_seed(0)
    model = tiny_gpt(tiny_config(), "rope")
    tokens = torch.randint(0, VOCAB, (1, SEQ))
    changed = tokens.clone()
    changed[:, :40] = torch.randint(0, VOCAB, (1, 40))
    positions = torch.cat([torch.arange(40), torch.arange(SEQ - 40)])[None]
    packed = _packed([0, 40, SEQ])
    logits = model(tokens, positions, None, packed_seq_params=packed)
    assert torch.equal(logits[:, 40:], model(changed, positions, None, packed_seq_params=packed)[:, 40:])
    assert not torch.equal(logits[:, :40], model(changed, positions, None, packed_seq_params=packed)[:, :40])


def test_unsupported_packing_raises():
    attn = _build_attention(tiny_config())
    x = torch.randn(40, 1, 64)
    cases = [
        (NotImplementedError, "qkv_format must be 'thd'", dict(packed_seq_params=_packed([0, 40], qkv_format="sbhd"))),
        (ValueError, "equal cu_seqlens_kv", dict(packed_seq_params=_packed(
            [0, 40], cu_seqlens_kv=torch.tensor([0, 20, 40], dtype=torch.int32)))),
        (ValueError, "cu_seqlens_q_padded must equal cu_seqlens_kv_padded", dict(packed_seq_params=_packed(
            [0, 20, 40], cu_seqlens_q_padded=torch.tensor([0, 20, 40], dtype=torch.int32),
            cu_seqlens_kv_padded=torch.tensor([0, 24, 40], dtype=torch.int32)))),
        (ValueError, "end at the number of tokens", dict(packed_seq_params=_packed([0, 20, 39]))),
        (NotImplementedError, "must cover all 40 positions", dict(packed_seq_params=_packed([0, 40]),
                                                                   rotary_pos_emb=torch.zeros(30, 1, 1, 16))),
    ]
    for error, match, kwargs in cases:
        with pytest.raises(error, match=match):
            attn(x, None, **kwargs)
    with pytest.raises(ValueError, match="one row"):
        attn(torch.randn(40, 2, 64), None, packed_seq_params=_packed([0, 40]))


def _reset_mask(seq: int, eods: list[int]) -> torch.Tensor:
    """Megatron-LM's ``--reset-attention-mask``: causal, and nothing after an EOD sees up to it (True = masked)."""
    keep = torch.tril(torch.ones(seq, seq))
    for i in eods:
        keep[i + 1:, : i + 1] = 0
    return keep < 0.5


def test_reset_attention_mask_runs_each_document_alone():
    torch.manual_seed(0)
    attn = _build_attention(tiny_config(params_dtype=torch.float64, add_bias_linear=False))
    rows = [[36, 41, 99], [70]]  # EOD positions per row; row 1 ends with an unterminated document
    mask = torch.stack([_reset_mask(157, eods) for eods in rows])[:, None]
    x = torch.randn(157, 2, 64, dtype=torch.float64)
    y, _ = attn(x, mask)
    for r, eods in enumerate(rows):
        bounds = [0] + [i + 1 for i in eods] + [157]
        alone = torch.cat([attn(x[a:b, r:r + 1], None)[0] for a, b in zip(bounds, bounds[1:])])
        assert_close(y[:, r:r + 1], alone, torch.float64, f"row {r}")
    shared, _ = attn(x, mask[:1])  # one mask for every row
    assert_close(shared[:, 0], y[:, 0], torch.float64, "broadcast mask")
    assert not torch.equal(mask[:1].expand(2, -1, -1, -1), mask) and not torch.equal(shared[:, 1], y[:, 1])
    almost = mask.clone()
    almost[0, 0, 150, 3] = False  # one more visible token: no longer a document mask
    with pytest.raises(NotImplementedError, match="document resets"):
        attn(x, almost)


# --- the Megatron-native module: selective recomputation, TransformerConfig fields honoured ---------

def _loss_and_grads(model: GPTModel, pe: str = "rope") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    tokens, labels = learnable_batch()
    positions = torch.arange(SEQ)[None].expand_as(tokens)
    model.zero_grad()
    loss = model(tokens, positions, None, labels=labels).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_selective_recomputation_of_core_attention_gives_the_same_loss_and_gradients():
    """recompute_granularity="selective" with core_attn: NSA's core (phi included) is recomputed in
    backward; the loss and every gradient equal the run that kept its activations."""
    results = []
    for recompute in ({}, dict(recompute_granularity="selective", recompute_modules=["core_attn"])):
        torch.manual_seed(0)
        model = tiny_gpt(tiny_config(params_dtype=torch.float64, **recompute), "rope").double()
        model.train()
        attention = model.decoder.layers[0].self_attention
        assert attention.checkpoint_core_attention == bool(recompute)
        calls = []
        hook = attention.core_attention.register_forward_hook(lambda *_: calls.append(1))
        results.append(_loss_and_grads(model))
        hook.remove()
        assert len(calls) == (2 if recompute else 1)  # recomputed once in backward
    (loss, grads), (loss_re, grads_re) = results
    torch.testing.assert_close(loss_re, loss, rtol=0, atol=1e-12)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_re[name], grad, rtol=1e-12, atol=1e-12, msg=name)


def test_qk_layernorm_normalises_queries_and_every_branchs_keys():
    """With qk_layernorm the spec's norms act on each head's query and on the keys of all three branches
    (before compression and rotary): scaling those projections changes nothing (the norm's epsilon aside,
    made negligible here). Without, it does."""
    x = torch.randn(40, 2, 64, dtype=torch.float64)
    for qk_layernorm in (True, False):
        torch.manual_seed(0)
        attn = _build_attention(tiny_config(params_dtype=torch.float64, add_bias_linear=False, layernorm_epsilon=1e-30,
                                            qk_layernorm=qk_layernorm), qk_layernorm=qk_layernorm).double()
        assert isinstance(attn.q_layernorm, torch.nn.LayerNorm) == qk_layernorm
        before, _ = attn(x, None)
        with torch.no_grad():
            attn.linear_q.weight.mul_(7.0)
            keys = attn.linear_kv.weight.view(2, 3, 2, 16, 64)[:, :, 0]  # [group, branch, key|value, dk, hidden]
            keys.mul_(3.0)
        after, _ = attn(x, None)
        assert torch.allclose(after, before, rtol=1e-9, atol=1e-12) == qk_layernorm


def test_softmax_scale_is_honoured():
    """softmax_scale = c/sqrt(dk) equals the default scale with queries multiplied by c (every branch and
    the block selection see the same scores)."""
    x = torch.randn(83, 2, 64, dtype=torch.float64)
    outs = []
    for scale, q_factor in ((2.5 / 16 ** 0.5, 1.0), (None, 2.5)):
        torch.manual_seed(0)
        attn = _build_attention(tiny_config(params_dtype=torch.float64, softmax_scale=scale))
        with torch.no_grad():
            attn.linear_q.weight.mul_(q_factor)
            attn.linear_q.bias.mul_(q_factor)
        outs.append(attn(x, None)[0])
    assert_close(outs[0], outs[1], torch.float64, "softmax_scale")


def test_softmax_in_fp32_either_way():
    """attention_softmax_in_fp32=False (Megatron-LM's default) asks for no more than the input precision;
    NSA's softmax is fp32 regardless, so the attention is the same, bit for bit."""
    x = torch.randn(83, 2, 64)
    outs = []
    for in_fp32 in (True, False):
        torch.manual_seed(0)
        outs.append(_build_attention(tiny_config(attention_softmax_in_fp32=in_fp32))(x, None)[0])
    assert torch.equal(outs[0], outs[1])


def test_init_method_and_perform_initialization_reach_phi():
    attn = _build_attention(tiny_config(init_method=lambda t: torch.nn.init.constant_(t, 0.25)))
    for name, p in attn.core_attention.compress_k.named_parameters():
        assert torch.all(p == (0.0 if name.startswith("b") else 0.25)), name
    state = torch.get_rng_state()
    attn = _build_attention(tiny_config(perform_initialization=False))
    assert torch.equal(torch.get_rng_state(), state), "perform_initialization=False must draw nothing"
    assert all(torch.all(p == 0) for n, p in attn.core_attention.compress_v.named_parameters() if n.startswith("b"))


def test_phi_shards_start_as_the_tp1_phi():
    """init_compressor_shard on the GPU when there is one: the TP=2 shards, each made from the same seed,
    put together are the TP=1 phi (the model-level check, at TP=2 on gloo, is in test_megatron_parallel)."""
    from nsa_parallel.compression import BlockCompressor
    from nsa_parallel.megatron.core_attention import init_compressor_shard

    from conftest import DEVICE

    def shard(groups_local: int, tp_rank: int) -> BlockCompressor:
        module = BlockCompressor(groups_local, 16, TINY, reset=False, device=DEVICE)
        torch.manual_seed(5)
        init_compressor_shard(module, lambda t: torch.nn.init.normal_(t, std=0.02), 4, tp_rank)
        return module

    whole = shard(4, 0)
    parts = [shard(2, r) for r in range(2)]
    for name, p in whole.named_parameters():
        assert torch.equal(torch.cat([getattr(part, name) for part in parts]), p), name


def test_mask_is_compared_on_every_row():
    """A mask that is causal on its first and last rows but not in between is refused, not taken for causal."""
    attn = _build_attention(tiny_config())
    x = torch.randn(40, 2, 64)
    causal = torch.triu(torch.ones(40, 40, dtype=torch.bool), 1)[None, None]
    attn(x, causal)
    middle = causal.clone()
    middle[..., 20, 5] = True  # token 20 may not see token 5: padding-like, no document reset
    with pytest.raises(NotImplementedError, match="causal"):
        attn(x, middle)
    middle[..., 20, 5] = False  # changed in place: the verdict is not taken from the cache
    attn(x, middle)
    middle[..., 30, 31] = False  # a token that sees its future
    with pytest.raises(NotImplementedError, match="causal"):
        attn(x, middle)


def test_weight_decay_skips_every_bias_and_norm():
    """nsa-train's AdamW groups (the GPU path passes the same rule to Megatron's optimizer): phi's biases
    b1/b2 are 2-D and not named bias, yet get no weight decay; its weights and position do."""
    from nsa_parallel.job_config import TrainSection
    from nsa_parallel.train.optimizer import LocalAdamW

    torch.manual_seed(0)
    model = tiny_gpt(tiny_config(qk_layernorm=True), spec=get_gpt_layer_nsa_spec(TINY, backend="reference",
                                                                                 qk_layernorm=True))
    groups = LocalAdamW(model, TrainSection(weight_decay=0.1)).optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)].split("layers.0.")[-1] for g in groups if g["weight_decay"] for p in g["params"]}
    kept = {names[id(p)].split("layers.0.")[-1] for g in groups if not g["weight_decay"] for p in g["params"]}
    phi = "self_attention.core_attention.compress_k."
    assert {phi + "w1", phi + "w2", phi + "position", "self_attention.linear_q.weight"} <= decayed
    assert {phi + "b1", phi + "b2", "self_attention.linear_q.bias", "self_attention.linear_gate.bias",
            "self_attention.q_layernorm.weight", "input_layernorm.weight"} <= kept
