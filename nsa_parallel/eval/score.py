"""Scores of a model on the quality tasks: held-out loss and retrieval accuracy by length and depth.

Retrieval is exact match under teacher forcing: one forward pass over the whole sample, and an
answer counts when the argmax at each of its positions is its token (a passkey's five digits
all right; one MQAR value). No decoding is needed. Samples come from the held-out text and are
fixed by ``EVAL_SEED`` and their index, so every model sees the same ones.
"""
from __future__ import annotations

import logging
import math

import torch

from ..train.tasks import AssociativeRecall, LanguageModelling, Passkey, sample_generator

log = logging.getLogger(__name__)
EVAL_SEED = 20260101  # not a training seed: held-out samples differ from any run's


def _forward(model: torch.nn.Module, sample: dict[str, torch.Tensor], device: torch.device,
             labels: bool = False) -> torch.Tensor:
    tokens = sample["tokens"][None].to(device)
    positions = torch.arange(tokens.shape[1], device=device)[None]
    with torch.no_grad():
        if labels:
            return model(tokens, positions, None, labels=sample["labels"][None].to(device))[0].float().cpu()
        return model(tokens, positions, None)[0].argmax(-1).cpu()


def heldout_bits_per_token(model: torch.nn.Module, task: LanguageModelling, seq_length: int, num_samples: int,
                           device: torch.device) -> float:
    """Mean loss over ``num_samples`` held-out windows, in bits per token (per byte for a byte corpus)."""
    total = 0.0
    for i in range(num_samples):
        total += _forward(model, task.sample(seq_length, sample_generator(EVAL_SEED, i), "heldout"),
                          device, labels=True).mean().item()
    return total / num_samples / math.log(2)


def _nearest(depths: list[float], value: float) -> float:
    return min(depths, key=lambda d: abs(d - value))


def passkey_accuracy(model: torch.nn.Module, task: Passkey, seq_lens: list[int], depths: list[float],
                     num_samples: int, device: torch.device) -> dict[str, dict[str, float]]:
    """``{length: {depth: fraction of keys retrieved whole}}``."""
    result = {}
    for length in seq_lens:
        row = {}
        for depth in depths:
            hits = 0
            for i in range(num_samples):
                sample = task.sample(length, sample_generator(EVAL_SEED, i), "heldout", depth=depth)
                answer = sample["loss_mask"] > 0
                hits += bool((_forward(model, sample, device)[answer] == sample["labels"][answer]).all())
            row[str(depth)] = hits / num_samples
        log.info("passkey at %d tokens: %s", length, row)
        result[str(length)] = row
    return result


def mqar_accuracy(model: torch.nn.Module, task: AssociativeRecall, seq_lens: list[int], depths: list[float],
                  num_samples: int, device: torch.device) -> tuple[dict, dict]:
    """``{length: {depth: fraction of values recalled}}`` and the number of queries behind each: a
    query counts at the requested depth nearest to where its pair was."""
    accuracy, counts = {}, {}
    for length in seq_lens:
        right = {d: 0 for d in depths}
        total = {d: 0 for d in depths}
        for i in range(num_samples):
            sample = task.sample(length, sample_generator(EVAL_SEED, i), "heldout")
            answer = sample["loss_mask"] > 0
            correct = _forward(model, sample, device)[answer] == sample["labels"][answer]
            for ok, where in zip(correct.tolist(), sample["answer_depth"][answer].tolist()):
                bucket = _nearest(depths, where)
                right[bucket] += ok
                total[bucket] += 1
        accuracy[str(length)] = {str(d): right[d] / total[d] if total[d] else None for d in depths}
        counts[str(length)] = {str(d): total[d] for d in depths}
        log.info("mqar at %d tokens: %s", length, accuracy[str(length)])
    return accuracy, counts
