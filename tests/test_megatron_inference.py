"""Generation through Megatron-core's own inference path (gloo, CPU): a GPT with the NSA spec, prefilled and
then decoded token by token through ``GPTModel.forward`` with a ``StaticInferenceContext``, gives the logits
of one forward over the whole sequence; greedy generation with the cache picks the tokens that recomputing
the whole sequence picks; TP=2 decodes as TP=1; what the cache cannot serve is refused by name."""
import contextlib
import os
import tempfile
import types

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron.core.inference.contexts.static_context import StaticInferenceContext  # noqa: E402
from megatron.core.packed_seq_params import PackedSeqParams  # noqa: E402

from nsa_parallel.inference import NSAKVCache  # noqa: E402
from nsa_parallel.megatron import get_gpt_layer_nsa_spec  # noqa: E402
from nsa_kernels import decode as decode_kernels  # noqa: E402

from conftest import rel_err  # noqa: E402
from test_megatron_layer import (  # noqa: E402, F401 (model_parallel: autouse fixture)
    TINY, VOCAB, _build_attention, model_parallel, tiny_config, tiny_gpt)

try:  # megatron-core 0.19: the engine marks generation so; 0.16 goes by inference_context and model.eval()
    from megatron.core.inference.utils import InferenceMode
    inference_mode = InferenceMode.active
except ImportError:
    inference_mode = contextlib.nullcontext

# TINY: compression blocks l=16 every d=8, selection blocks l'=16 (n=4 chosen), window w=32.
BATCH, TOTAL = 2, 75  # past the window's wrap (32) and past n selection blocks (64), so top-n really chooses


def gpt(dtype: torch.dtype, position_embedding_type: str = "rope", backend: str = "reference", seed: int = 0,
        **config):
    torch.manual_seed(seed)
    spec = get_gpt_layer_nsa_spec(TINY, backend=backend)
    return tiny_gpt(tiny_config(params_dtype=dtype, **config), position_embedding_type, spec=spec).to(dtype).eval()


def token_batch(total: int = TOTAL, batch: int = BATCH) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, total), generator=torch.Generator().manual_seed(3))


def whole_forward(model, tokens: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, T, vocab]`` of one training-path forward over the whole sequence."""
    with torch.no_grad():
        return model(tokens, torch.arange(tokens.shape[1])[None].expand_as(tokens), None)


def context(batch: int, capacity: int) -> StaticInferenceContext:
    """A static context that returns the logits of every prompt token, not only the last one."""
    ctx = StaticInferenceContext(max_batch_size=batch, max_sequence_length=capacity)
    # megatron-core 0.16 keeps the flag on the context, 0.19 on its InferenceConfig
    setattr(getattr(ctx, "config", ctx), "materialize_only_last_token_logits", False)
    return ctx


def step(model, ctx: StaticInferenceContext, tokens: torch.Tensor, start: int,
         attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One forward of ``tokens`` (positions ``start ..``) through Megatron's inference path, moving the offset
    on as Megatron's inference wrapper does; logits ``[B, s, vocab]``."""
    positions = torch.arange(start, start + tokens.shape[1])[None].expand_as(tokens)
    with torch.no_grad(), inference_mode():
        logits = model(tokens, positions, attention_mask, inference_context=ctx, runtime_gather_output=True)
    ctx.increment_sequence_len_offset(tokens.shape[1])
    return logits


def cached_logits(model, tokens: torch.Tensor, chunks: list[int], capacity: int | None = None,
                  ctx: StaticInferenceContext | None = None) -> torch.Tensor:
    """The prompt ``tokens[:, :chunks[0]]`` then chunks of the given lengths (1: a decode step), each one
    forward through Megatron's inference path: the logits of every token, ``[B, T, vocab]``."""
    ctx = ctx or context(tokens.shape[0], capacity or tokens.shape[1])
    ctx.reset()
    outs, start = [], 0
    for length in chunks:
        outs.append(step(model, ctx, tokens[:, start:start + length], start))
        ctx.enable_decode_mode()  # as Megatron's generation loop does after the prompt
        start += length
    return torch.cat(outs, dim=1)


def greedy_by_recomputing(model, prompt: torch.Tensor, new: int) -> torch.Tensor:
    """The ``new`` tokens greedy decoding picks when every step reruns the whole sequence (no cache)."""
    tokens = prompt
    for _ in range(new):
        tokens = torch.cat([tokens, whole_forward(model, tokens)[:, -1:].argmax(-1)], dim=1)
    return tokens[:, prompt.shape[1]:]


def worst_token_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest ``||out_t - ref_t|| / ||ref_t||`` over every sequence and token of ``[B, T, vocab]``."""
    return max(rel_err(o, r) for o, r in zip(out.flatten(0, 1), ref.flatten(0, 1)))


@pytest.mark.parametrize("position_embedding_type", ["rope", "none"])
def test_reference_prefill_and_decode_equal_one_forward(position_embedding_type):
    """float64: prompts of 13 (no compression block finished yet; not a multiple of d or l'), 21 and 40
    tokens, then one token per step up to 75, in a cache longer than the sequence; Megatron's rotary
    (``rope``) or NSA's own (``none``). Also a chunk of 3 tokens after the prompt, decoded one by one."""
    model = gpt(torch.float64, position_embedding_type)
    tokens = token_batch()
    ref = whole_forward(model, tokens)
    for chunks in ([13] + [1] * 62, [21] + [1] * 54, [40] + [1] * 35, [13, 3] + [1] * 59):
        out = cached_logits(model, tokens, chunks, capacity=TOTAL + 9)
        err = worst_token_error(out, ref)
        assert err <= 1e-9, f"chunks {chunks[:2]}...: worst token error {err:.2e}"
    # where Megatron's attention keeps its KV memory: one cache per layer, by layer number
    ctx = context(BATCH, TOTAL)
    cached_logits(model, tokens[:, :20], [19, 1], ctx=ctx)
    assert sorted(ctx.key_value_memory_dict) == [layer.self_attention.layer_number for layer in model.decoder.layers]
    cache = ctx.key_value_memory_dict[1]
    assert isinstance(cache, NSAKVCache) and cache.max_seq_len == TOTAL and cache.host_lengths == [20, 20]


@pytest.mark.parametrize("prompt,total", [(21, 26), (15, 18)])
def test_triton_prefill_and_decode_equal_one_forward(prompt, total, monkeypatch):
    """float32 Triton (the training kernels for the prompt, then the decode kernels) against the float64
    reference model with the same weights. 21 is no multiple of d=8 or l'=16 and decoding finishes the
    compression block ending at 23; from 15 it crosses a block's end (15) and a new selection block (16)."""
    monkeypatch.setattr(decode_kernels, "BLOCK_N", 16)
    ref_model = gpt(torch.float64)
    model = gpt(torch.float32, backend="triton")
    model.load_state_dict(ref_model.state_dict())  # cast to float32 as it is copied
    tokens = token_batch(total)
    ref = whole_forward(ref_model, tokens)
    out = cached_logits(model, tokens, [prompt] + [1] * (total - prompt))
    err = worst_token_error(out, ref)
    assert err <= 1e-5, f"worst token error {err:.2e}"


def test_greedy_generation_with_the_cache_picks_what_recomputing_picks():
    """A hand loop of Megatron's static generation (prefill, then the argmax fed back one token at a time,
    the context in decode mode) against greedy decoding that reruns the whole sequence every step."""
    model = gpt(torch.float64)
    prompt, new = token_batch(19), 12
    ctx = StaticInferenceContext(max_batch_size=BATCH, max_sequence_length=prompt.shape[1] + new)
    logits = step(model, ctx, prompt, 0)  # only the last token's logits (Megatron's default)
    assert logits.shape == (BATCH, 1, VOCAB)
    ctx.enable_decode_mode()
    generated = [logits[:, -1].argmax(-1)]
    for i in range(new - 1):
        generated.append(step(model, ctx, generated[-1][:, None], prompt.shape[1] + i)[:, -1].argmax(-1))
    assert torch.equal(torch.stack(generated, dim=1), greedy_by_recomputing(model, prompt, new))


class _CPUEvent:
    """``torch.cuda.Event`` for the generation loop's per-token latencies, which a CPU cannot time so."""

    def __init__(self, **_):
        pass

    def record(self) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, _) -> float:
        return 0.0


class _NumberTokenizer:
    """Prompts are space-separated token ids; no end-of-document token, so every request runs to its length."""

    eod, bos = -1, None

    def tokenize(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]

    def detokenize(self, ids, **_) -> str:
        return " ".join(map(str, ids))


def test_megatron_static_engine_generates_greedily(monkeypatch):
    """Megatron's own generation: StaticInferenceEngine (legacy, the static-batch loop; the default builds a
    DynamicInferenceContext), TextGenerationController and GPTInferenceWrapper, greedy (top_k=1), prompts of
    19 and 23 tokens (the loop prefills 19, then runs one-token steps, the longer prompt's tokens fed in
    until it ends). Each request's tokens equal greedy decoding that reruns the whole sequence every step.
    What the loop sends to CUDA stays on the CPU: its devices, one ``.cuda()`` and its timing events."""
    from megatron.core.inference.engines.static_engine import StaticInferenceEngine
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
    from megatron.core.inference.sampling_params import SamplingParams
    from megatron.core.inference.text_generation_controllers.text_generation_controller import (
        TextGenerationController)

    monkeypatch.setattr(torch.cuda, "current_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
    monkeypatch.setattr(torch.cuda, "Event", _CPUEvent)
    model, new = gpt(torch.float64), 6
    prompts = [row[:n] for row, n in zip(token_batch(23), (19, 23))]
    ctx = StaticInferenceContext(max_batch_size=BATCH, max_sequence_length=23 + new)
    try:  # megatron-core 0.16: settings in an InferenceWrapperConfig; 0.19: in the context
        from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import InferenceWrapperConfig
        settings = InferenceWrapperConfig(hidden_size=64, params_dtype=torch.float64, padded_vocab_size=VOCAB,
                                          inference_batch_times_seqlen_threshold=-1, inference_max_requests=BATCH,
                                          inference_max_seq_length=23 + new)
        wrapped = GPTInferenceWrapper(model, settings, ctx)
    except ImportError:
        wrapped = GPTInferenceWrapper(model, ctx)
    engine = StaticInferenceEngine(TextGenerationController(wrapped, _NumberTokenizer()), legacy=True)
    try:
        results = engine.generate(prompts=[" ".join(map(str, p.tolist())) for p in prompts],
                                  sampling_params=SamplingParams(top_k=1, num_tokens_to_generate=new))
    finally:
        if inference_mode is not contextlib.nullcontext:
            InferenceMode.unset_active()  # 0.19's engine marks the process as generating for good
    assert isinstance(ctx.key_value_memory_dict[1], NSAKVCache)
    for prompt, result in zip(prompts, results):
        assert torch.equal(torch.as_tensor(result.generated_tokens), greedy_by_recomputing(model, prompt[None], new)[0])


def test_causal_masks_accepted_others_refused():
    """Megatron's causal mask (its attention_backend=local) for the prompt and its slice for each step,
    [..., s, offset + s], change nothing; a mask that hides a past token is refused."""
    model = gpt(torch.float64)
    tokens = token_batch(30)
    ref = cached_logits(model, tokens, [24] + [1] * 6)
    full = torch.ones(30, 30, dtype=torch.bool).triu(1)[None, None]
    ctx = context(BATCH, 30)
    outs = [step(model, ctx, tokens[:, :24], 0, attention_mask=full[..., :24, :24])]
    for t in range(24, 30):
        outs.append(step(model, ctx, tokens[:, t:t + 1], t, attention_mask=full[..., t:t + 1, :t + 1]))
    assert torch.equal(torch.cat(outs, 1), ref)
    hidden = full[..., 29:, :].clone()
    hidden[..., 3] = True
    ctx.sequence_len_offset = 29
    with pytest.raises(NotImplementedError, match="in generation is causal"):
        step(model, ctx, tokens[:, 29:], 29, attention_mask=hidden)
    with pytest.raises(ValueError, match=r"attention_mask in generation must be \[\.\.\., 1, 30\]"):
        step(model, ctx, tokens[:, 29:], 29, attention_mask=full[..., :1, :29])


def test_what_the_cache_cannot_serve_is_refused_by_name(monkeypatch):
    """Each refusal names its field, before any projection; a refused step leaves the cache as it was."""
    torch.manual_seed(0)
    config = tiny_config()
    attn = _build_attention(config).eval()
    x = torch.randn(6, BATCH, 64)

    def run(ctx, x=x, **kwargs):
        with torch.no_grad():
            return attn(x, None, inference_context=ctx, **kwargs)

    dynamic = types.SimpleNamespace(is_static_batching=lambda: False)
    with pytest.raises(NotImplementedError, match=r"StaticInferenceContext only; SimpleNamespace \(dynamic "
                                                  r"batching, DynamicInferenceContext\)"):
        run(dynamic)
    with pytest.raises(ValueError, match=r"batch \(2\) must be at most inference_context.max_batch_size \(1\)"):
        run(StaticInferenceContext(1, 16))
    with pytest.raises(ValueError, match=r"sequence_len_offset \(0\) plus 6 new tokens must be at most "
                                         r"max_sequence_length \(5\)"):
        run(StaticInferenceContext(2, 5))
    ctx = StaticInferenceContext(2, 16)
    ctx.batch_size_offset = 1
    with pytest.raises(NotImplementedError, match=r"batch_size_offset \(1\) must be 0"):
        run(ctx)
    with pytest.raises(NotImplementedError, match="packed_seq_params is not supported in generation"):
        run(StaticInferenceContext(2, 16), packed_seq_params=PackedSeqParams(qkv_format="thd"))
    with pytest.raises(ValueError, match="inference_context is for generation: NSA's KV cache is not "
                                         "differentiable"):
        attn(x.requires_grad_(), None, inference_context=StaticInferenceContext(2, 16))
    x = x.detach()
    ctx = StaticInferenceContext(2, 16)
    ctx.sequence_len_offset = 6  # no prefill came first
    with pytest.raises(ValueError, match=r"sequence_len_offset \(6\) and a batch of 2 do not continue layer 1's "
                                         r"cache \(sequence lengths None\)"):
        run(ctx, x[:1])
    ctx = StaticInferenceContext(2, 16)
    run(ctx)
    ctx.sequence_len_offset = 7  # a step skipped
    with pytest.raises(ValueError, match=r"\(7\) and a batch of 2 do not continue layer 1's cache \(sequence "
                                         r"lengths \[6, 6\]\)"):
        run(ctx, x[:1])
    ctx.sequence_len_offset = 6
    with pytest.raises(ValueError, match=r"\(6\) and a batch of 1 do not continue"):
        run(ctx, x[:1, :1])
    run(ctx, x[:1])  # the refused steps changed nothing
    assert ctx.key_value_memory_dict[1].host_lengths == [7, 7]
    # set on the config the layer was built with (building it so needs a CP group, or TP > 1)
    for field, value, match in (("context_parallel_size", 2, r"context_parallel_size \(2\) must be 1 for generation"),
                                ("sequence_parallel", True, r"sequence_parallel \(True\) must be False for "
                                                            "generation")):
        monkeypatch.setattr(config, field, value)
        with pytest.raises(ValueError, match=match):
            run(StaticInferenceContext(2, 16))
        monkeypatch.undo()


# --- TP=2 on gloo: the same generation as TP=1 --------------------------------------------------------

def _tp1(rank: int, init_file: str, tmp: str) -> None:
    from test_megatron_parallel import setup_rank
    setup_rank(rank, 1, init_file, 1)
    model = gpt(torch.float64, seed=0)
    tokens = token_batch(40)
    torch.save({"params": {n: p.detach() for n, p in model.named_parameters()}, "logits": whole_forward(model, tokens),
                "tokens": tokens}, os.path.join(tmp, "ref.pt"))


def _tp2(rank: int, init_file: str, tmp: str) -> None:
    from test_megatron_parallel import _shard, setup_rank
    setup_rank(rank, 2, init_file, 2)
    ref = torch.load(os.path.join(tmp, "ref.pt"))
    model = gpt(torch.float64, seed=1, tensor_model_parallel_size=2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(_shard(model, ref["params"], rank, 2)[name])
    out = cached_logits(model, ref["tokens"], [21] + [1] * 19)
    err = worst_token_error(out, ref["logits"])
    assert err <= 1e-9, f"rank {rank}: worst token error {err:.2e}"


@pytest.mark.timeout(300)
def test_tp2_decode_equals_tp1_forward():
    """Each TP rank caches its own KV groups; prefill + decode at TP=2 gives TP=1's whole-forward logits."""
    from test_megatron_parallel import spawn
    with tempfile.TemporaryDirectory() as tmp:
        spawn(_tp1, 1, tmp)
        spawn(_tp2, 2, tmp)
