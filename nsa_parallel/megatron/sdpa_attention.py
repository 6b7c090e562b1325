"""``SDPACoreAttention``: causal attention through torch's fused ``scaled_dot_product_attention`` in
Megatron's ``core_attention`` slot, the full-attention baseline NSA is compared with.

Megatron's own local ``DotProductAttention`` builds the whole ``[b, heads, s, s]`` score matrix (out of
memory at 32k tokens); this module runs cuDNN's or flash attention's fused kernel instead, so the
baseline is as fast as torch makes dense attention.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide
from torch.nn.attention import SDPBackend, sdpa_kernel

log = logging.getLogger(__name__)

FUSED_BACKENDS = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION)
# For shapes and dtypes neither fused kernel takes (float32, head dims they lack): still no s x s matrix.
FALLBACK_BACKENDS = (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)
_chosen: dict[tuple, SDPBackend] = {}


def _seconds_per_step(backend: SDPBackend, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                      dropout_p: float, iters: int) -> float | None:
    """Seconds of one causal forward+backward on ``backend``, or ``None`` if it does not run this case."""
    q, k, v = (torch.randn(shape, dtype=dtype, device=device, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape, dtype=dtype, device=device)

    def step() -> None:
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        out.backward(grad)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # sdpa_kernel warns why a backend declines; the error says enough
            step()  # warm-up, and whether the backend takes this case at all
    except RuntimeError:
        return None
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / iters


def choose_backend(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, dropout_p: float = 0.0,
                   iters: int = 3) -> SDPBackend:
    """The SDPA backend for causal attention on ``[b, heads, s, head_dim]`` inputs.

    CPU: math. CUDA: the faster of cuDNN and flash attention, timed (forward+backward, ``iters`` steps)
    once per (shape, dtype, device, dropout on/off) and cached; a backend that does not take the case is
    skipped; if neither does, the first of memory-efficient and math that does.
    """
    if device.type != "cuda":
        return SDPBackend.MATH
    key = (tuple(shape), dtype, device, dropout_p > 0)
    if key not in _chosen:
        # Timing must not move the training RNG (dropout draws) nor need the caller's autograd mode.
        with torch.random.fork_rng(devices=[device]), torch.enable_grad():
            times = {b: _seconds_per_step(b, shape, dtype, device, dropout_p, iters) for b in FUSED_BACKENDS}
            ran = {b: t for b, t in times.items() if t is not None}
            if ran:
                choice = min(ran, key=ran.__getitem__)
            else:
                choice = next((b for b in FALLBACK_BACKENDS
                               if _seconds_per_step(b, shape, dtype, device, dropout_p, 1) is not None),
                              SDPBackend.MATH)
        timed = ", ".join(f"{b.name} {'n/a' if t is None else f'{t * 1e3:.2f} ms'}" for b, t in times.items())
        log.info("SDPACoreAttention: %s for %s %s (forward+backward: %s)", choice.name, list(shape),
                 str(dtype).removeprefix("torch."), timed)
        _chosen[key] = choice
    return _chosen[key]


def check_sdpa_config(config: TransformerConfig, attn_mask_type: AttnMaskType) -> None:
    """Raises ``ValueError`` naming the field for a setting ``SDPACoreAttention`` cannot honour."""
    if attn_mask_type != AttnMaskType.causal:
        raise ValueError(f"attn_mask_type ({attn_mask_type}) must be AttnMaskType.causal: "
                         "SDPACoreAttention runs is_causal=True")
    if config.context_parallel_size > 1:
        raise ValueError(f"context_parallel_size ({config.context_parallel_size}) must be 1: SDPACoreAttention "
                         "attends within one rank's tokens")
    if config.window_size is not None:
        raise ValueError(f"window_size ({config.window_size}) must be None: SDPACoreAttention has no "
                         "sliding window")
    if config.softmax_type != "vanilla":
        raise ValueError(f"softmax_type ({config.softmax_type!r}) must be 'vanilla': SDPA has no softmax offset")
    for name in ("qk_clip", "log_max_attention_logit"):
        if getattr(config, name, False):
            raise ValueError(f"{name} must be False: SDPA does not return the attention logits")


class SDPACoreAttention(MegatronModule):
    """Causal dot-product attention with ``torch.nn.functional.scaled_dot_product_attention``.

    A drop-in for Megatron's ``DotProductAttention`` (same constructor and forward): ``query [sq, b, np,
    hn]``, ``key``/``value [sk, b, ng, hn]`` (KV groups are repeated to the heads, as
    ``DotProductAttention`` does) -> ``[sq, b, np * hn]``. Backend: see :func:`choose_backend`.

    Honoured: ``softmax_scale`` (default ``1/sqrt(hn)``) and ``attention_dropout`` (in training, with
    Megatron's model-parallel CUDA RNG as ``DotProductAttention`` uses). ``attention_softmax_in_fp32``:
    SDPA's kernels (and the math backend for float32) keep scores and softmax in fp32 whatever it says.
    ``apply_query_key_layer_scaling``: ``DotProductAttention`` divides the scores by ``layer_number`` in
    the low-precision matmul and multiplies them back before the softmax (which the config then forces
    into fp32), so the attention is unchanged; it only keeps fp16 scores in range, which SDPA's fp32
    accumulation does not need, so it is accepted as the no-op it is here. Refused by name: see
    :func:`check_sdpa_config`, and in ``forward`` ``attention_bias``, ``packed_seq_params`` and any
    ``attention_mask`` that is not plainly causal.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: Any = None,
    ):
        super().__init__(config=config)
        check_sdpa_config(config, attn_mask_type)
        self.layer_number, self.attn_mask_type, self.attention_type = layer_number, attn_mask_type, attention_type
        self.tp_group = pg_collection.tp if pg_collection is not None else \
            parallel_state.get_tensor_model_parallel_group()
        tp_size = self.tp_group.size()
        self.heads_per_partition = divide(config.num_attention_heads, tp_size)
        self.groups_per_partition = divide(config.num_query_groups, tp_size)
        self.head_dim = config.kv_channels
        self.softmax_scale = 1.0 / math.sqrt(self.head_dim) if softmax_scale is None else softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def _check_mask(self, attention_mask: torch.Tensor | None, seq: int) -> None:
        """``None`` or Megatron's causal mask (bool, True above the diagonal) pass; anything else raises."""
        if attention_mask is None:
            return
        causal = torch.ones(seq, seq, dtype=torch.bool, device=attention_mask.device).triu(1)
        if (attention_mask.dtype != torch.bool or attention_mask.shape[-2:] != (seq, seq)
                or not bool((attention_mask == causal).all())):
            raise ValueError(
                f"attention_mask (shape {tuple(attention_mask.shape)}, {attention_mask.dtype}) must be None or "
                "causal: SDPACoreAttention runs is_causal=True (padding, document and custom masks are not "
                "supported)")

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:
        if packed_seq_params is not None:
            raise ValueError("packed_seq_params must be None: SDPACoreAttention runs one causal sequence per "
                             "row (packed documents are not supported)")
        if attention_bias is not None:
            raise ValueError("attention_bias must be None: SDPACoreAttention has no attention bias")
        if attn_mask_type is not None and attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"attn_mask_type ({attn_mask_type}) must be AttnMaskType.causal")
        seq, batch, heads, head_dim = query.shape
        if key.shape[0] != seq:
            # SDPA's is_causal aligns the mask top-left, which is causal only for self-attention.
            raise ValueError(f"key has {key.shape[0]} positions, query {seq}: SDPACoreAttention is causal "
                             "self-attention (no KV cache)")
        self._check_mask(attention_mask, seq)
        repeat = heads // key.shape[2]
        if repeat > 1:  # GQA: each group's keys and values serve `repeat` consecutive heads
            key, value = key.repeat_interleave(repeat, dim=2), value.repeat_interleave(repeat, dim=2)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, np, s, hn]
        dropout_p = self.dropout_p if self.training else 0.0
        # As DotProductAttention: dropout draws from the model-parallel RNG stream (distinct per TP rank).
        fork = dropout_p > 0 and q.is_cuda and not self.config.sequence_parallel
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if fork else contextlib.nullcontext()
        backend = choose_backend(tuple(q.shape), q.dtype, q.device, dropout_p)
        with rng, sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True,
                                                 scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(seq, batch, heads * head_dim)
