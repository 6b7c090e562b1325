"""benchmarks/make_code_corpus.py: Python sources as a byte-level Megatron indexed dataset."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy
import pytest

pytest.importorskip("megatron.core")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "make_code_corpus.py"


def _script():
    spec = importlib.util.spec_from_file_location("make_code_corpus", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tree(root: Path) -> dict[str, bytes]:
    files = {"a.py": b"import os\nprint(os.sep)\n", "pkg/b.py": b"x = 1\n" * 40, "pkg/c.py": b"#",
             "site-packages/d.py": b"installed = True\n", "notes.txt": b"not python"}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def test_corpus_holds_each_source_file_as_a_document(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    mcc = _script()
    files = _tree(tmp_path / "src")
    sources = mcc.source_files(tmp_path / "src")
    assert [p.relative_to(tmp_path / "src").as_posix() for p in sources] == ["a.py", "pkg/b.py", "pkg/c.py"]
    documents, tokens = mcc.write_corpus(sources, tmp_path / "out" / "code", max_bytes=2**20)
    assert documents == 2 and tokens == len(files["a.py"]) + len(files["pkg/b.py"])  # the 1-byte file is left out
    dataset = IndexedDataset(str(tmp_path / "out" / "code"))
    assert len(dataset) == 2
    assert bytes(numpy.asarray(dataset[0], dtype=numpy.uint8)) == files["a.py"]
    assert bytes(numpy.asarray(dataset[1], dtype=numpy.uint8)) == files["pkg/b.py"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["code.bin", "code.idx"]  # no temporaries left


def test_corpus_stops_at_the_size_limit(tmp_path):
    mcc = _script()
    _tree(tmp_path / "src")
    documents, tokens = mcc.write_corpus(mcc.source_files(tmp_path / "src"), tmp_path / "code", max_bytes=100)
    assert (documents, tokens) == (1, 24)  # b.py (240 bytes) would pass 100


def test_no_sources_is_an_error_and_writes_nothing(tmp_path):
    mcc = _script()
    (tmp_path / "src").mkdir()
    with pytest.raises(SystemExit, match="no .py files"):
        mcc.write_corpus(mcc.source_files(tmp_path / "src"), tmp_path / "out" / "code", max_bytes=100)
    assert not (tmp_path / "out" / "code.bin").exists() and not (tmp_path / "out" / "code.idx").exists()


def test_eod_ends_every_document(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    mcc = _script()
    files = _tree(tmp_path / "src")
    mcc.write_corpus(mcc.source_files(tmp_path / "src"), tmp_path / "code", max_bytes=2**20, eod=True)
    dataset = IndexedDataset(str(tmp_path / "code"))
    for i, name in enumerate(["a.py", "pkg/b.py"]):
        doc = numpy.asarray(dataset[i])
        assert doc.dtype == numpy.uint16 and doc[-1] == mcc.EOD
        assert bytes(doc[:-1].astype(numpy.uint8)) == files[name]
