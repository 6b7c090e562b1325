"""A sha256 per file of a checkpoint, kept in its ``checksums.json``.

Written once every rank's shards are on disk and before ``latest`` names the checkpoint;
compared before the checkpoint is loaded, so a damaged or truncated file is found and named
instead of loading silently or failing deep inside ``torch.load``. Torch-free: the
distributed parts (which rank hashes which file) are ``checkpoint``'s.
"""
from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CHECKSUMS = "checksums.json"
Digest = dict[str, int | str]  # {"bytes": size, "sha256": hex digest}
_READ = 8 << 20


def file_digest(path: Path) -> Digest | None:
    """Size and sha256 of ``path``; None when it cannot be read."""
    sha, size = hashlib.sha256(), 0
    try:
        with open(path, "rb") as f:
            while block := f.read(_READ):
                sha.update(block)
                size += len(block)
    except OSError:
        return None
    return {"bytes": size, "sha256": sha.hexdigest()}


def hash_files(directory: Path, names: list[str]) -> dict[str, Digest | None]:
    """Digests of ``names`` under ``directory``; threads, as hashlib and reads release the GIL."""
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(names)))) as pool:
        return dict(zip(names, pool.map(lambda name: file_digest(directory / name), names)))


def checkpoint_files(directory: Path) -> list[str]:
    """Every file of a checkpoint directory but ``checksums.json``, as sorted relative paths."""
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_file() and p.name != CHECKSUMS)


def write_checksums(directory: Path, digests: dict[str, Digest | None]) -> None:
    unreadable = [name for name, digest in digests.items() if digest is None]
    if unreadable:
        raise OSError(f"cannot read {unreadable} of {directory} to checksum them")
    (directory / CHECKSUMS).write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")


def read_checksums(directory: Path) -> dict[str, Digest]:
    """The digests written with the checkpoint; ``ValueError`` naming the file when they cannot be read."""
    path = directory / CHECKSUMS
    try:
        digests = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} cannot be read ({err})") from None
    if not isinstance(digests, dict) or not digests:
        raise ValueError(f"{path} lists no files")
    return digests


def first_mismatch(expected: dict[str, Digest], actual: dict[str, Digest | None]) -> str | None:
    """What differs from the checksums, naming the file; None when every file matches."""
    for name in sorted(expected):
        got, want = actual.get(name), expected[name]
        if got is None:
            return f"{name} is missing or unreadable"
        if got["bytes"] != want["bytes"]:
            return f"{name} has {got['bytes']} bytes, {want['bytes']} when written"
        if got["sha256"] != want["sha256"]:
            return f"{name} fails its sha256 checksum"
    return None
