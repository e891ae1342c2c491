"""Bad input gives one clear error line, exit status 2, and leaves earlier outputs intact."""

from __future__ import annotations

import json
import re
import subprocess

import yaml
from conftest import BIN, run_env


def lmcore(proj, stage):
    return subprocess.run([str(BIN / "lmcore"), stage], cwd=proj, env=run_env(), capture_output=True, text=True)


def one_error_line(res, *needles):
    assert res.returncode == 2, res.stderr
    log_line = re.compile(r"^(\d{4}/\d\d/\d\d [\d:]+ )?(INFO|WARNING) ")
    lines = [line for line in res.stderr.strip().splitlines() if not log_line.match(line)]
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def set_params(proj, fn):
    params = yaml.safe_load((proj / "params.yaml").read_text())
    fn(params)
    (proj / "params.yaml").write_text(yaml.safe_dump(params))


def test_wrong_type_in_params(tiny_project):
    set_params(tiny_project, lambda p: p["clean"].update(min_chars="many"))
    one_error_line(lmcore(tiny_project, "clean"), "clean.min_chars", "'many'")


def test_missing_input_file(tiny_project):
    one_error_line(lmcore(tiny_project, "clean"), "data/raw/corpus", "not found")


def test_missing_corpus_path_keeps_earlier_output(tiny_project, tmp_path):
    assert lmcore(tiny_project, "prepare").returncode == 0
    before = (tiny_project / "data/raw/corpus/00000.jsonl").read_bytes()
    set_params(tiny_project, lambda p: p["prepare"]["corpus"].update(paths=[str(tmp_path / "nowhere")]))
    one_error_line(lmcore(tiny_project, "prepare"), "nowhere", "not found")
    assert (tiny_project / "data/raw/corpus/00000.jsonl").read_bytes() == before


def test_invalid_utf8_is_skipped_counted_and_reported_by_file_and_line(tiny_project, tmp_path):
    src = tmp_path / "mixed"
    src.mkdir()
    (src / "a.txt").write_bytes(b"fine line one\nsecond \xff\xfe line\nthird line is fine too\n")
    (src / "b.jsonl").write_bytes(b'{"text": "a good record that is long enough to keep around"}\n\xff\n{broken\n')
    (src / "c.txt").write_bytes(b"\x00\x01binary\x00")
    set_params(tiny_project, lambda p: p["prepare"]["corpus"].update(paths=[str(src)]))
    res = lmcore(tiny_project, "prepare")
    assert res.returncode == 0, res.stderr
    assert "a.txt: skipped 1 invalid utf8 line (line 2)" in res.stderr
    assert "b.jsonl: skipped 1 invalid json line (line 3); 1 invalid utf8 line (line 2)" in res.stderr
    assert "c.txt: skipped 1 binary file" in res.stderr
    m = json.loads((tiny_project / "metrics/prepare.json").read_text())
    assert m["documents"] == 2 and m["skipped.invalid_utf8_line"] == 2 and m["skipped.binary_file"] == 1
    docs = [json.loads(line) for line in (tiny_project / "data/raw/corpus/00000.jsonl").open()]
    assert docs[0]["text"] == "fine line one\nthird line is fine too\n"


def test_unreadable_corpus_is_an_error(tiny_project, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.txt").write_bytes(b"\xff\xfe\xfd")
    set_params(tiny_project, lambda p: p["prepare"]["corpus"].update(paths=[str(bad)]))
    one_error_line(lmcore(tiny_project, "prepare"), "no documents", "a.txt", "invalid utf8 line (line 1)")
    assert not (tiny_project / "data/raw").exists()


def test_empty_corpus(tiny_project, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "nothing.jsonl").write_text("")
    set_params(tiny_project, lambda p: p["prepare"]["corpus"].update(paths=[str(empty)]))
    one_error_line(lmcore(tiny_project, "prepare"), "no documents")
