"""Bytes moved by context-parallel NSA, per path, next to what ring attention would move."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

# The paths of one layer's exchange: halo keys/values, the compressed-token
# all-gather, the fetch of selected remote blocks and its block-id requests.
CATEGORIES = ("halo", "compressed", "blocks", "requests")
PHASES = ("forward", "backward")


@dataclass
class CommStats:
    """Bytes this rank sent to and received from other ranks (its own rows do not count).

    Accumulates over calls (layers, steps) until :meth:`reset`; keys are
    ``(phase, category)``.
    """

    sent: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    received: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))

    def record(self, phase: str, category: str, sent: int, received: int) -> None:
        if phase not in PHASES or category not in CATEGORIES:
            raise ValueError(f"unknown phase/category ({phase!r}, {category!r})")
        self.sent[phase, category] += sent
        self.received[phase, category] += received

    def reset(self) -> None:
        self.sent.clear()
        self.received.clear()

    def total(self, phase: str | None = None) -> tuple[int, int]:
        """``(sent, received)`` over every category, for one phase or both."""
        keep = [p for p in PHASES if phase in (None, p)]
        return (sum(v for (p, _), v in self.sent.items() if p in keep),
                sum(v for (p, _), v in self.received.items() if p in keep))

    def as_dict(self) -> dict[str, int]:
        """Flat ``{"forward/halo/sent": bytes, ...}`` for logs and TensorBoard."""
        out = {}
        for phase in PHASES:
            for category in CATEGORIES:
                out[f"{phase}/{category}/sent"] = self.sent.get((phase, category), 0)
                out[f"{phase}/{category}/received"] = self.received.get((phase, category), 0)
        return out

    def __str__(self) -> str:
        parts = []
        for phase in PHASES:
            cats = ", ".join(f"{c} {_mib(self.sent.get((phase, c), 0))}/{_mib(self.received.get((phase, c), 0))}"
                             for c in CATEGORIES)
            parts.append(f"{phase} sent/received MiB: {cats}")
        return "; ".join(parts)


def _mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.2f}"


def ring_attention_bytes(seq_len: int, world_size: int, batch: int, kv_heads: int, dk: int, dv: int,
                         element_size: int) -> dict[str, int]:
    """Bytes one rank sends (and receives) in ring attention over the same shapes, per layer.

    Forward: ``P-1`` ring steps each pass one rank's keys and values on. Backward
    (as in Megatron's ring / ring-flash attention): keys and values go round
    again together with their gradient accumulators, twice the forward.
    """
    step = (seq_len // world_size) * batch * kv_heads * (dk + dv) * element_size
    forward = (world_size - 1) * step
    return {"forward": forward, "backward": 2 * forward}
