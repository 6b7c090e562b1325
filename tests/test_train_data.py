"""nsa-train's data side: zigzag context-parallel slicing, the retrieval task, micro-batches, the lr schedule."""
import inspect
from itertools import pairwise
from pathlib import Path

import pytest
import torch

from nsa_parallel.job_config import load_job_config
from nsa_parallel.train.context_parallel import zigzag_slice
from nsa_parallel.train.data import QUERY_TOKEN, RetrievalTask, pack_documents, step_microbatches
from nsa_parallel.train.schedule import learning_rate

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def test_zigzag_keeps_chunks_r_and_2cp_minus_1_minus_r():
    x = torch.arange(16)[None]
    assert zigzag_slice(x, 2, 0).tolist() == [[0, 1, 2, 3, 12, 13, 14, 15]]
    assert zigzag_slice(x, 2, 1).tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]]
    assert zigzag_slice(x, 4, 1).tolist() == [[2, 3, 12, 13]]
    assert zigzag_slice(x, 1, 0) is x
    for cp in (2, 4, 8):  # every token on exactly one rank
        owned = torch.cat([zigzag_slice(x, cp, r) for r in range(cp)], dim=1)
        assert sorted(owned[0].tolist()) == list(range(16))
    with pytest.raises(ValueError, match=r"sequence length \(12\) must be divisible by the 8 chunks"):
        zigzag_slice(torch.arange(12)[None], 4, 0)
    with pytest.raises(ValueError, match="cp_rank"):
        zigzag_slice(x, 2, 2)


@pytest.mark.parametrize("cp", [2, 4])
def test_zigzag_matches_megatron_get_batch_on_this_cp_rank(cp, monkeypatch):
    megatron_utils = pytest.importorskip("megatron.core.utils")
    from megatron.core import parallel_state

    x = torch.randn(2, 32, 3)
    get_batch = megatron_utils.get_batch_on_this_cp_rank
    # megatron-core 0.16 asks parallel_state for the CP size and rank; 0.19 takes is_hybrid_cp and
    # asks torch.distributed about its cp_group (None here): answer both.
    extra = {"is_hybrid_cp": False} if "is_hybrid_cp" in inspect.signature(get_batch).parameters else {}
    monkeypatch.setattr(parallel_state, "get_context_parallel_world_size", lambda: cp)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: cp)
    for rank in range(cp):
        monkeypatch.setattr(parallel_state, "get_context_parallel_rank", lambda rank=rank: rank)
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None, rank=rank: rank)
        expected = get_batch({"tokens": x.clone()}, **extra)["tokens"]
        assert torch.equal(zigzag_slice(x, cp, rank), expected)


def test_retrieval_samples_are_deterministic_and_solvable():
    task = RetrievalTask(vocab_size=64, seq_length=512, num_pairs=8, seed=3)
    a, b, other = task[5], task[5], task[6]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["tokens"], other["tokens"])
    assert not torch.equal(RetrievalTask(64, 512, 8, seed=4)[5]["tokens"], a["tokens"])

    tokens, labels, mask = a["tokens"], a["labels"], a["loss_mask"]
    assert tokens.shape == labels.shape == mask.shape == (512,)
    assert torch.equal(tokens[1:], labels[:-1])  # labels are the tokens shifted by one
    assert 0 <= int(tokens.min()) and int(labels.max()) < 64
    answers = mask.nonzero().flatten()
    assert len(answers) == 8
    first_query = int(answers[0]) - 1
    for pos in answers.tolist():
        key, value = int(tokens[pos]), int(labels[pos])
        assert tokens[pos - 1] == QUERY_TOKEN and 1 <= key <= 31 and 32 <= value < 63
        where = (tokens[:first_query] == key).nonzero().flatten()
        assert len(where) == 1, "each key appears once before the queries"
        assert labels[where[0]] == value, "the answer follows its key"
    # the pairs are spread through the sequence, one per eighth
    keys_at = sorted((tokens[:first_query] <= 31).nonzero().flatten().tolist())
    assert [p // (first_query // 8) for p in keys_at] == list(range(8))


def test_step_microbatches_split_the_global_batch_over_dp_and_cp():
    c = load_job_config(TINY, ["train.global_batch_size=4", "train.micro_batch_size=1", "launch.num_workers=4"])
    assert c.data_parallel_size == 2  # 4 workers / CP 2
    task = RetrievalTask(c.model.vocab_size, c.train.seq_length, c.data.num_pairs, c.train.seed)
    seen = []
    for dp_rank in range(2):
        halves = [step_microbatches(task, 8, c, dp_rank, 2, cp_rank, 2, torch.device("cpu")) for cp_rank in range(2)]
        assert len(halves[0]) == 2  # 4 samples / (mbs 1 x dp 2)
        for m, (mb0, mb1) in enumerate(zip(*halves)):
            assert mb0["tokens"].shape == (1, 256)
            sample = 8 + m * 2 + dp_rank
            seen.append(sample)
            full = task[sample]["tokens"][None]
            assert torch.equal(mb0["tokens"], zigzag_slice(full, 2, 0))
            assert torch.equal(mb1["tokens"], zigzag_slice(full, 2, 1))
            assert torch.equal(mb1["position_ids"], zigzag_slice(torch.arange(512)[None], 2, 1))
    assert sorted(seen) == [8, 9, 10, 11]


def test_pack_documents_cuts_at_eod_and_row_ends():
    eod = 9
    tokens = torch.tensor([[1, 2, eod, 3, 4, 5], [6, eod, 7, 8, 1, eod]])
    batch = {"tokens": tokens, "labels": tokens + 1, "loss_mask": torch.ones(2, 6),
             "position_ids": torch.arange(6).expand(2, -1)}
    packed = pack_documents(batch, eod)
    assert packed["cu_seqlens"].tolist() == [0, 3, 6, 8, 12]  # the EOD closing row 2 adds no boundary
    assert packed["cu_seqlens"].dtype == torch.int32
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert torch.equal(packed["tokens"], tokens.reshape(1, -1))
    assert torch.equal(packed["labels"], (tokens + 1).reshape(1, -1))
    assert packed["loss_mask"].shape == (1, 12)


def test_pack_documents_under_context_parallelism_pads_and_splits_each_document():
    eod, block = 9, 2  # documents padded to 2 x CP x 2 = multiples of 8 tokens
    tokens = torch.tensor([[1, 2, eod, 3, 4, 5, 6, 7, 8, 1, 2, eod]])
    batch = {"tokens": tokens, "labels": tokens + 1, "loss_mask": torch.ones(1, 12),
             "position_ids": torch.arange(12)[None]}
    shards = [pack_documents(batch, eod, 2, rank, block) for rank in range(2)]
    for shard in shards:
        assert shard["cu_seqlens"].tolist() == [0, 8, 24]  # 3 tokens -> 8, 9 tokens -> 16
    # Each rank: chunks r and 3 - r of every padded document, documents back to back.
    assert shards[0]["position_ids"].tolist() == [[0, 1, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15]]
    assert shards[1]["position_ids"].tolist() == [[2, 3, 4, 5, 4, 5, 6, 7, 8, 9, 10, 11]]
    assert shards[0]["tokens"].tolist() == [[1, 2, eod, eod, 3, 4, 5, 6, eod, eod, eod, eod]]
    assert shards[1]["tokens"].tolist() == [[eod, eod, eod, eod, 7, 8, 1, 2, eod, eod, eod, eod]]
    assert shards[0]["loss_mask"].tolist() == [[1, 1, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0]]
    assert shards[1]["loss_mask"].tolist() == [[1, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0]]
    kept = sorted(t for s in shards for t, m in zip(s["labels"][0].tolist(), s["loss_mask"][0].tolist()) if m)
    assert kept == sorted((tokens + 1)[0].tolist())  # every real token keeps its label, once


def test_learning_rate_warms_up_then_decays_to_min_lr():
    t = load_job_config(TINY, ["train.max_steps=100", "train.warmup_steps=10", "train.lr=1e-3",
                               "train.min_lr=1e-4"]).train
    lrs = [learning_rate(s, t) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in pairwise(lrs[:10]))
    assert all(a >= b for a, b in pairwise(lrs[9:]))
    assert learning_rate(100, t) == pytest.approx(1e-4)
