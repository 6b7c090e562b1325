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
from .selection import needle_chosen, recorded_block_ids

log = logging.getLogger(__name__)
EVAL_SEED = 20260101  # not a training seed: held-out samples differ from any run's


def _answers(model: torch.nn.Module, sample: dict[str, torch.Tensor], device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """For each answer token (``loss_mask``): whether the argmax is right, and its loss in nats."""
    tokens = sample["tokens"][None].to(device)
    answer = (sample["loss_mask"] > 0).to(device)
    with torch.no_grad():
        logits = model(tokens, torch.arange(tokens.shape[1], device=device)[None], None)[0][answer].float()
    labels = sample["labels"].to(device)[answer]
    nll = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    return (logits.argmax(-1) == labels).cpu(), nll.cpu()


class AnswerTokens:
    """Per-token accuracy and loss over a length's answers: progress that exact match does not show yet."""

    def __init__(self):
        self.right, self.nll, self.count = 0, 0.0, 0

    def add(self, correct: torch.Tensor, nll: torch.Tensor) -> None:
        self.right += int(correct.sum())
        self.nll += float(nll.sum())
        self.count += len(correct)

    def as_dict(self) -> dict[str, float]:
        return {"accuracy": self.right / self.count, "nll": self.nll / self.count}


def heldout_bits_per_token(model: torch.nn.Module, task: LanguageModelling, seq_length: int, num_samples: int,
                           device: torch.device) -> float:
    """Mean loss over ``num_samples`` held-out windows, in bits per token (per byte for a byte corpus)."""
    total = 0.0
    for i in range(num_samples):
        sample = task.sample(seq_length, sample_generator(EVAL_SEED, i), "heldout")
        total += _answers(model, sample, device)[1].mean().item()  # every token is an answer here
    return total / num_samples / math.log(2)


def _nearest(depths: list[float], value: float) -> float:
    return min(depths, key=lambda d: abs(d - value))


def passkey_accuracy(model: torch.nn.Module, task: Passkey, seq_lens: list[int], depths: list[float],
                     num_samples: int, device: torch.device, select_block_size: int | None = None
                     ) -> tuple[dict, dict, dict | None]:
    """``{length: {depth: fraction of keys retrieved whole}}``, per length the digits' accuracy and loss,
    and for NSA (``select_block_size``) ``{length: {depth: per layer, how often the answer rows'
    selection chose a block of the needle}}`` (else None)."""
    result, tokens, chosen = {}, {}, {} if select_block_size else None
    for length in seq_lens:
        row, digits, chosen_row = {}, AnswerTokens(), {}
        for depth in depths:
            hits, per_layer = 0, []
            for i in range(num_samples):
                sample = task.sample(length, sample_generator(EVAL_SEED, i), "heldout", depth=depth)
                with recorded_block_ids() as block_ids:  # stays empty for full attention
                    correct, nll = _answers(model, sample, device)
                hits += bool(correct.all())
                digits.add(correct, nll)
                if select_block_size:
                    per_layer.append(needle_chosen(block_ids, _answer_rows(sample), task.needle_span(sample),
                                                   select_block_size))
            row[str(depth)] = hits / num_samples
            if select_block_size:
                chosen_row[str(depth)] = [sum(layer) / num_samples for layer in zip(*per_layer)]
        result[str(length)], tokens[str(length)] = row, digits.as_dict()
        if chosen is not None:
            chosen[str(length)] = chosen_row
        log.info("passkey at %d tokens: %s; digits %s", length, row, tokens[str(length)])
    return result, tokens, chosen


def _answer_rows(sample: dict[str, torch.Tensor]) -> torch.Tensor:
    """The positions whose next-token prediction is an answer token."""
    return torch.nonzero(sample["loss_mask"] > 0).flatten()


def mqar_accuracy(model: torch.nn.Module, task: AssociativeRecall, seq_lens: list[int], depths: list[float],
                  num_samples: int, device: torch.device) -> tuple[dict, dict, dict]:
    """``{length: {depth: fraction of values recalled}}``, the number of queries behind each (a query
    counts at the requested depth nearest to where its pair was), and per length the answers' loss."""
    accuracy, counts, tokens = {}, {}, {}
    for length in seq_lens:
        right = {d: 0 for d in depths}
        total = {d: 0 for d in depths}
        values = AnswerTokens()
        for i in range(num_samples):
            sample = task.sample(length, sample_generator(EVAL_SEED, i), "heldout")
            correct, nll = _answers(model, sample, device)
            values.add(correct, nll)
            for ok, where in zip(correct.tolist(), sample["answer_depth"][sample["loss_mask"] > 0].tolist()):
                bucket = _nearest(depths, where)
                right[bucket] += ok
                total[bucket] += 1
        accuracy[str(length)] = {str(d): right[d] / total[d] if total[d] else None for d in depths}
        counts[str(length)] = {str(d): total[d] for d in depths}
        tokens[str(length)] = values.as_dict()
        log.info("mqar at %d tokens: %s; answers %s", length, accuracy[str(length)], tokens[str(length)])
    return accuracy, counts, tokens
