"""Generation through Megatron-core's static inference context (``StaticInferenceContext``).

Megatron's attention keeps each layer's KV memory in ``inference_context.key_value_memory_dict``
under its ``layer_number``, sized ``max_batch_size`` x ``max_sequence_length``, and writes each
step's tokens at ``sequence_len_offset``. NSA keeps its :class:`~nsa_parallel.inference.NSAKVCache`
there instead and runs :func:`~nsa_parallel.inference.prefill` at offset 0 and
:func:`~nsa_parallel.inference.decode` after, one token at a time.
"""
from __future__ import annotations

from typing import Any

import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from ..core import BranchKV, Compressors
from ..inference import NSAKVCache, decode, prefill
from ..rotary import Rotary
from .core_attention import NSACoreAttention
from .documents import check_causal_rows


def static_step_offset(context: Any, config: TransformerConfig, seq: int, batch: int,
                       attention_mask: torch.Tensor | None, packed_seq_params: Any, needs_grad: bool) -> int:
    """The position of this step's first token (``sequence_len_offset``); raises, naming the field, for
    what NSA's cache cannot serve. Host-side only: call it before any projection."""
    if not context.is_static_batching():
        raise NotImplementedError("NSASelfAttention generates with StaticInferenceContext only; "
                                  f"{type(context).__name__} (dynamic batching, DynamicInferenceContext) is not "
                                  "supported")
    if config.context_parallel_size > 1:
        raise ValueError(f"context_parallel_size ({config.context_parallel_size}) must be 1 for generation: NSA's KV "
                         "cache holds whole sequences")
    if config.sequence_parallel:
        raise ValueError("sequence_parallel (True) must be False for generation: a decode step is one token "
                         "(Megatron's static generation refuses it too)")
    if needs_grad:
        raise ValueError("inference_context is for generation: NSA's KV cache is not differentiable; run under "
                         "torch.no_grad() or torch.inference_mode()")
    if context.batch_size_offset:
        raise NotImplementedError(f"inference_context.batch_size_offset ({context.batch_size_offset}) must be 0: NSA's "
                                  "cache takes whole batches, not the micro-batches of pipeline-parallel generation "
                                  "(megatron-core 0.16 makes them past inference_batch_times_seqlen_threshold; "
                                  "-1 keeps batches whole)")
    offset = context.sequence_len_offset
    if batch > context.max_batch_size:
        raise ValueError(f"batch ({batch}) must be at most inference_context.max_batch_size ({context.max_batch_size})")
    if offset + seq > context.max_sequence_length:
        raise ValueError(f"inference_context.sequence_len_offset ({offset}) plus {seq} new tokens must be at most "
                         f"max_sequence_length ({context.max_sequence_length})")
    if packed_seq_params is not None:
        raise NotImplementedError("packed_seq_params is not supported in generation: NSA's cache holds one sequence "
                                  "per batch row")
    if attention_mask is not None:  # Megatron's mask rows of this step's tokens over every key so far
        check_causal_rows(attention_mask, torch.arange(offset, offset + seq), offset + seq, "in generation")
    return offset


def cached_core_attention(context: Any, layer_number: int, core: NSACoreAttention, query: torch.Tensor,
                          kv: BranchKV, gate_logits: torch.Tensor, rotary: Rotary) -> torch.Tensor:
    """:class:`NSACoreAttention`'s forward for this step's tokens (``[s, b, heads, d]``, ``rotary`` of
    positions ``0 .. offset+s-1``) against the layer's cache in ``context``: at offset 0 a prefill (the
    cache made on first use), after it one decode step per token. Returns ``[s, b, heads * dv]``."""
    seq, batch = query.shape[:2]
    q, gates, kv = query.transpose(0, 1), gate_logits.transpose(0, 1), kv.map(lambda t: t.transpose(0, 1))
    phi = Compressors(core.compress_k, core.compress_v)
    run = dict(scale=core.softmax_scale, backend=core.backend)
    offset = context.sequence_len_offset
    cache = context.key_value_memory_dict.get(layer_number)
    if offset == 0:
        if cache is None:
            k, v = kv.slc
            cache = NSAKVCache(core.nsa_config, context.max_batch_size, context.max_sequence_length, k.shape[2],
                               k.shape[3], v.shape[3], device=k.device, dtype=k.dtype)
            context.key_value_memory_dict[layer_number] = cache
        out = prefill(cache, q, kv, gates, phi, rotary, **run)
    else:
        held = None if cache is None else cache.host_lengths
        if held != [offset] * batch:
            raise ValueError(f"inference_context.sequence_len_offset ({offset}) and a batch of {batch} do not continue "
                             f"layer {layer_number}'s cache (sequence lengths {held}): a generation starts at offset 0 "
                             "and each step moves the offset on by its tokens")
        out = torch.cat([decode(cache, q[:, i:i + 1], kv.map(lambda t: t[:, i:i + 1]), gates[:, i:i + 1], phi,
                                rotary, **run) for i in range(seq)], dim=1)
    return out.transpose(0, 1).reshape(seq, batch, -1)
