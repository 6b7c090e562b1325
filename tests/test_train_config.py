"""Job-config fields nsa-train added: bad values are errors naming the key."""
from pathlib import Path

import pytest

from nsa_parallel.job_config import load_job_config

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def test_defaults_of_the_trainer_fields():
    c = load_job_config(TINY)
    assert (c.model.attention, c.train.clip_grad, c.train.keep_checkpoints, c.launch.max_failures) == ("nsa", 1.0, 2, 3)


@pytest.mark.parametrize("overrides, message", [
    (["launch.gpus_per_worker=2"], "launch.gpus_per_worker (2) must be 0 (CPU) or 1"),
    (["train.precision=bf16"], "train.precision (bf16) needs GPUs"),
    (["model.attention=dense"], "model.attention ('dense') must be one of"),
    (["model.attention=full"],
     "model.attention=full (torch SDPA as Megatron's core attention) does not support "
     "parallel.context_parallel_size (2)"),
    (["model.vocab_size=63", "data.num_pairs=4", "parallel.tensor_model_parallel_size=2",
      "parallel.context_parallel_size=1"], "model.vocab_size (63) must be divisible by"),
    (["data.num_pairs=40"], "data.num_pairs (40) needs model.vocab_size >= 81"),
    (["data.num_pairs=0"], "data.num_pairs (0) must be positive"),
    (["model.vocab_size=4096", "data.num_pairs=200"], "data.num_pairs (200) does not fit train.seq_length (512)"),
    (["train.clip_grad=-1"], "train.clip_grad (-1.0) must be finite and >= 0"),
    (["train.keep_checkpoints=0"], "train.keep_checkpoints (0) must be positive"),
    (["launch.max_failures=-1"], "launch.max_failures (-1) must not be negative"),
    (["data.eod_token=64", "data.path=/p", "parallel.context_parallel_size=1"],
     "data.eod_token (64) must be a token id in [0, model.vocab_size (64))"),
    (["data.eod_token=3", "parallel.context_parallel_size=1"], "data.eod_token needs data.path"),
    (["data.eod_token=3", "data.path=/p", "parallel.context_parallel_size=1", "model.attention=full"],
     "data.eod_token needs model.attention=nsa"),
])
def test_bad_trainer_values_name_the_key(overrides, message):
    with pytest.raises(ValueError) as err:
        load_job_config(TINY, overrides)
    assert message in str(err.value)


def test_full_attention_runs_on_the_cpu_without_context_parallelism():
    c = load_job_config(TINY, ["model.attention=full", "parallel.context_parallel_size=1"])
    assert (c.model.attention, c.launch.gpus_per_worker) == ("full", 0)


def test_one_gpu_16k_config_compares_nsa_with_full_attention():
    c = load_job_config(TINY.parent / "gpu-1gpu-16k.yaml")
    assert (c.train.seq_length, c.launch.num_workers, c.launch.gpus_per_worker) == (16384, 1, 1)
    full = load_job_config(TINY.parent / "gpu-1gpu-16k.yaml", ["model.attention=full"])
    assert full.model.attention == "full"


def test_a_data_path_lifts_the_retrieval_task_limits():
    c = load_job_config(TINY, ["data.path=/some/prefix", "data.num_pairs=1000"])
    assert c.data.path == "/some/prefix"
