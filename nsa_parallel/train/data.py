"""Training data: the built-in long-context retrieval task, a mix of quality tasks over a corpus
(:mod:`~nsa_parallel.train.tasks`), or Megatron's ``GPTDataset``.

All serve sample ``i`` as ``tokens``, ``labels`` and ``loss_mask`` of ``seq_length``
tokens. A sample depends only on the seed and ``i``, and a step's samples only on how
many came before it, so a resumed run trains on exactly what an uninterrupted one would.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from ..context_parallel import ShardLayout
from ..job_config import JobConfig
from .context_parallel import zigzag_slice
from .tasks import TRAINING_KEYS, AssociativeRecall, Corpus, TaskMix, corpus_tasks, sample_generator

QUERY_TOKEN = 0


class TokenSource(Protocol):
    def __getitem__(self, index: int) -> dict[str, torch.Tensor]: ...


class RetrievalTask:
    """The built-in task (no data needed): MQAR over noise, every key asked for at the end.

    Token ids: ``0`` starts a query; keys are ``[1, 1 + n)`` and values ``[1 + n, 1 + 2n)``
    with ``n = (vocab_size - 1) // 2``; the filler is noise drawn from the values (see
    :class:`~nsa_parallel.train.tasks.AssociativeRecall`). Guessing a value gives ``log n``;
    going below that means the model found the pair, up to a whole sequence back.
    """

    def __init__(self, vocab_size: int, seq_length: int, num_pairs: int, seed: int):
        if (vocab_size - 1) // 2 < num_pairs or seq_length < 5 * num_pairs - 1:
            raise ValueError(f"{num_pairs} pairs do not fit vocab_size {vocab_size} and seq_length {seq_length}")
        self.recall = AssociativeRecall(QUERY_TOKEN, (vocab_size - 1) // 2, num_pairs)
        self.seq_length, self.seed = seq_length, seed

    @property
    def guessing_loss(self) -> float:
        """The loss of a model that knows the answer is a value but not which: ``log n``."""
        return self.recall.guessing_loss

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.recall.sample(self.seq_length, sample_generator(self.seed, index), "train")
        return {key: sample[key] for key in TRAINING_KEYS}


class _TokenIds:
    """What ``GPTDataset`` asks of a tokenizer. Data on disk is token ids already; the EOD id
    matters only with EOD loss masking or position resets, both off here."""

    def __init__(self, vocab_size: int):
        self.vocab_size, self.eod, self.pad, self.special_tokens_dict = vocab_size, None, -1, {}
        self.unique_identifiers = {"class": type(self).__name__, "vocab_size": vocab_size}  # part of the cache key


class IndexedDataset:
    """Megatron's ``GPTDataset`` over the indexed dataset at ``data.path`` (its .bin/.idx prefix).

    Built for ``num_samples`` samples; the shuffle indices are cached under ``cache_dir``
    (rank 0 builds them, the other ranks wait and read them).
    """

    def __init__(self, config: JobConfig, num_samples: int, cache_dir: Path):
        from megatron.core.datasets.blended_megatron_dataset_builder import (
            BlendedMegatronDatasetBuilder,
        )
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

        dataset_config = GPTDatasetConfig(
            random_seed=config.train.seed, sequence_length=config.train.seq_length,
            blend=([config.data.path], None), split="100,0,0", tokenizer=_TokenIds(config.model.vocab_size),
            reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
            create_attention_mask=False, path_to_cache=str(cache_dir))
        self.dataset = BlendedMegatronDatasetBuilder(
            GPTDataset, [num_samples, 0, 0], lambda: True, dataset_config).build()[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.dataset[index]
        return {key: sample[key] for key in ("tokens", "labels", "loss_mask")}


def task_mix(config: JobConfig) -> TaskMix:
    """``data.mix`` over the corpus ``data.path``; errors name the keys."""
    d = config.data
    names = tuple(name for name, weight in d.mix.items() if weight > 0)
    tasks = corpus_tasks(Corpus(d.path), config.model.vocab_size, d.num_pairs, names)
    return TaskMix(tasks, d.mix, config.train.seq_length, config.train.seed)


def token_source(config: JobConfig, cache_dir: Path) -> TokenSource:
    """The data ``config`` asks for: the task mix ``data.mix`` over ``data.path``'s text, or that text
    alone (Megatron's ``GPTDataset``), or without ``data.path`` the built-in retrieval task."""
    t, d = config.train, config.data
    if d.path is None:
        return RetrievalTask(config.model.vocab_size, t.seq_length, d.num_pairs, t.seed)
    if d.mix:
        return task_mix(config)
    return IndexedDataset(config, t.max_steps * t.global_batch_size, cache_dir)


def pack_documents(batch: dict[str, torch.Tensor], eod_token: int, cp_size: int = 1, cp_rank: int = 0,
                   select_block_size: int = 1) -> dict[str, torch.Tensor]:
    """A micro-batch ``[b, s]`` as one row of documents, each ending at ``eod_token`` (inclusive)
    or at its row's end: ``cu_seqlens`` holds the boundaries, ``position_ids`` restart at every
    document. Labels and loss masks travel with their tokens, as Megatron's
    ``reset_attention_mask`` leaves them.

    Under context parallelism (Megatron's THD layout) every document is padded at its end to
    ``2 x cp_size`` chunks of whole selection blocks (pads carry no loss, and the document's own
    tokens never see them) and this rank keeps its zigzag share of each, documents back to back;
    ``cu_seqlens`` are the padded global boundaries, alike on every rank.
    """
    rows, seq = batch["tokens"].shape
    flat = {key: value.reshape(-1) for key, value in batch.items() if key != "position_ids"}
    ends = (flat["tokens"] == eod_token).nonzero().flatten() + 1
    ends = torch.cat([ends, torch.arange(seq, rows * seq + 1, seq)]).unique().tolist()
    unit = 2 * cp_size * select_block_size if cp_size > 1 else 1
    fill = {key: 0 if key == "loss_mask" else eod_token for key in flat}
    pieces = {key: [] for key in flat}
    positions, cu_seqlens = [], [0]
    for start, end in zip([0] + ends[:-1], ends):
        padded = -(-(end - start) // unit) * unit
        mine = (torch.arange(padded) if cp_size == 1
                else ShardLayout("zigzag", cp_size, padded).local_positions(cp_rank))
        for key, value in flat.items():
            doc = torch.cat([value[start:end], value.new_full((padded - (end - start),), fill[key])])
            pieces[key].append(doc[mine])
        positions.append(mine)
        cu_seqlens.append(cu_seqlens[-1] + padded)
    packed = {key: torch.cat(parts)[None] for key, parts in pieces.items()}
    return {**packed, "position_ids": torch.cat(positions)[None],
            "cu_seqlens": torch.tensor(cu_seqlens, dtype=torch.int32)}


def step_microbatches(source: TokenSource, consumed_samples: int, config: JobConfig, dp_rank: int, dp_size: int,
                      cp_rank: int, cp_size: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """This rank's micro-batches of the step that starts after ``consumed_samples`` samples.

    Micro-batch ``m`` of data-parallel rank ``d`` holds global samples
    ``consumed + (m * dp_size + d) * mbs + [0, mbs)``; each tensor is cut to this
    context-parallel rank's zigzag share of the sequence, ``position_ids`` included. With
    ``data.eod_token`` each micro-batch is one row of documents, each cut per rank on its own
    (:func:`pack_documents`). From a task mix, ``task`` holds each sample's task (its index in
    the mix's ``names``).
    """
    mbs = config.train.micro_batch_size
    micro_batches = config.train.global_batch_size // (mbs * dp_size)
    out = []
    for m in range(micro_batches):
        first = consumed_samples + (m * dp_size + dp_rank) * mbs
        samples = [source[i] for i in range(first, first + mbs)]
        batch = {key: torch.stack([s[key] for s in samples]) for key in samples[0]}
        batch["position_ids"] = torch.arange(config.train.seq_length).expand(mbs, -1)
        if config.data.eod_token is None:
            batch = {key: zigzag_slice(value, cp_size, cp_rank) for key, value in batch.items()}
        else:
            batch = pack_documents(batch, config.data.eod_token, cp_size, cp_rank, config.nsa.select_block_size)
        if isinstance(source, TaskMix):  # for the per-task losses in the metrics
            batch["task"] = torch.tensor([source.names.index(source.task_of(i)) for i in range(first, first + mbs)])
        out.append({key: value.to(device, non_blocking=True) for key, value in batch.items()})
    return out
