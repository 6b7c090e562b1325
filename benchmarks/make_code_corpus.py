"""A byte-level training corpus from Python source files, as a Megatron indexed dataset.

The built-in retrieval task is not learned by small models in a few thousand steps, so its
attention stays untrained. Source code is real language that any model starts to learn at once
(identifiers defined far back are used again), and every machine has some: by default the
running Python's standard library. One file is one document, its bytes the token ids (0-255,
so any ``model.vocab_size >= 256`` fits). With ``--eod``, each document ends with token 256
(``model.vocab_size >= 257``), which ``data.eod_token=256`` turns into document boundaries.

    python benchmarks/make_code_corpus.py /tmp/code/stdlib        # writes stdlib.bin / stdlib.idx
    nsa-train --config configs/gpu-1gpu-16k.yaml --no-ray data.path=/tmp/code/stdlib
"""
from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

import numpy

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
EOD = 256  # one past the bytes


def source_files(root: Path) -> list[Path]:
    """The ``.py`` files under ``root`` outside installed packages, in a fixed order."""
    return sorted(p for p in root.rglob("*.py") if not SKIP_DIRS.intersection(p.relative_to(root).parts))


def write_corpus(files: list[Path], prefix: Path, max_bytes: int, eod: bool = False) -> tuple[int, int]:
    """Writes ``prefix.bin``/``prefix.idx`` from ``files`` until ``max_bytes``: uint8 tokens, or
    with ``eod`` uint16 ones, each document followed by ``EOD``; returns (documents, tokens of
    the sources). Files are written under temporary names and renamed at the end, so an
    interrupted run leaves no corpus that looks whole."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    documents, tokens = [], 0
    for path in files:
        data = numpy.frombuffer(path.read_bytes(), dtype=numpy.uint8)
        if len(data) < 2:  # a document of one token has no next token to learn
            continue
        if tokens + len(data) > max_bytes:
            break
        documents.append(data)
        tokens += len(data)
    if not documents:
        raise SystemExit(f"no .py files of 2 bytes or more (within {max_bytes} bytes) among {len(files)} files")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp_bin, tmp_idx = prefix.with_name(prefix.name + ".tmp.bin"), prefix.with_name(prefix.name + ".tmp.idx")
    dtype = numpy.uint16 if eod else numpy.uint8
    builder = IndexedDatasetBuilder(str(tmp_bin), dtype=dtype)
    for data in documents:
        if eod:
            data = numpy.append(data.astype(dtype), dtype(EOD))
        builder.add_document(data, [len(data)])
    builder.finalize(str(tmp_idx))
    tmp_bin.replace(prefix.with_suffix(".bin"))
    tmp_idx.replace(prefix.with_suffix(".idx"))
    return len(documents), tokens


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("prefix", type=Path, help="output path without suffix (PREFIX.bin, PREFIX.idx)")
    p.add_argument("--source", type=Path, default=Path(sysconfig.get_paths()["stdlib"]),
                   help="directory searched for .py files (default: this Python's standard library)")
    p.add_argument("--max-mib", type=int, default=64, help="stop adding files past this many MiB")
    p.add_argument("--eod", action="store_true", help=f"end each document with token {EOD} (uint16 tokens)")
    args = p.parse_args(argv)
    if not args.source.is_dir():
        p.error(f"--source {args.source} is not a directory")
    files = source_files(args.source)
    documents, tokens = write_corpus(files, args.prefix, args.max_mib * 2**20, args.eod)
    print(f"{args.prefix}.bin/.idx: {documents} files of {args.source}, {tokens / 2**20:.1f} MiB of byte tokens")


if __name__ == "__main__":
    main()
