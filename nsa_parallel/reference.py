"""Plain PyTorch NSA, written to be read against the design brief (section 1).

Every fast path is tested against these functions run in float64. They work
in any dtype and on any device, chunk over queries so that no ``T x T`` score
matrix is ever built, and get their gradients from autograd. The branches are
put together (rotary, compression, gates) once, for every backend, in
:mod:`nsa_parallel.core`.
"""
from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from .compression import compressed_positions
from .config import NSAConfig

QUERY_CHUNK = 128


def expand_kv_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, S, G, D] -> [B, S, H, D]``: query head ``h`` uses KV head ``h // (H // G)``."""
    return x.repeat_interleave(num_heads // x.shape[2], dim=2)


def masked_softmax(scores: torch.Tensor, visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the last dim restricted to ``visible``; rows with nothing visible give zeros.

    Returns the probabilities and the log-sum-exp (``-inf`` on empty rows). The
    row max is detached (softmax does not depend on it), so no ``inf - inf``
    ever reaches autograd.
    """
    if scores.shape[-1] == 0:
        return scores, scores.new_full(scores.shape[:-1], float("-inf"))
    scores = scores.masked_fill(~visible, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    unnormalised = torch.exp(scores - row_max)
    denom = unnormalised.sum(dim=-1, keepdim=True)
    probs = unnormalised / torch.where(denom > 0, denom, torch.ones_like(denom))
    return probs, (row_max + torch.log(denom)).squeeze(-1)


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float
) -> torch.Tensor:
    """``q [B, Tq, H, dk]``, ``k``/``v [B, S, G, d]``, ``visible`` broadcastable to ``[B, H, Tq, S]``;
    rows with nothing visible give zeros.

    Torch's SDPA with a boolean mask is exactly the softmax over the visible keys. In float64,
    the truth every fast path is tested against, it runs torch's math backend (the softmax
    written out, whose gradient is exactly zero where it should be); in other dtypes the fused
    kernel, several times faster on the CPU, where training runs this. SDPA gives NaN on a row
    with nothing visible, so such rows see key 0 and are zeroed after: their zero output
    gradient then sends nothing back through key 0.
    """
    batch, num_queries, num_heads, _ = q.shape
    if k.shape[1] == 0:  # zeros, still a function of q, k and v so that each gets a (zero) gradient
        return (q[..., :1] * 0).expand(*q.shape[:-1], v.shape[-1]) + (k.sum() + v.sum()) * 0
    visible = visible.expand(batch, num_heads, num_queries, k.shape[1])
    empty = ~visible.any(dim=-1, keepdim=True)
    first_key = torch.arange(k.shape[1], device=q.device) == 0
    # A non-finite key or value must reach only the rows that see it: a masked score times it would
    # still be 0 * inf = NaN. Attention runs on zeros in its place; the rows that see it become NaN.
    bad = ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))  # [B, S, G]
    has_bad = bool(bad.any())
    if has_bad:
        k, v = k.masked_fill(bad[..., None], 0.0), v.masked_fill(bad[..., None], 0.0)
    with sdpa_kernel(SDPBackend.MATH) if q.dtype == torch.float64 else contextlib.nullcontext():
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), expand_kv_heads(k, num_heads).transpose(1, 2),
            expand_kv_heads(v, num_heads).transpose(1, 2), attn_mask=visible | (empty & first_key), scale=scale)
    out = out.masked_fill(empty, 0.0)
    if has_bad:
        sees_bad = (visible & expand_kv_heads(bad[..., None], num_heads).permute(0, 2, 3, 1)).any(-1, keepdim=True)
        out = out.masked_fill(sees_bad, float("nan"))
    return out.transpose(1, 2)


def _query_chunks(seq_len: int):
    # No queries still make one (empty) chunk: T = 0 gives an empty output, as the kernels do.
    for start in range(0, max(seq_len, 1), QUERY_CHUNK):
        yield start, min(start + QUERY_CHUNK, seq_len)


def _positions(start: int, stop: int, device: torch.device) -> torch.Tensor:
    return torch.arange(start, stop, device=device)


# --- 1.1 compression branch -------------------------------------------------

def unfold_blocks(x: torch.Tensor, block_size: int, stride: int) -> torch.Tensor:
    """``[B, T, G, D] -> [B, Tc, G, block_size, D]``: block ``i`` is tokens ``[i*stride, i*stride + block_size)``."""
    if x.shape[1] < block_size:
        return x.new_zeros(x.shape[0], 0, x.shape[2], block_size, x.shape[3])
    return x.unfold(1, block_size, stride).permute(0, 1, 2, 4, 3)


def compress_tokens(
    x: torch.Tensor, position: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
    b2: torch.Tensor, config: NSAConfig,
) -> torch.Tensor:
    """``phi(block) = W2 · gelu(W1 · flatten(block + pos) + b1) + b2``, per KV head, one block at a time.

    ``x [B, T, G, D]``, ``position [G, l, D]``, ``w1 [G, l*D, h]``, ``w2 [G, h, D']``;
    returns ``[B, Tc, G, D']``.
    """
    blocks = unfold_blocks(x, config.compress_block_size, config.compress_stride) + position
    flat = blocks.flatten(-2)  # [B, Tc, G, l*D]
    hidden = torch.nn.functional.gelu(torch.einsum("btgi,gih->btgh", flat, w1) + b1)
    return torch.einsum("btgh,ghd->btgd", hidden, w2) + b2


def compressed_attention(
    q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor, config: NSAConfig, scale: float,
    query_offset: int = 0,
) -> torch.Tensor:
    """Query ``t`` (at position ``query_offset + t``) attends to compression block ``i`` iff
    ``i*d + l - 1 <= query_offset + t``."""
    ends = compressed_positions(torch.arange(k_cmp.shape[1], device=q.device), config)
    out = []
    for t0, t1 in _query_chunks(q.shape[1]):
        visible = ends[None, :] <= _positions(query_offset + t0, query_offset + t1, q.device)[:, None]
        out.append(masked_attention(q[:, t0:t1], k_cmp, v_cmp, visible, scale))
    return torch.cat(out, dim=1)


# --- 1.2 selection branch ---------------------------------------------------

def overlap_weights(num_compressed: int, num_blocks: int, config: NSAConfig, device: torch.device) -> torch.Tensor:
    """``W[i, j] = |[i*d, i*d + l) ∩ [j*l', (j+1)*l')| / d``, shape ``[Tc, Ns]``."""
    d, l, ls = config.compress_stride, config.compress_block_size, config.select_block_size
    i = torch.arange(num_compressed, device=device)[:, None]
    j = torch.arange(num_blocks, device=device)[None, :]
    overlap = torch.minimum(i * d + l, (j + 1) * ls) - torch.maximum(i * d, j * ls)
    return overlap.clamp(min=0) / d


def selection_scores(
    q: torch.Tensor, k_cmp: torch.Tensor, config: NSAConfig, scale: float, query_offset: int = 0
) -> torch.Tensor:
    """``p_grp[b, t, g, j]``: compression probabilities mapped to selection blocks by overlap,
    summed over the heads of group ``g``; ``[B, T, G, Ns]`` with ``Ns`` the blocks covering
    positions ``0 .. query_offset + T - 1``."""
    _, seq_len, num_heads, _ = q.shape
    num_groups = k_cmp.shape[2]
    num_blocks = config.num_select_blocks(query_offset + seq_len)
    ends = compressed_positions(torch.arange(k_cmp.shape[1], device=q.device), config)
    weights = overlap_weights(k_cmp.shape[1], num_blocks, config, q.device).to(q.dtype)
    out = []
    for t0, t1 in _query_chunks(seq_len):
        t = _positions(query_offset + t0, query_offset + t1, q.device)
        scores = torch.einsum("bthd,bshd->bhts", q[:, t0:t1], expand_kv_heads(k_cmp, num_heads)) * scale
        p_cmp, _ = masked_softmax(scores, ends[None, :] <= t[:, None])
        out.append(group_block_scores(p_cmp, weights, num_groups))
    return torch.cat(out, dim=1)


def group_block_scores(p_cmp: torch.Tensor, weights: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Compression probabilities ``[B, H, Tq, Tc]`` -> selection-block scores summed over each
    group's heads, ``[B, Tq, G, Ns]``, through the overlap ``weights [Tc, Ns]``."""
    batch, num_heads, num_queries, _ = p_cmp.shape
    p_slc = p_cmp @ weights  # [B, H, Tq, Ns]
    p_grp = p_slc.view(batch, num_groups, num_heads // num_groups, num_queries, weights.shape[1]).sum(2)
    return p_grp.permute(0, 2, 1, 3)


def selection_keys(scores: torch.Tensor, config: NSAConfig, query_offset: int | torch.Tensor = 0) -> torch.Tensor:
    """Ranking keys: ``+inf`` for the forced initial and two local blocks, ``-inf`` for blocks
    starting after the query, the score otherwise. ``query_offset`` may be an integer tensor
    ``[B, 1, 1, 1]`` (decoding: every sequence at its own position)."""
    ls = config.select_block_size
    t = query_offset + torch.arange(scores.shape[1], device=scores.device)[:, None, None]
    j = torch.arange(scores.shape[3], device=scores.device)
    own_block = t // ls
    forced = (j == 0) | (j == own_block) | (j == own_block - 1)
    key = torch.where(forced, float("inf"), scores)
    return torch.where(j * ls <= t, key, float("-inf"))


def top_blocks(scores: torch.Tensor, config: NSAConfig, query_offset: int | torch.Tensor = 0) -> torch.Tensor:
    """The ``n`` chosen blocks per row of ``scores [B, T, G, Ns]``: int32, ascending, ``-1`` padded.

    Forced blocks always win, ineligible ones never; equal scores prefer the lower block id.
    """
    n, num_blocks = config.num_selected_blocks, scores.shape[3]
    key = selection_keys(scores, config, query_offset)
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :n]
    taken = torch.gather(key, -1, order) > float("-inf")
    chosen = torch.where(taken, order, num_blocks)  # padding sorts last
    chosen = torch.sort(chosen, dim=-1).values
    chosen = torch.where(chosen == num_blocks, -1, chosen)
    if chosen.shape[-1] < n:
        chosen = torch.nn.functional.pad(chosen, (0, n - chosen.shape[-1]), value=-1)
    return chosen.to(torch.int32).contiguous()


def select_blocks(
    q: torch.Tensor, k_cmp: torch.Tensor, config: NSAConfig, scale: float, query_offset: int = 0
) -> torch.Tensor:
    """Top-n selection block ids per query and KV group: ``[B, T, G, n]`` int32, ascending, ``-1`` padded."""
    scores = selection_scores(q, k_cmp, config, scale, query_offset)
    return top_blocks(scores, config, query_offset)


def selected_keys(block_indices: torch.Tensor, seq_len: int, config: NSAConfig) -> torch.Tensor:
    """``block_indices [..., n]`` (``-1`` unused) -> bool ``[..., seq_len]``: key ``s`` lies in a chosen block."""
    num_blocks = config.num_select_blocks(seq_len)
    idx = block_indices.long()
    picked = torch.zeros(*idx.shape[:-1], num_blocks + 1, dtype=torch.bool, device=idx.device)
    picked.scatter_(-1, torch.where(idx < 0, num_blocks, idx), True)
    return picked[..., torch.arange(seq_len, device=idx.device) // config.select_block_size]


def selection_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_indices: torch.Tensor,
    config: NSAConfig,
    scale: float,
    query_offset: int = 0,
) -> torch.Tensor:
    """Query ``t`` (at position ``query_offset + t``) attends to keys ``s <= query_offset + t``
    whose block ``s // l'`` its group selected; keys sit at positions ``0 .. S-1``."""
    num_heads, seq_len = q.shape[2], k.shape[1]
    key_pos = torch.arange(seq_len, device=q.device)
    out = []
    for t0, t1 in _query_chunks(q.shape[1]):
        in_selected = selected_keys(block_indices[:, t0:t1], seq_len, config)  # [B, Tq, G, S]
        causal = key_pos[None, :] <= _positions(query_offset + t0, query_offset + t1, q.device)[:, None]
        visible = expand_kv_heads(in_selected, num_heads).permute(0, 2, 1, 3) & causal
        out.append(masked_attention(q[:, t0:t1], k, v, visible, scale))
    return torch.cat(out, dim=1)


# --- 1.3 sliding-window branch ----------------------------------------------

def window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window_size: int, scale: float, query_offset: int = 0
) -> torch.Tensor:
    """Query ``t`` (at position ``p = query_offset + t``) attends to keys ``max(0, p-w+1) .. p``;
    keys sit at positions ``0 .. S-1``."""
    out = []
    for t0, t1 in _query_chunks(q.shape[1]):
        p0, p1 = query_offset + t0, query_offset + t1
        s0 = max(0, p0 - window_size + 1)
        t = _positions(p0, p1, q.device)[:, None]
        s = _positions(s0, p1, q.device)[None, :]
        visible = (s <= t) & (s > t - window_size)
        out.append(masked_attention(q[:, t0:t1], k[:, s0:p1], v[:, s0:p1], visible, scale))
    return torch.cat(out, dim=1)
