"""Bad input gives one clear error line, exit status 2, and leaves earlier outputs intact."""

from __future__ import annotations

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
    one_error_line(lmcore(tiny_project, "clean"), "data/raw/corpus.jsonl", "not found")


def test_missing_corpus_path_keeps_earlier_output(tiny_project, tmp_path):
    assert lmcore(tiny_project, "prepare").returncode == 0
    before = (tiny_project / "data/raw/corpus.jsonl").read_bytes()
    set_params(tiny_project, lambda p: p["prepare"]["corpus"].update(paths=[str(tmp_path / "nowhere")]))
    one_error_line(lmcore(tiny_project, "prepare"), "nowhere", "not found")
    assert (tiny_project / "data/raw/corpus.jsonl").read_bytes() == before


def test_invalid_utf8_names_file_and_line(tiny_project, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.txt").write_bytes(b"fine line\nsecond \xff\xfe line\n")
    set_params(tiny_project, lambda p: p["prepare"]["corpus"].update(paths=[str(bad)]))
    one_error_line(lmcore(tiny_project, "prepare"), "a.txt", "line 2", "invalid UTF-8")
    assert not (tiny_project / "data/raw").exists()


def test_empty_corpus(tiny_project, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "nothing.jsonl").write_text("")
    set_params(tiny_project, lambda p: p["prepare"]["corpus"].update(paths=[str(empty)]))
    one_error_line(lmcore(tiny_project, "prepare"), "no documents")
