"""What a Megatron batch says about documents: packed sequences (``thd``) or an attention mask.

NSA is causal by construction, so a mask is only read to learn where documents start. Megatron's
convention: True = masked out. A mask is compared whole (every row NSA's reading relies on), and
the verdict is kept per mask tensor, since every layer of a step gets the same one.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.weak import WeakTensorKeyDictionary

from ..core import Bounds, document_bounds

_verdicts: WeakTensorKeyDictionary = WeakTensorKeyDictionary()  # mask -> (its version, verdict)


def _cached(mask: torch.Tensor, key: tuple, compute: Any) -> Any:
    """``compute()`` once per mask contents (an in-place change bumps the tensor's version)."""
    seen = _verdicts.get(mask)
    if seen is not None and seen[0] == (mask._version, *key):
        return seen[1]
    verdict = compute()
    _verdicts[mask] = ((mask._version, *key), verdict)
    return verdict


def packed_documents(packed_seq_params: Any, tokens: int, batch: int) -> list[tuple[int, int]]:
    """Document bounds of a packed (``thd``) batch of ``tokens`` tokens, checked before any work.

    With padding (``cu_seqlens_q_padded``) a document runs with the pad tokens after it, which its
    own tokens never see (causal), so their outputs are exact.
    """
    qkv_format = getattr(packed_seq_params, "qkv_format", None)
    if qkv_format != "thd":
        raise NotImplementedError(f"packed_seq_params.qkv_format must be 'thd' for NSA, got {qkv_format!r}")
    if batch != 1:
        raise ValueError(f"packed sequences are one row: hidden_states must be [tokens, 1, hidden], got batch {batch}")
    p = packed_seq_params
    for q_name, kv_name in (("cu_seqlens_q", "cu_seqlens_kv"), ("cu_seqlens_q_padded", "cu_seqlens_kv_padded")):
        cu_q, cu_kv = getattr(p, q_name, None), getattr(p, kv_name, None)
        if cu_q is not None and cu_kv is not None and not torch.equal(cu_q, cu_kv):
            raise ValueError(f"packed_seq_params.{q_name} must equal {kv_name} (self-attention)")
    cu = p.cu_seqlens_q_padded if getattr(p, "cu_seqlens_q_padded", None) is not None else p.cu_seqlens_q
    if cu is None:
        raise ValueError("packed_seq_params.cu_seqlens_q must be set")
    return document_bounds(cu, tokens)


def _row_documents(mask: torch.Tensor) -> Bounds:
    """The documents of one ``[s, s]`` mask that is causal with document resets (Megatron-LM's
    ``--reset-attention-mask``); anything else raises."""
    seq = mask.shape[0]
    t = torch.arange(seq, device=mask.device)
    # A document starts where a token may not see the one before it.
    starts = torch.cat([t[:1], t[1:][mask[t[1:], t[1:] - 1]]])
    doc = torch.zeros(seq, dtype=torch.long, device=mask.device)
    doc[starts] = 1
    doc = doc.cumsum(0)
    expected = (t[None, :] > t[:, None]) | (doc[None, :] != doc[:, None])
    if not torch.equal(mask, expected):
        raise NotImplementedError("NSASelfAttention is causal; attention_mask must be None, causal, or "
                                  "causal with document resets (padding and custom masks are not supported)")
    return document_bounds(torch.cat([starts, t.new_tensor([seq])]), seq)


def mask_documents(attention_mask: torch.Tensor | None, seq: int, batch: int) -> list[Bounds] | None:
    """``None`` for no mask or a causal one; for a causal mask with document resets, the documents of
    each batch row; anything else raises."""
    if attention_mask is None:
        return None
    if attention_mask.shape[-2:] != (seq, seq):
        raise ValueError(f"attention_mask must be [..., {seq}, {seq}], got shape {tuple(attention_mask.shape)}")
    rows = attention_mask.reshape(-1, seq, seq)
    if rows.shape[0] not in (1, batch):
        raise ValueError(f"attention_mask must be [1 or {batch}, 1, {seq}, {seq}], got shape "
                         f"{tuple(attention_mask.shape)}")

    def verdict() -> list[Bounds] | None:
        causal = torch.ones(seq, seq, dtype=torch.bool, device=rows.device).triu(1)
        if torch.equal(rows, causal.expand_as(rows)):
            return None
        return [_row_documents(mask) for mask in rows]

    documents = _cached(attention_mask, (seq,), verdict)
    return None if documents is None else documents * (batch // len(documents))


def check_causal_rows(attention_mask: torch.Tensor, positions: torch.Tensor, full: int, where: str) -> None:
    """A mask of some query rows only, ``[..., seq, full]``, row ``j`` that of position ``positions[j]``
    over keys ``0 .. full-1``: Megatron slices it so per rank under context parallelism (``where``
    says so) and per step in generation. It must be causal, compared whole."""
    seq = positions.shape[0]
    if attention_mask.shape[-2:] != (seq, full):
        raise ValueError(f"attention_mask {where} must be [..., {seq}, {full}], got shape "
                         f"{tuple(attention_mask.shape)}")

    def verdict() -> bool:
        rows = attention_mask.reshape(-1, seq, full)
        causal = torch.arange(full, device=rows.device)[None, :] > positions.to(rows.device)[:, None]
        return torch.equal(rows, causal.expand_as(rows))

    if not _cached(attention_mask, (seq, full), verdict):
        raise NotImplementedError(f"NSASelfAttention {where} is causal; attention_mask must be None or causal "
                                  "(document resets, padding and custom masks are not supported)")
