"""The quality tasks: a held-out split of the corpus, passkey, MQAR and their mix."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("megatron.core")

from conftest import byte_corpus  # noqa: E402
from nsa_parallel.job_config import load_job_config  # noqa: E402
from nsa_parallel.train.data import token_source  # noqa: E402
from nsa_parallel.train.tasks import (  # noqa: E402
    HELDOUT_EVERY,
    TRAINING_KEYS,
    AssociativeRecall,
    Corpus,
    Passkey,
    TaskMix,
    corpus_tasks,
    sample_generator,
)

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


@pytest.fixture
def corpus(tmp_path) -> tuple[Corpus, list[bytes]]:
    texts = byte_corpus(tmp_path / "code")
    return Corpus(str(tmp_path / "code")), texts


def test_heldout_documents_are_never_training_text(corpus):
    corpus, texts = corpus
    heldout = [t for i, t in enumerate(texts) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    train = [t for i, t in enumerate(texts) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    assert corpus.size("heldout") == sum(map(len, heldout)) and corpus.size("train") == sum(map(len, train))
    assert bytes(corpus.window("heldout", 0, corpus.size("heldout")).tolist()) == b"".join(heldout)
    assert bytes(corpus.window("train", 0, corpus.size("train")).tolist()) == b"".join(train)
    # A window across document boundaries, anywhere.
    assert bytes(corpus.window("train", 100, 500).tolist()) == b"".join(train)[100:600]
    with pytest.raises(ValueError, match="does not fit"):
        corpus.window("heldout", 1, corpus.size("heldout"))
    with pytest.raises(ValueError, match="fewer than the .* a sample needs"):
        corpus.random_window("heldout", corpus.size("heldout") + 1, sample_generator(0, 0))
    assert corpus.vocab_end == 256


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("seq_length", [Passkey.DIGITS + 120, 333, 1024])
def test_passkey_sits_at_the_requested_depth_and_only_its_digits_carry_loss(corpus, depth, seq_length):
    corpus, _ = corpus
    task = Passkey(corpus)
    sample = task.sample(seq_length, sample_generator(7, 3), "heldout", depth=depth)
    tokens, labels, mask = sample["tokens"], sample["labels"], sample["loss_mask"]
    assert tokens.shape == labels.shape == mask.shape == (seq_length,)
    assert torch.equal(tokens[1:], labels[:-1])
    text = bytes(tokens.tolist()) + bytes([int(labels[-1])])
    key = bytes(labels[mask > 0].tolist()).decode()
    assert len(key) == Passkey.DIGITS and key.isdigit() and key[0] != "0"
    assert mask.sum() == Passkey.DIGITS and bool(mask[-Passkey.DIGITS:].all())
    assert text.endswith(f"What is the pass key? The pass key is {key}".encode())
    needle = Passkey.NEEDLE.format(key=key).encode()
    assert text.count(needle) == 1
    filler = len(text) - len(needle) - len(Passkey.QUESTION.format(key=key).encode())
    at = text.index(needle)
    assert at == round(depth * filler)  # the needle's start, measured in filler tokens before it
    assert torch.allclose(sample["answer_depth"][mask > 0], torch.tensor(at / filler))
    assert task.needle_span(sample) == range(at, at + len(needle))  # what nsa-eval's selection check uses


def test_mqar_pairs_spread_and_queries_at_the_end(corpus):
    corpus, _ = corpus
    recall = AssociativeRecall(first_id=256, num_ids=20, num_pairs=6, corpus=corpus)
    sample = recall.sample(400, sample_generator(1, 2), "train")
    tokens, labels, mask = sample["tokens"], sample["labels"], sample["loss_mask"]
    answers = mask.nonzero().flatten()
    assert len(answers) == 6 and recall.guessing_loss == pytest.approx(math.log(20))
    first_query = int(answers[0]) - 1
    assert bool((tokens[:first_query] < 256).sum() == first_query - 12)  # text, then 6 pairs of 2 task tokens
    for pos in answers.tolist():
        key, value = int(tokens[pos]), int(labels[pos])
        assert tokens[pos - 1] == 256 and 257 <= key < 277 and 277 <= value < 297
        where = (tokens[:first_query] == key).nonzero().flatten()
        assert len(where) == 1 and labels[where[0]] == value
        assert sample["answer_depth"][pos] == pytest.approx(int(where[0]) / (first_query - 2), abs=1e-9)
    assert torch.isnan(sample["answer_depth"][mask == 0]).all()


def test_same_seed_and_index_give_the_same_sample(corpus):
    corpus, _ = corpus
    tasks = corpus_tasks(corpus, vocab_size=320, num_pairs=4)
    mix = TaskMix(tasks, {"lm": 1.0, "passkey": 1.0, "mqar": 1.0}, seq_length=256, seed=5)
    again = TaskMix(tasks, {"lm": 1.0, "passkey": 1.0, "mqar": 1.0}, seq_length=256, seed=5)
    other = TaskMix(tasks, {"lm": 1.0, "passkey": 1.0, "mqar": 1.0}, seq_length=256, seed=6)
    for i in range(12):
        a, b = mix[i], again[i]
        assert set(a) == set(TRAINING_KEYS) and all(torch.equal(a[k], b[k]) for k in a)
    assert {mix.task_of(i) for i in range(30)} == {"lm", "passkey", "mqar"}
    assert any(not torch.equal(mix[i]["tokens"], other[i]["tokens"]) for i in range(4))
    only_passkey = TaskMix(tasks, {"lm": 0.0, "passkey": 1.0}, 256, 5)
    assert {only_passkey.task_of(i) for i in range(20)} == {"passkey"}
    lm = mix[next(i for i in range(30) if mix.task_of(i) == "lm")]
    assert bool(lm["loss_mask"].all())


def test_training_never_sees_heldout_text(corpus):
    corpus, texts = corpus
    heldout = {t for i, t in enumerate(texts) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1}
    mix = TaskMix(corpus_tasks(corpus, 320, 4), {"lm": 1.0}, seq_length=64, seed=0)
    for i in range(40):
        text = bytes(mix[i]["tokens"].tolist())
        assert not any(line in text for t in heldout for line in t.split(b"\n")[:1])


def test_config_builds_the_mix_and_names_bad_keys(tmp_path):
    byte_corpus(tmp_path / "code")
    common = [f"data.path={tmp_path / 'code'}", "model.vocab_size=320", "data.num_pairs=4"]
    config = load_job_config(TINY, [*common, "data.mix.passkey=1", "data.mix.mqar=2"])
    source = token_source(config, tmp_path / "cache")
    assert isinstance(source, TaskMix) and source.names == ["passkey", "mqar"]
    for override, message in [
        ("data.mix.needle=1", "data.mix.needle: unknown task"),
        ("data.mix.lm=-1", r"data.mix.lm \(-1.0\) must be a finite weight >= 0"),
        ("data.mix.lm=0", "data.mix: at least one task needs a positive weight"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_job_config(TINY, [*common, override])
    with pytest.raises(ValueError, match="data.mix needs data.path"):
        load_job_config(TINY, ["data.mix.lm=1"])
    small = load_job_config(TINY, [f"data.path={tmp_path / 'code'}", "model.vocab_size=260", "data.mix.mqar=1",
                                   "data.num_pairs=4"])
    with pytest.raises(ValueError, match=r"data.num_pairs \(4\) MQAR keys need model.vocab_size >= 265"):
        token_source(small, tmp_path / "cache")


def test_training_needles_are_spread_evenly_over_octaves_of_distance(corpus):
    corpus, _ = corpus
    task = Passkey(corpus)
    seq_length = 1024
    filler = seq_length + 1 - task.overhead - task.DIGITS
    distances = [filler * (1 - float(task.sample(seq_length, sample_generator(3, i), "train")["answer_depth"][-1]))
                 for i in range(400)]
    assert min(distances) >= task.MIN_DISTANCE - 1 and max(distances) <= filler
    middle = math.sqrt(task.MIN_DISTANCE * filler)  # the geometric middle: half the needles on each side
    assert 0.4 < sum(d < middle for d in distances) / len(distances) < 0.6
