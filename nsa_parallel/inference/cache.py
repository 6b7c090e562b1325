"""NSA's KV cache for one layer: what each branch needs of the past, for a batch of sequences.

Per sequence ``b`` holding ``lengths[b]`` tokens (positions ``0 .. lengths[b]-1``):

- selection branch: keys (rotated) and values of every token, ``[B, S, G, d]``;
- window branch: the last ``w`` keys (rotated) and values in a ring, position ``p`` at slot ``p % w``;
- compression branch: the compressed key (rotated at the block's last token) and value of every
  finished block, plus the raw (unrotated) keys and values of the last ``l`` tokens in a ring
  (slot ``p % l``): a block ends every ``d`` tokens once ``l`` are seen, and ``phi`` then runs once
  on those ``l`` tokens.

Storage is sized for ``max_batch`` sequences of ``max_seq_len`` tokens and zero-filled, so slots
no query may see hold finite values (a masked softmax weight of 0 times NaN would be NaN).
``lengths`` lives on the device: an append reads and writes it there, with no host
synchronisation, so a decode step can be captured in a CUDA graph. The host keeps its own copy of
the lengths (exact: each append adds one token per sequence), used only for the capacity check
and to skip ``phi`` on steps where no block finishes.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..config import NSAConfig

# phi for the blocks that end at ``end [B]``: raw keys/values ``[B, l, G, d]`` -> ``([B, G, dk], [B, G, dv])``.
Compress = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _ring_positions(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """``[B, size]``: the position held by each ring slot after ``lengths`` tokens (``< 0``: empty).

    Slot ``s`` holds the latest position ``p <= lengths - 1`` with ``p % size == s``.
    """
    slots = torch.arange(size, device=lengths.device)
    last = lengths[:, None] - 1
    return last - torch.remainder(last - slots, size)


class NSAKVCache:
    """The decode-time state of one NSA layer (see the module docstring for the layout)."""

    def __init__(self, config: NSAConfig, max_batch: int, max_seq_len: int, num_kv_heads: int, head_dim: int,
                 v_head_dim: int | None = None, *, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32):
        for name, value in (("max_batch", max_batch), ("max_seq_len", max_seq_len),
                            ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} ({value!r}) must be a positive integer")
        self.config, self.max_batch, self.max_seq_len = config, max_batch, max_seq_len
        dk, dv, g = head_dim, v_head_dim or head_dim, num_kv_heads
        self.window = min(config.window_size, max_seq_len)  # a longer ring would never fill
        num_cmp = config.num_compressed(max_seq_len)
        alloc = dict(device=device, dtype=dtype)
        self.k_slc = torch.zeros(max_batch, max_seq_len, g, dk, **alloc)
        self.v_slc = torch.zeros(max_batch, max_seq_len, g, dv, **alloc)
        self.k_win = torch.zeros(max_batch, self.window, g, dk, **alloc)
        self.v_win = torch.zeros(max_batch, self.window, g, dv, **alloc)
        self.k_cmp = torch.zeros(max_batch, num_cmp, g, dk, **alloc)
        self.v_cmp = torch.zeros(max_batch, num_cmp, g, dv, **alloc)
        self.k_raw = torch.zeros(max_batch, config.compress_block_size, g, dk, **alloc)
        self.v_raw = torch.zeros(max_batch, config.compress_block_size, g, dv, **alloc)
        self.lengths = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self._rows = torch.arange(max_batch, device=device)
        self._host_lengths: list[int] | None = None  # None: not prefilled (new or reset)

    # -- bookkeeping -----------------------------------------------------------

    @property
    def batch_size(self) -> int | None:
        """Sequences held since the last prefill; ``None`` before one (or after ``reset()``)."""
        return None if self._host_lengths is None else len(self._host_lengths)

    @property
    def host_lengths(self) -> list[int] | None:
        """Each held sequence's length as the host knows it (no device access); ``None`` before a prefill."""
        return None if self._host_lengths is None else list(self._host_lengths)

    def reset(self) -> None:
        """Forgets every sequence; the next call must be ``prefill`` (storage is kept)."""
        self.lengths.zero_()
        self._host_lengths = None

    def sync_host_lengths(self) -> None:
        """Re-reads the host copy of the lengths from the device (one synchronisation). Needed after
        replaying a captured decode step: the capture advanced the host copy once, replays only the
        device lengths."""
        if self._host_lengths is not None:
            self._host_lengths = self.lengths[:len(self._host_lengths)].tolist()

    def storage(self) -> dict[str, torch.Tensor]:
        """Every cache tensor by name (all ``[max_batch, slots, G, d]``)."""
        names = ("k_slc", "v_slc", "k_win", "v_win", "k_cmp", "v_cmp", "k_raw", "v_raw")
        return {name: getattr(self, name) for name in names}

    def bytes_per_sequence(self) -> dict[str, int]:
        """Bytes each sequence slot holds, by part (``selection``, ``window``, ``compressed``,
        ``raw_block``, ``lengths``) and ``total``; the cache allocates ``max_batch`` of them."""
        def per_seq(*tensors: torch.Tensor) -> int:
            return sum(t[0].numel() * t.element_size() for t in tensors)

        parts = {
            "selection": per_seq(self.k_slc, self.v_slc),
            "window": per_seq(self.k_win, self.v_win),
            "compressed": per_seq(self.k_cmp, self.v_cmp),
            "raw_block": per_seq(self.k_raw, self.v_raw),
            "lengths": self.lengths.element_size(),
        }
        return {**parts, "total": sum(parts.values())}

    # -- prefill ---------------------------------------------------------------

    def check_prefill(self, batch: int, prompt: int) -> None:
        """Raises unless ``batch`` prompts of ``prompt`` tokens fit (host-side)."""
        if batch > self.max_batch:
            raise ValueError(f"batch ({batch}) must be at most max_batch ({self.max_batch}), "
                             "the batch the cache was built for")
        if prompt > self.max_seq_len:
            raise ValueError(f"prompt length ({prompt}) must be at most max_seq_len ({self.max_seq_len}), "
                             "the cache's capacity")

    def prefill(self, k_slc: torch.Tensor, v_slc: torch.Tensor, k_win: torch.Tensor, v_win: torch.Tensor,
                k_raw: torch.Tensor, v_raw: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor,
                lengths: torch.Tensor | None = None) -> None:
        """Replaces the cache's contents by a batch of prompts.

        ``k_slc``/``v_slc``/``k_win``/``v_win``/``k_raw``/``v_raw`` are ``[B, P, G, d]`` for positions
        ``0 .. P-1`` (selection and window keys rotated, raw ones not); ``k_cmp``/``v_cmp`` the
        compressed tokens of those ``P`` positions, ``[B, num_compressed(P), G, d]``. Prompts of
        different lengths come right-padded with ``lengths [B]`` (default: all ``P``); what lies past
        a sequence's length is stored but never seen, and later appends overwrite it.
        Every rule is checked before anything is written (one host synchronisation, for ``lengths``).
        """
        batch, prompt = k_slc.shape[:2]
        self.check_prefill(batch, prompt)
        expected = {"k_slc": self.k_slc, "v_slc": self.v_slc, "k_win": self.k_win, "v_win": self.v_win,
                    "k_raw": self.k_raw, "v_raw": self.v_raw, "k_cmp": self.k_cmp, "v_cmp": self.v_cmp}
        num_cmp = self.config.num_compressed(prompt)
        for (name, store), t in zip(expected.items(), (k_slc, v_slc, k_win, v_win, k_raw, v_raw, k_cmp, v_cmp)):
            want = (batch, num_cmp if name.endswith("cmp") else prompt, *store.shape[2:])
            if tuple(t.shape) != want:
                raise ValueError(f"{name} must be {want} for {batch} prompts of {prompt} tokens, got {tuple(t.shape)}")
        if lengths is None:
            host = [prompt] * batch
            lengths = torch.full((batch,), prompt, dtype=torch.int64, device=self.lengths.device)
        else:
            if lengths.shape != (batch,) or lengths.dtype.is_floating_point:
                raise ValueError(f"lengths must be an integer tensor [{batch}], got {lengths.dtype} "
                                 f"{tuple(lengths.shape)}")
            host = lengths.tolist()
            if any(not 0 <= n <= prompt for n in host):
                raise ValueError(f"lengths ({host}) must lie in 0 .. {prompt}, the prompt tensors' length")
            lengths = lengths.to(self.lengths.device, torch.int64)

        rows = slice(0, batch)
        self.k_slc[rows, :prompt] = k_slc
        self.v_slc[rows, :prompt] = v_slc
        self.k_cmp[rows, :num_cmp] = k_cmp
        self.v_cmp[rows, :num_cmp] = v_cmp
        for ring, src in ((self.k_win, k_win), (self.v_win, v_win), (self.k_raw, k_raw), (self.v_raw, v_raw)):
            if not prompt:
                break
            pos = _ring_positions(lengths, ring.shape[1])  # [B, slots]
            gathered = src[torch.arange(batch, device=src.device)[:, None], pos.clamp(min=0)]
            ring[rows] = torch.where((pos >= 0)[..., None, None], gathered, ring[rows])
        self.lengths[rows] = lengths
        self._host_lengths = host

    # -- decode ----------------------------------------------------------------

    def check_append(self, batch: int) -> None:
        """Raises unless one more token per sequence fits (host-side; no device access)."""
        if self._host_lengths is None:
            raise RuntimeError("decode step on an empty cache: call prefill() first (after reset() too)")
        if batch != len(self._host_lengths):
            raise ValueError(f"decode batch ({batch}) must equal the prefilled batch ({len(self._host_lengths)})")
        longest = max(self._host_lengths, default=0)
        if longest + 1 > self.max_seq_len:
            raise ValueError(f"a sequence of {longest} tokens cannot grow: max_seq_len ({self.max_seq_len}) "
                             "is the cache's capacity")

    def block_ends_now(self) -> bool:
        """Whether the next append finishes a compression block for some sequence (host-side)."""
        l, d = self.config.compress_block_size, self.config.compress_stride
        return any(n + 1 >= l and (n + 1 - l) % d == 0 for n in self._host_lengths or ())

    def append(self, k_slc: torch.Tensor, v_slc: torch.Tensor, k_win: torch.Tensor, v_win: torch.Tensor,
               k_raw: torch.Tensor, v_raw: torch.Tensor, compress: Compress, *,
               run_phi: bool | None = None) -> None:
        """Appends one token per sequence, each ``[B, G, d]`` (keys rotated at the token's position, raw
        ones not), at position ``lengths[b]``; then ``lengths += 1``.

        Where the token ends compression block ``i`` (``position = i*d + l - 1``), ``compress`` maps the
        block's raw keys/values (the last ``l`` tokens, in order) to its compressed key and value,
        stored at ``i``; other sequences' compressed tokens are left as they are. ``run_phi=None``
        calls ``compress`` only on steps where some sequence finishes a block (known on the host);
        ``True`` always calls it (a CUDA graph captured so is right on every step).
        """
        batch = k_slc.shape[0]
        self.check_append(batch)
        if run_phi is False and self.block_ends_now():
            raise ValueError("run_phi=False, but this step finishes a compression block")
        rows, pos = self._rows[:batch], self.lengths[:batch]
        self.k_slc[rows, pos] = k_slc
        self.v_slc[rows, pos] = v_slc
        self.k_win[rows, pos % self.window] = k_win
        self.v_win[rows, pos % self.window] = v_win
        l, d = self.config.compress_block_size, self.config.compress_stride
        self.k_raw[rows, pos % l] = k_raw
        self.v_raw[rows, pos % l] = v_raw
        if self.k_cmp.shape[1] and (run_phi or (run_phi is None and self.block_ends_now())):
            block_pos = pos[:, None] - l + 1 + torch.arange(l, device=pos.device)  # the block, in order
            slots = torch.remainder(block_pos, l)
            k_new, v_new = compress(self.k_raw[rows[:, None], slots], self.v_raw[rows[:, None], slots], pos)
            ends = (pos + 1 >= l) & (torch.remainder(pos + 1 - l, d) == 0)
            block = (pos + 1 - l).clamp(min=0) // d
            for store, new in ((self.k_cmp, k_new), (self.v_cmp, v_new)):
                store[rows, block] = torch.where(ends[:, None, None], new.to(store.dtype), store[rows, block])
        self.lengths[:batch] += 1
        self._host_lengths = [n + 1 for n in self._host_lengths]
