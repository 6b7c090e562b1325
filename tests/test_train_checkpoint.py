"""nsa-train's checkpoints on one gloo rank: Megatron dist_checkpointing round trip on the CPU, atomic
publication through `latest`, interrupted writes never picked up, pruning."""
import tempfile

import pytest
import torch

pytest.importorskip("megatron.core")

import torch.distributed as dist
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

from nsa_parallel.train import checkpoint


@pytest.fixture(scope="module", autouse=True)
def gloo_world_of_one():
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", init_method=f"file://{tempfile.mktemp()}", rank=0, world_size=1)
    yield
    if owned:
        dist.destroy_process_group()


def _state(weight: torch.Tensor, step: int) -> dict:
    return {"w": ShardedTensor.from_rank_offsets("w", weight, replica_id=0), "step": step,
            "rng": ShardedObject("rng", {"cpu": torch.get_rng_state()}, (1,), (0,), replica_id=0)}


def test_round_trip_and_latest_pointer(tmp_path):
    root = tmp_path / "checkpoints"
    assert checkpoint.latest_checkpoint(root) is None
    w = torch.randn(4, 3)
    saved = checkpoint.save_checkpoint(root, 7, _state(w, 7), keep=2, extra_files={"job.yaml": "a: 1\n"})
    assert saved == root / "step_00000007" and (saved / "job.yaml").read_text() == "a: 1\n"
    assert checkpoint.latest_checkpoint(root) == saved
    assert not list(root.glob(".tmp-*"))
    assert checkpoint.load_common(saved)["step"] == 7
    loaded = checkpoint.load_checkpoint(saved, _state(torch.zeros(4, 3), 0))
    assert torch.equal(loaded["w"], w) and loaded["step"] == 7
    assert torch.equal(loaded["rng"]["cpu"], torch.get_rng_state())


def test_interrupted_write_is_never_picked_up_and_is_removed(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    w = torch.randn(4, 3)
    checkpoint.save_checkpoint(root, 2, _state(w, 2), keep=2, extra_files={})

    def killed_while_writing(*args):
        raise KeyboardInterrupt  # stands in for a process killed right after writing its shards

    monkeypatch.setattr(checkpoint, "maybe_crash", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(root, 4, _state(w + 1, 4), keep=2, extra_files={})
    assert any((root / ".tmp-step_00000004").iterdir())  # written, never published
    assert checkpoint.latest_checkpoint(root) == root / "step_00000002"
    # a step directory that `latest` does not name (renamed, then killed) is ignored as well
    (root / "step_00000006").mkdir()
    assert checkpoint.latest_checkpoint(root) == root / "step_00000002"
    checkpoint.remove_interrupted(root)
    assert not list(root.glob(".tmp-*"))


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        checkpoint.save_checkpoint(root, step, _state(torch.full((2,), float(step)), step), keep=2, extra_files={})
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000003", "step_00000004"]
    loaded = checkpoint.load_checkpoint(checkpoint.latest_checkpoint(root), _state(torch.zeros(2), 0))
    assert loaded["w"].tolist() == [4.0, 4.0]


def test_latest_naming_an_incomplete_checkpoint_is_an_error(tmp_path):
    (tmp_path / "step_00000001").mkdir()
    (tmp_path / "latest").write_text("step_00000001\n")
    with pytest.raises(RuntimeError, match="not a complete checkpoint"):
        checkpoint.latest_checkpoint(tmp_path)
