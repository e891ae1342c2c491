"""The one document reader: every format, every reason a file is skipped, the read report, the
strict callers (read_jsonl_lines, held-out texts, GLUE local files) and random or truncated input."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml
from conftest import BIN, run_env
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmcore.core import readers
from lmcore.core.errors import StageError
from lmcore.core.io import read_jsonl_lines
from lmcore.core.readers import ReadStats, detect_format, read_files, read_texts
from lmcore.data import glue


def _zst(raw: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(raw)


def _parquet(texts: list[str | None]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"text": texts}), buf)
    return buf.getvalue()


def _jsonl(texts: list[str]) -> bytes:
    return "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()


def _read(paths, unit: str = "file") -> tuple[list[dict], dict]:
    stats = ReadStats()
    docs = list(read_files([str(p) for p in paths], "text", unit, stats))
    return docs, stats.to_dict()


def test_format_detection_by_name():
    names = {"a.txt": "text", "a.MD": "text", "a.text": "text", "a.jsonl": "jsonl", "a.ndjson": "jsonl",
             "a.jsonl.gz": "jsonl", "a.ndjson.zst": "jsonl", "a.csv": "csv", "a.tsv": "tsv", "a.parquet": "parquet",
             "a.bin": None, "a.gz": None, "README": None}
    assert {n: detect_format(n) for n in names} == names


def test_every_format_is_read_and_reported_read(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    (d / "a.txt").write_text("one\n\ntwo\n")
    (d / "b.md").write_text("# title\n")
    (d / "c.jsonl").write_bytes(_jsonl(["c1", "c2"]))
    (d / "d.ndjson.gz").write_bytes(gzip.compress(_jsonl(["d1"])))
    (d / "e.jsonl.zst").write_bytes(_zst(_jsonl(["e1"])) + _zst(_jsonl(["e2"])))  # two frames
    (d / "f.csv").write_text('text,n\n"quoted, ""cell""",1\n')
    (d / "g.tsv").write_text('text\tn\nhe said "no\t1\n')
    (d / "h.parquet").write_bytes(_parquet(["h1", "h2"]))
    docs, report = _read([d], unit="paragraph")
    assert [x["text"] for x in docs] == ["one", "two", "# title", "c1", "c2", "d1", "e1", "e2",
                                         'quoted, "cell"', 'he said "no', "h1", "h2"]
    assert report["files"] == 8 and report["documents"] == 12 and report["problems"] == {}
    assert {Path(p).name: s["status"] for p, s in report["status"].items()} == dict.fromkeys(
        ["a.txt", "b.md", "c.jsonl", "d.ndjson.gz", "e.jsonl.zst", "f.csv", "g.tsv", "h.parquet"], "read")
    assert report["status"][str(d / "c.jsonl")] == {"status": "read", "documents": 2}


def test_what_review_found_in_the_readers(tmp_path):
    """Windows paragraphs were one document; a field over csv's 131,072 characters ended the file;
    a lone surrogate escape passed the reader and crashed prepare's writing, naming no file."""
    d = tmp_path / "src"
    d.mkdir()
    (d / "a.txt").write_bytes(b"one\r\ntwo\r\n\r\nthree\r\n\r\nfour\r\n")
    long = "x" * 200_000
    (d / "b.csv").write_text(f"text\nfirst\n{long}\nthird\n", encoding="utf-8")
    (d / "c.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "bad \\ud800 half"}\n{"text": "pair \\ud83d\\ude00 ok"}\n')
    docs, report = _read([d], unit="paragraph")
    assert [x["text"] for x in docs] == ["one\ntwo", "three", "four", "first", long, "third", "fine", "pair \U0001f600 ok"]
    assert report["problems"] == {str(d / "c.jsonl"): {"counts": {"invalid_utf8_line": 1},
                                                       "lines": {"invalid_utf8_line": [2]}}}


def test_every_skip_reason_is_reported(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    good = _jsonl([f"document number {i}" for i in range(20000)])  # several zstd blocks
    (d / "good.txt").write_text("fine\n")
    (d / "corrupt.jsonl.gz").write_bytes(b"<html>404 not found</html>")  # a broken download
    (d / "binary.txt").write_bytes(b"\x00\x01\x02")
    (d / "empty.jsonl").write_bytes(b"")
    (d / "blank.txt").write_text("\n\n  \n")
    (d / "ignored.bin").write_bytes(b"\x00\x01")
    gz, zst = gzip.compress(good), _zst(good)
    (d / "cut.jsonl.gz").write_bytes(gz[: len(gz) // 2])
    (d / "cut.jsonl.zst").write_bytes(zst[: len(zst) // 2])
    (d / "cut.parquet").write_bytes(_parquet(["a", "b"])[:-10])
    (d / "bad.jsonl").write_bytes(b"\xff\n{broken\n[1]\n")
    (d / "some.jsonl").write_bytes(b'{"text": "kept"}\n{broken\n')
    (d / ".hidden").write_bytes(b"not listed")
    docs, report = _read([d])
    status = {Path(p).name: s for p, s in report["status"].items()}
    assert ".hidden" not in status and len(status) == 11 == report["files"]
    assert status["good.txt"] == {"status": "read", "documents": 1}
    reasons = {n: s.get("reason") for n, s in status.items() if s["status"] == "skipped"}
    assert reasons == {"corrupt.jsonl.gz": "corrupt archive", "binary.txt": "binary", "empty.jsonl": "empty",
                       "blank.txt": "empty", "ignored.bin": "unknown extension", "cut.parquet": "corrupt archive",
                       "bad.jsonl": "no readable records"}
    for name in ("cut.jsonl.gz", "cut.jsonl.zst"):
        assert status[name]["status"] == "partly read" and status[name]["skipped"]["truncated_stream"] == 1
        assert 0 < status[name]["documents"] < 20000
    assert status["some.jsonl"] == {"status": "partly read", "documents": 1, "skipped": {"invalid_json_line": 1}}
    assert status["bad.jsonl"]["skipped"] == {"invalid_utf8_line": 1, "invalid_json_line": 1,
                                              "records_without_text": 1}
    # one warning line per problem file, naming it
    warnings = readers.warning_lines(report)
    assert len(warnings) == 10 and all(w.split(":")[0] in report["status"] for w in warnings)
    assert f"{d / 'corrupt.jsonl.gz'}: skipped 1 corrupt archive" in warnings
    assert f"{d / 'ignored.bin'}: skipped 1 unknown extension" in warnings
    assert f"{d / 'empty.jsonl'}: skipped 1 empty file" in warnings
    assert report["skipped"]["binary_file"] == 1 and report["skipped"]["empty_file"] == 2
    assert json.loads(json.dumps(report)) == report  # what prepare writes to read_report.json


def test_files_not_reached_under_max_documents_are_accounted_for(tmp_path):
    from lmcore.config import CorpusSource
    from lmcore.data.prepare import corpus_documents

    for name in "abc":
        (tmp_path / f"{name}.jsonl").write_bytes(_jsonl([f"{name}1", f"{name}2"]))
    stats = ReadStats()
    docs = list(corpus_documents(CorpusSource(kind="files", paths=[str(tmp_path)], max_documents=3), stats))
    assert [x["text"] for x in docs] == ["a1", "a2", "b1"]
    status = {Path(p).name: s for p, s in stats.to_dict()["status"].items()}
    assert status["a.jsonl"]["status"] == "read"
    assert status["b.jsonl"] == {"status": "partly read", "documents": 1, "reason": "stopped at max_documents"}
    assert status["c.jsonl"] == {"status": "skipped", "documents": 0, "reason": "not reached (max_documents)"}
    # the limit at a file's last document: that file was read whole, the next one not reached
    stats = ReadStats()
    docs = list(corpus_documents(CorpusSource(kind="files", paths=[str(tmp_path)], max_documents=4), stats))
    assert [x["text"] for x in docs] == ["a1", "a2", "b1", "b2"] and stats.documents == 4
    status = {Path(p).name: s for p, s in stats.to_dict()["status"].items()}
    assert status["b.jsonl"] == {"status": "read", "documents": 2}
    assert status["c.jsonl"] == {"status": "skipped", "documents": 0, "reason": "not reached (max_documents)"}


def test_strict_readers_name_file_and_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n{"a": 2}\n[3]\n')
    with pytest.raises(StageError, match=r"x\.jsonl: line 4: expected a JSON object"):
        list(read_jsonl_lines(p))
    p.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n{"a": 2}\n')
    assert list(read_jsonl_lines(p)) == [(1, {"a": 1}), (3, {"a": 2})]  # BOM accepted on line 1
    z = tmp_path / "y.jsonl.gz"
    z.write_bytes(b"not gzip at all")
    with pytest.raises(StageError, match=r"y\.jsonl\.gz: corrupt archive"):
        list(read_jsonl_lines(z))
    gz = gzip.compress(_jsonl([f"t{i}" for i in range(5000)]))
    z.write_bytes(gz[: len(gz) // 2])
    with pytest.raises(StageError, match=r"y\.jsonl\.gz: truncated"):
        list(read_jsonl_lines(z))
    with pytest.raises(StageError, match=r"y\.jsonl\.gz: truncated"):
        list(read_texts([z]))
    (tmp_path / "h.parquet").write_bytes(_parquet(["held", None]))
    with pytest.raises(StageError, match=r"h\.parquet: line 2: .*'text' \(the text_field of texts\)"):
        list(read_texts([tmp_path / "h.parquet"]))
    t = tmp_path / "t.tsv"
    t.write_bytes(b"a\tlabel\nfine\t1\nbad \xff\t0\n")
    with pytest.raises(StageError, match=r"t\.tsv: line 3: invalid UTF-8"):
        glue.read_local_split(glue.TASKS["sst2"], t, {"text_a": "a", "label": "label"}, "train")
    with pytest.raises(StageError, match=r"x\.txt: unknown file type"):
        glue.local_format(tmp_path / "x.txt")


def _prepare(proj: Path, folder: Path) -> subprocess.CompletedProcess:
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["prepare"]["corpus"]["paths"] = [str(folder)]
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    return subprocess.run([str(BIN / "lmcore"), "prepare"], cwd=proj, env=run_env(), capture_output=True, text=True)


def test_prepare_reports_a_corrupt_download_and_fails_only_on_an_empty_corpus(tiny_project, tmp_path):
    src = tmp_path / "mixed"
    src.mkdir()
    (src / "a.txt").write_text("a good document that is long enough to keep around after cleaning\n")
    (src / "broken.jsonl.gz").write_bytes(b"<html>502 Bad Gateway</html>\n")
    (src / "notes.bin").write_bytes(b"\x00\x01")
    res = _prepare(tiny_project, src)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert f"{src / 'broken.jsonl.gz'}: skipped 1 corrupt archive" in res.stderr
    assert f"{src / 'notes.bin'}: skipped 1 unknown extension" in res.stderr
    report = json.loads((tiny_project / "data/raw/read_report.json").read_text())
    assert {"files", "documents", "skipped", "problems", "status"} <= set(report)
    assert report["status"][str(src / "broken.jsonl.gz")] == {
        "status": "skipped", "documents": 0, "reason": "corrupt archive", "skipped": {"corrupt_archive": 1}}
    assert report["status"][str(src / "a.txt")] == {"status": "read", "documents": 1}

    (src / "a.txt").unlink()
    res = _prepare(tiny_project, src)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if "WARNING" not in line and "INFO" not in line]
    assert len(errors) == 1 and "no documents" in errors[0] and "broken.jsonl.gz" in errors[0], res.stderr


# ---------------------------------------------------------------------------------------------
# random and truncated files of every format

NAMES = ["a.txt", "b.md", "c.jsonl", "d.ndjson", "e.jsonl.gz", "f.jsonl.zst", "g.csv", "h.tsv", "i.parquet", "j.bin"]


def _valid(name: str) -> bytes:
    rows = [f"row {i} with \"quotes\", commas\tand tabs" for i in range(50)]
    if name.endswith((".txt", ".md")):
        return "\n\n".join(rows).encode()
    if name.endswith((".jsonl", ".ndjson")):
        return _jsonl(rows)
    if name.endswith(".gz"):
        return gzip.compress(_jsonl(rows))
    if name.endswith(".zst"):
        return _zst(_jsonl(rows))
    if name.endswith(".csv"):
        return ("text,n\n" + "".join(f'"{r.replace(chr(34), chr(34) * 2)}",1\n' for r in rows)).encode()
    if name.endswith(".tsv"):
        return ("text\tn\n" + "".join(r.replace("\t", " ") + "\t1\n" for r in rows)).encode()
    if name.endswith(".parquet"):
        return _parquet(rows)
    return b"\x00" * 10


_CACHE: dict[str, bytes] = {}

contents = st.one_of(
    st.binary(max_size=300),
    st.tuples(st.sampled_from(NAMES), st.floats(0, 1)).map(
        lambda t: _CACHE.setdefault(t[0], _valid(t[0]))[: int(len(_CACHE[t[0]]) * t[1])]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files=st.lists(st.tuples(st.sampled_from(NAMES), contents), min_size=1, max_size=6))
def test_random_and_truncated_files_never_raise_anything_but_stage_error(files):
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        paths = []
        for i, (name, data) in enumerate(files):
            paths.append(d / f"{i}{name}")
            paths[-1].write_bytes(data)
        for p in paths:  # each file alone: a StageError (no column 'text'...) or a status
            stats = ReadStats()
            try:
                for _ in read_files([str(p)], "text", "paragraph", stats):
                    pass
            except StageError:
                continue
            assert stats.file_status(str(p))["status"] in ("read", "partly read", "skipped")
            assert stats.documents == stats.status[str(p)].documents
        stats = ReadStats()
        try:
            for _ in read_files([tmp], "text", "file", stats):
                pass
        except StageError:
            pass
        else:
            assert set(stats.to_dict()["status"]) == {str(p) for p in paths}
        for strict_read in (lambda p: list(read_texts([p])), lambda p: list(read_jsonl_lines(p)),
                            lambda p: glue.read_local_split(glue.TASKS["sst2"], p, {"text_a": "text", "label": "n"},
                                                            "train")):
            for p in paths:
                try:
                    strict_read(p)
                except StageError:
                    pass


def test_paragraphs_end_at_blank_lines_of_spaces_too_and_carry_their_first_line(tmp_path):
    """A line of spaces did not end a paragraph, and a paragraph after two blank lines began with
    a newline and was numbered one line early."""
    from lmcore.core.readers import text_records

    (tmp_path / "p.txt").write_text("para one\n\n\npara two\n \t\npara three\n  indented\n\n\n")
    got = list(text_records(tmp_path / "p.txt", lambda *a: None, "paragraph"))
    assert got == [(1, {"text": "para one"}), (4, {"text": "para two"}), (6, {"text": "para three\n  indented"})]


def test_a_folder_leaves_out_hidden_files_and_hidden_folders(tmp_path):
    from lmcore.core.readers import expand_paths

    for name in ("a.txt", ".hidden.txt", ".ipynb_checkpoints/a-checkpoint.txt", ".git/x", "sub/b.txt"):
        (tmp_path / "c" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "c" / name).write_text("x")
    assert [p.relative_to(tmp_path / "c").as_posix() for p in expand_paths([tmp_path / "c"], "k")] == ["a.txt", "sub/b.txt"]
