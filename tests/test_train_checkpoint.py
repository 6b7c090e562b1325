"""nsa-train's checkpoints on one gloo rank: Megatron dist_checkpointing round trip on the CPU, atomic
publication through `latest`, interrupted writes never picked up, checksums, fallback candidates, pruning."""
import json

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

from nsa_parallel.train import checkpoint, checkpoint_dirs


pytestmark = pytest.mark.usefixtures("gloo_world_of_one")


def _state(weight: torch.Tensor, step: int) -> dict:
    return {"w": ShardedTensor.from_rank_offsets("w", weight, replica_id=0), "step": step,
            "rng": ShardedObject("rng", {"cpu": torch.get_rng_state()}, (1,), (0,), replica_id=0)}


def test_round_trip_and_latest_pointer(tmp_path):
    root = tmp_path / "checkpoints"
    assert checkpoint_dirs.latest_name(root) is None and checkpoint_dirs.resume_candidates(root) == []
    w = torch.randn(4, 3)
    saved = checkpoint.save_checkpoint(root, 7, _state(w, 7), keep=2, extra_files={"job.yaml": "a: 1\n"})
    assert saved == root / "step_00000007" and (saved / "job.yaml").read_text() == "a: 1\n"
    assert checkpoint_dirs.latest_name(root) == saved.name and checkpoint_dirs.resume_candidates(root) == [saved]
    assert not list(root.glob(".tmp-*"))
    # every file but the checksums themselves, with its size and sha256
    sums = json.loads((saved / "checksums.json").read_text())
    assert sorted(sums) == sorted(p.name for p in saved.iterdir() if p.name != "checksums.json")
    # megatron-core 0.16 writes common.pt beside the shards, 0.19 does not
    assert {"job.yaml", "metadata.json"} <= sums.keys() and sums["job.yaml"]["bytes"] == 5
    assert any(name.endswith(".distcp") for name in sums), "the tensor shards are covered"
    assert checkpoint.verify_checkpoint(saved) is None
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
    assert checkpoint_dirs.resume_candidates(root) == [root / "step_00000002"]
    # a step directory that `latest` does not name (renamed, then killed) is ignored as well
    (root / "step_00000006").mkdir()
    assert checkpoint_dirs.resume_candidates(root) == [root / "step_00000002"]
    checkpoint_dirs.remove_interrupted(root)
    assert not list(root.glob(".tmp-*"))


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        checkpoint.save_checkpoint(root, step, _state(torch.full((2,), float(step)), step), keep=2, extra_files={})
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000003", "step_00000004"]
    loaded = checkpoint.load_checkpoint(checkpoint_dirs.resume_candidates(root)[0], _state(torch.zeros(2), 0))
    assert loaded["w"].tolist() == [4.0, 4.0]


def test_damaged_files_are_named_and_earlier_checkpoints_are_the_fallbacks(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        checkpoint.save_checkpoint(root, step, _state(torch.randn(64, 64), step), keep=3, extra_files={})
    latest = root / "step_00000003"
    assert checkpoint_dirs.resume_candidates(root) == [latest, root / "step_00000002", root / "step_00000001"]
    data = max(latest.glob("*.distcp"), key=lambda p: p.stat().st_size)
    with open(data, "r+b") as f:
        f.seek(100)
        f.write(b"\xff" * 64)
    assert checkpoint.verify_checkpoint(latest) == f"{data.name} fails its sha256 checksum"
    size = data.stat().st_size
    data.write_bytes(data.read_bytes()[:size // 2])
    assert checkpoint.verify_checkpoint(latest) == f"{data.name} has {size // 2} bytes, {size} when written"
    data.unlink()
    assert checkpoint.verify_checkpoint(latest) == f"{data.name} is missing or unreadable"
    (latest / "checksums.json").write_text("{")
    assert checkpoint.verify_checkpoint(latest).startswith(f"{latest / 'checksums.json'} cannot be read")
    (root / "latest").write_text("step_00000009\n")  # names a checkpoint that is not there
    assert checkpoint.verify_checkpoint(root / "step_00000009") == f"{root / 'step_00000009'} does not exist"
    assert checkpoint_dirs.resume_candidates(root)[1:] == [latest, root / "step_00000002", root / "step_00000001"]


def test_pruning_keeps_the_checkpoint_just_written_and_ignores_later_ones(tmp_path):
    """After resuming from step 1 because step 3 was damaged, saving step 2 keeps it (keep=1) and
    leaves step 3 to be replaced when training gets there."""
    root = tmp_path / "checkpoints"
    for step in (1, 3):
        checkpoint.save_checkpoint(root, step, _state(torch.zeros(2), step), keep=2, extra_files={})
    checkpoint.save_checkpoint(root, 2, _state(torch.zeros(2), 2), keep=1, extra_files={})
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002", "step_00000003"]
    assert checkpoint_dirs.resume_candidates(root) == [root / "step_00000002"]
