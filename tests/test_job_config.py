"""Job configs: shipped files load, overrides apply, bad keys and values are named."""
from pathlib import Path

import pytest

from nsa_parallel.job_config import load_job_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["tiny", "gpu-1node-128k", "gpu-4node-256k"])
def test_shipped_configs_load(name):
    c = load_job_config(CONFIGS / f"{name}.yaml")
    assert c.train.seq_length % (2 * c.parallel.context_parallel_size * c.nsa.select_block_size) == 0


def test_tiny_runs_context_parallel_on_two_cpu_workers_and_inherits_base():
    c = load_job_config(CONFIGS / "tiny.yaml")
    assert (c.parallel.context_parallel_size, c.launch.num_workers, c.launch.gpus_per_worker) == (2, 2, 0)
    assert c.train.weight_decay == 0.1  # from base.yaml


def test_dotlist_overrides_win():
    c = load_job_config(CONFIGS / "tiny.yaml", ["train.max_steps=100", "nsa.window_size=64"])
    assert c.train.max_steps == 100 and c.nsa_config.window_size == 64


@pytest.mark.parametrize("overrides, message", [
    (["train.max_stepz=3"], "max_stepz"),
    (["train.max_steps=abc"], "max_steps"),
    (["nsa.select_block_size=48"], "nsa.select_block_size (192)"),
    (["nsa.select_block_size=20"], "nsa.select_block_size (20) must be a multiple of compress_stride (8)"),
    (["nsa.num_selected_blocks=2"], "nsa.num_selected_blocks (2) must be at least 3"),
    (["parallel.context_parallel_size=3"], "launch.num_workers (2) must be a multiple of"),
    (["train.seq_length=500"], "train.seq_length (500) must be divisible by 2 x parallel.context_parallel_size"),
    (["model.num_query_groups=3"], "model.num_attention_heads (4) must be a multiple of model.num_query_groups (3)"),
    (["train.precision=fp8"], "train.precision ('fp8') must be one of"),
    (["train.global_batch_size=0"], "train.global_batch_size (0) must be positive"),
])
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ValueError) as err:
        load_job_config(CONFIGS / "tiny.yaml", overrides)
    assert message in str(err.value)


def test_unknown_key_in_a_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {CONFIGS / 'tiny.yaml'}\ntrain:\n  lr_schedule: cosine\n")
    with pytest.raises(ValueError, match="lr_schedule"):
        load_job_config(bad)


def test_base_cycle_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ValueError, match="includes itself"):
        load_job_config(tmp_path / "a.yaml")
