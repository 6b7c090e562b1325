"""Quality tasks from local data: language modelling, passkey retrieval and multi-query associative
recall (MQAR), mixed for training (``data.mix``) and scored by ``nsa-eval``.

A sample depends only on the seed and its index (:func:`sample_generator`), so a resumed run
trains on what an uninterrupted one would, and two runs with the same seed (NSA and full
attention) see the same data in the same order. Text comes from a Megatron indexed dataset
(``benchmarks/make_code_corpus.py`` writes one from this Python's sources, as byte tokens)
whose documents are split once, whatever the seed: every ``HELDOUT_EVERY``-th document is held
out, and training never sees it; evaluation draws its text from there.
"""
from __future__ import annotations

import math
from typing import Literal, Protocol

import numpy
import torch

Split = Literal["train", "heldout"]
HELDOUT_EVERY = 20  # 5% of the documents
TRAINING_KEYS = ("tokens", "labels", "loss_mask")
TASKS = ("lm", "passkey", "mqar")


def sample_generator(seed: int, index: int) -> torch.Generator:
    """The random stream of sample ``index`` of a run seeded ``seed``."""
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


def _uniform(g: torch.Generator, high: int) -> int:
    """An integer in ``[0, high)``, for ranges beyond ``randint``'s int64 worries (large corpora)."""
    return int(torch.rand((), generator=g, dtype=torch.float64).item() * high)


def _with_labels(text: torch.Tensor, loss_mask: torch.Tensor, answer_depth: torch.Tensor | None = None) -> dict:
    """``seq_length + 1`` tokens as a sample: labels are the tokens shifted by one."""
    sample = {"tokens": text[:-1], "labels": text[1:], "loss_mask": loss_mask}
    if answer_depth is not None:
        sample["answer_depth"] = answer_depth
    return sample


class Corpus:
    """The documents of the indexed dataset ``prefix`` (``.bin``/``.idx``), split into training and
    held-out text; each split reads as its documents back to back, through a memory map."""

    def __init__(self, prefix: str):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        index = IndexedDataset(prefix).index
        self.tokens = numpy.memmap(prefix + ".bin", dtype=index.dtype, mode="r")
        starts = index.sequence_pointers // index.dtype_size
        lengths = index.sequence_lengths.astype(numpy.int64)
        heldout = numpy.arange(len(lengths)) % HELDOUT_EVERY == HELDOUT_EVERY - 1
        self._docs = {split: (starts[mask], lengths[mask], numpy.cumsum(lengths[mask]))
                      for split, mask in (("train", ~heldout), ("heldout", heldout))}
        # One past the largest token id: task tokens (MQAR's) are numbered from here.
        self.vocab_end = 256 if index.dtype == numpy.uint8 else int(self.tokens.max()) + 1

    def size(self, split: Split) -> int:
        return int(self._docs[split][2][-1]) if len(self._docs[split][2]) else 0

    def window(self, split: Split, start: int, length: int) -> torch.Tensor:
        """``length`` tokens of ``split`` from position ``start`` on, across documents."""
        if not 0 <= start <= self.size(split) - length:
            raise ValueError(f"a window of {length} tokens at {start} does not fit the {split} text "
                             f"({self.size(split)} tokens)")
        starts, lengths, ends = self._docs[split]
        doc = int(numpy.searchsorted(ends, start, side="right"))
        pieces, pos = [], start
        while pos < start + length:
            offset = pos - (ends[doc] - lengths[doc])
            take = min(lengths[doc] - offset, start + length - pos)
            pieces.append(self.tokens[starts[doc] + offset:starts[doc] + offset + take])
            pos, doc = pos + take, doc + 1
        return torch.from_numpy(numpy.concatenate(pieces).astype(numpy.int64))

    def random_window(self, split: Split, length: int, g: torch.Generator) -> torch.Tensor:
        if length > self.size(split):
            raise ValueError(f"the corpus's {split} text has {self.size(split)} tokens, fewer than the {length} "
                             "a sample needs: use a larger corpus (data.path)")
        return self.window(split, _uniform(g, self.size(split) - length + 1), length)


class Task(Protocol):
    def min_seq_length(self) -> int: ...

    def sample(self, seq_length: int, g: torch.Generator, split: Split) -> dict[str, torch.Tensor]: ...


class LanguageModelling:
    """A window of text; every token carries loss."""

    def __init__(self, corpus: Corpus):
        self.corpus = corpus

    def min_seq_length(self) -> int:
        return 1

    def sample(self, seq_length: int, g: torch.Generator, split: Split) -> dict[str, torch.Tensor]:
        return _with_labels(self.corpus.random_window(split, seq_length + 1, g), torch.ones(seq_length))


class Passkey:
    """Passkey retrieval (Mohtashami & Jaggi 2023): a random 5-digit key stated once inside the
    corpus's text, at ``depth`` (0: the start of the text, 1: its end), and asked for at the end
    of the sequence. Text is UTF-8 bytes, so the corpus must be byte tokens. Only the key's
    digits in the answer carry loss; ``answer_depth`` holds the depth at those positions.

    Training samples (no ``depth``) put the needle at a distance from the end drawn log-uniformly
    between ``MIN_DISTANCE`` tokens and the whole filler: every octave of distance is equally
    common. With uniform depths a 16k-token sample would hold its needle within 64 tokens of the
    question once in 250, and a model starting from diffuse attention gets almost no gradient
    from a needle thousands of tokens back, so it never starts to retrieve (measured: see
    benchmarks/RESULTS.md, Quality); near needles teach the circuit, far ones stretch it.
    """

    DIGITS = 5
    MIN_DISTANCE = 16
    NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
    QUESTION = "\nWhat is the pass key? The pass key is {key}"

    def __init__(self, corpus: Corpus):
        if corpus.vocab_end > 257:
            raise ValueError(f"the passkey task writes UTF-8 bytes into the corpus's text, but the corpus has token "
                             f"ids up to {corpus.vocab_end - 1}: use a byte corpus (benchmarks/make_code_corpus.py)")
        self.corpus = corpus
        self.overhead = len(self._bytes(self.NEEDLE, "0" * self.DIGITS)) + len(self._bytes(self.QUESTION, ""))

    @staticmethod
    def _bytes(template: str, key: str) -> torch.Tensor:
        return torch.tensor(list(template.format(key=key).encode()), dtype=torch.int64)

    def min_seq_length(self) -> int:
        return self.overhead + self.DIGITS

    def sample(self, seq_length: int, g: torch.Generator, split: Split,
               depth: float | None = None) -> dict[str, torch.Tensor]:
        if seq_length < self.min_seq_length():
            raise ValueError(f"passkey needs sequences of at least {self.min_seq_length()} tokens, got {seq_length}")
        key = str(10 ** (self.DIGITS - 1) + _uniform(g, 9 * 10 ** (self.DIGITS - 1)))
        u = torch.rand((), generator=g, dtype=torch.float64).item()
        filler = self.corpus.random_window(split, seq_length + 1 - self.overhead - self.DIGITS, g)
        if depth is None:
            near = min(self.MIN_DISTANCE, len(filler))
            distance = math.exp(math.log(max(near, 1)) + u * (math.log(max(len(filler), 1)) - math.log(max(near, 1))))
            at = len(filler) - min(round(distance), len(filler))
        else:
            at = round(depth * len(filler))
        text = torch.cat([filler[:at], self._bytes(self.NEEDLE, key), filler[at:], self._bytes(self.QUESTION, key)])
        loss_mask = torch.zeros(seq_length)
        loss_mask[-self.DIGITS:] = 1.0  # the labels there are the answer's digits
        answer_depth = torch.where(loss_mask > 0, at / max(len(filler), 1), math.nan)
        return _with_labels(text, loss_mask, answer_depth)


    def needle_span(self, sample: dict[str, torch.Tensor]) -> range:
        """The positions of ``sample``'s needle sentence (from its ``answer_depth``)."""
        filler = len(sample["tokens"]) + 1 - self.overhead - self.DIGITS
        depth = float(sample["answer_depth"][sample["loss_mask"] > 0][0])
        at = round(depth * max(filler, 1))
        return range(at, at + len(self._bytes(self.NEEDLE, "0" * self.DIGITS)))


class AssociativeRecall:
    """Multi-query associative recall (Zoology's MQAR, Arora et al. 2023) spread over a long context.

    Token ids from ``first_id``: a query token, then ``num_ids`` keys and ``num_ids`` values.
    Pair ``i`` (a key, then its value) sits at a random place in the ``i``-th of ``num_pairs``
    equal stretches of filler text (the corpus's, or with no corpus noise drawn from the
    values); the last ``3 * num_pairs`` tokens ask for every key once, in random order, as
    ``query key value``. Only the answers carry loss; ``answer_depth`` is where in the filler
    each answer's pair was (0: start, 1: end). Guessing gives ``log num_ids``.
    """

    def __init__(self, first_id: int, num_ids: int, num_pairs: int, corpus: Corpus | None = None):
        if num_pairs <= 0 or num_ids < num_pairs:
            raise ValueError(f"{num_pairs} pairs need as many distinct keys, but there are {num_ids}")
        self.first_id, self.num_ids, self.num_pairs, self.corpus = first_id, num_ids, num_pairs, corpus

    @property
    def guessing_loss(self) -> float:
        return math.log(self.num_ids)

    def min_seq_length(self) -> int:
        return 5 * self.num_pairs - 1  # each pair 2 tokens and its query 3, one stretch of 2 per pair

    def sample(self, seq_length: int, g: torch.Generator, split: Split) -> dict[str, torch.Tensor]:
        n, pairs, first = self.num_ids, self.num_pairs, self.first_id
        haystack = seq_length + 1 - 3 * pairs
        stretch = haystack // pairs
        if stretch < 2:
            raise ValueError(f"{pairs} pairs do not fit {seq_length} tokens: at least {self.min_seq_length()} needed")
        keys = torch.randperm(n, generator=g)[:pairs] + first + 1
        values = torch.randint(0, n, (pairs,), generator=g) + first + 1 + n
        if self.corpus is None:
            text = torch.randint(0, n, (seq_length + 1,), generator=g) + first + 1 + n
        else:
            text = torch.cat([self.corpus.random_window(split, haystack, g), torch.zeros(3 * pairs, dtype=torch.int64)])
        where = torch.arange(pairs) * stretch + torch.randint(0, stretch - 1, (pairs,), generator=g)
        text[where], text[where + 1] = keys, values
        order = torch.randperm(pairs, generator=g)
        text[haystack:] = torch.stack([torch.full((pairs,), first), keys[order], values[order]], 1).flatten()
        loss_mask = torch.zeros(seq_length)
        answers = torch.arange(haystack + 1, seq_length, 3)  # the query's key: its label is the value
        loss_mask[answers] = 1.0
        answer_depth = torch.full((seq_length,), math.nan, dtype=torch.float64)
        answer_depth[answers] = where[order].double() / max(haystack - 2, 1)
        return _with_labels(text, loss_mask, answer_depth)


def corpus_tasks(corpus: Corpus, vocab_size: int, num_pairs: int, names: tuple[str, ...] = TASKS) -> dict[str, Task]:
    """The tasks ``names`` over ``corpus``; MQAR's tokens take the ids above the corpus's."""
    if vocab_size < corpus.vocab_end:
        raise ValueError(f"model.vocab_size ({vocab_size}) is too small for the corpus data.path, whose token ids "
                         f"reach {corpus.vocab_end - 1}")
    tasks: dict[str, Task] = {}
    if "lm" in names:
        tasks["lm"] = LanguageModelling(corpus)
    if "passkey" in names:
        tasks["passkey"] = Passkey(corpus)
    if "mqar" in names:
        spare = (vocab_size - corpus.vocab_end - 1) // 2
        if spare < num_pairs:
            raise ValueError(f"data.num_pairs ({num_pairs}) MQAR keys need model.vocab_size >= "
                             f"{corpus.vocab_end + 1 + 2 * num_pairs} (the corpus uses ids below {corpus.vocab_end}, "
                             f"then one query token, keys and values), got {vocab_size}")
        tasks["mqar"] = AssociativeRecall(corpus.vocab_end, spare, num_pairs, corpus)
    return tasks


def min_seq_length(tasks: dict[str, Task]) -> int:
    """The shortest sequence every task in ``tasks`` fits."""
    return max((task.min_seq_length() for task in tasks.values()), default=1)


class TaskMix:
    """Training samples: sample ``i`` is drawn from task ``t`` with probability ``weights[t]`` / sum."""

    def __init__(self, tasks: dict[str, Task], weights: dict[str, float], seq_length: int, seed: int):
        self.names = [name for name, weight in weights.items() if weight > 0]
        self.tasks = {name: tasks[name] for name in self.names}
        if seq_length < min_seq_length(self.tasks):
            raise ValueError(f"train.seq_length ({seq_length}) is too short for data.mix {self.names}: "
                             f"at least {min_seq_length(self.tasks)} tokens")
        self.weights = torch.tensor([float(weights[name]) for name in self.names])
        self.seq_length, self.seed = seq_length, seed

    def _draw(self, index: int) -> tuple[str, torch.Generator]:
        g = sample_generator(self.seed, index)
        return self.names[int(torch.multinomial(self.weights, 1, generator=g))], g

    def task_of(self, index: int) -> str:
        return self._draw(index)[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        name, g = self._draw(index)
        sample = self.tasks[name].sample(self.seq_length, g, "train")
        return {key: sample[key] for key in TRAINING_KEYS}
