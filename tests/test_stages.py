"""Each stage on tiny data written by the test, tracking off."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_sst2_like

from lmcore.config import CleanConfig, CorpusSource, Params, PrepareConfig, TaskSource, TrackingConfig
from lmcore.core.errors import StageError
from lmcore.data import glue
from lmcore.data.clean import clean, split_of
from lmcore.data.prepare import prepare
from lmcore.eval.unigram import unigram_nll
from lmcore.eval.windows import sliding_window_nll
from lmcore.model.decoder import Decoder, DecoderConfig

OFF = TrackingConfig(enabled=False)


@pytest.fixture
def prepared(tmp_path, corpus_dir):
    glue_dir = write_sst2_like(tmp_path / "glue")
    cfg = PrepareConfig(corpus=CorpusSource(kind="files", paths=[str(corpus_dir)]),
                        tasks=TaskSource(kind="glue_dir", tasks=["sst2"], glue_dir=str(glue_dir)))
    res = prepare(cfg, tmp_path / "raw", tmp_path / "m/prepare.json", OFF)
    return tmp_path, res


def test_prepare_writes_documents_and_tasks(prepared):
    tmp, res = prepared
    assert res.documents == 14
    rows = [json.loads(line) for line in (tmp / "raw/corpus/00000.jsonl").read_text().splitlines()]
    assert {"text", "source", "id"} <= set(rows[0])
    assert res.tasks["sst2"]["train"] == 120 and res.tasks["sst2"]["validation"] == 40
    spec = json.loads((tmp / "raw/tasks/sst2/task.json").read_text())
    assert spec["name"] == "sst2" and spec["labels"] == ["0", "1"]


def test_clean_counts_drops(prepared):
    tmp, _ = prepared
    cfg = CleanConfig(min_chars=50, validation_fraction=0.3, filters={})
    a = clean(cfg, tmp / "raw", tmp / "clean", tmp / "m/clean.json", OFF)
    assert a.stats["dedup.dropped_docs.exact_duplicate"] == 1
    assert a.stats["min_length.dropped_docs.too_short"] == 1
    assert a.stats["train_documents"] + a.stats["validation_documents"] == 12
    assert (tmp / "clean/report.png").stat().st_size > 1000


def test_split_is_a_function_of_text():
    texts = [f"document number {i}" for i in range(2000)]
    splits = [split_of(t, 0.1, "s") for t in texts]
    assert splits == [split_of(t, 0.1, "s") for t in texts]
    assert 0.07 < splits.count("validation") / len(texts) < 0.13
    assert splits != [split_of(t, 0.1, "other") for t in texts]


def test_sliding_window_scores_each_token_once():
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=50, n_layer=1, n_head=2, n_embd=16, block_size=8)).eval()
    tokens = np.random.default_rng(0).integers(0, 50, size=41).astype(np.uint16)
    for stride in (8, 5, 1):
        total, count = sliding_window_nll(model, tokens, 8, stride, batch_size=3)
        assert count == 40
    # with stride == block every window is independent: compare with a direct computation
    total, _ = sliding_window_nll(model, tokens, 8, 8)
    direct = 0.0
    t = torch.from_numpy(tokens.astype(np.int64))
    for b in range(0, 40, 8):
        w = t[b : b + 9]
        with torch.no_grad():
            _, loss = model(w[None, :-1], w[None, 1:], reduction="sum")
        direct += float(loss)
    assert math.isclose(total, direct, rel_tol=1e-5)
    # more context never makes the average much worse on a fixed random model: just finite
    assert math.isfinite(sliding_window_nll(model, tokens, 8, 1)[0])


def test_unigram_baseline():
    train = np.array([0, 0, 0, 1])
    nll = unigram_nll(train, np.array([5, 0, 1]), vocab_size=2)
    assert math.isclose(nll, -math.log(4 / 6) - math.log(2 / 6))


# --------------------------------------------------------------------------------------------- GLUE


def _write(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())


def test_glue_cola_without_header_and_unbalanced_quotes(tmp_path):
    _write(tmp_path / "CoLA/train.tsv", 'gj04\t1\t\tThe "quote never closes.\ngj04\t0\t*\tBad sentence here .')
    rows, skipped = glue.read_glue_split(glue.TASKS["cola"], tmp_path, "train")
    assert skipped == 0 and [r["label"] for r in rows] == [1, 0]
    assert rows[0]["text_a"] == 'The "quote never closes.'
    assert rows[1]["text_a"] == "Bad sentence here ."  # last line without newline


def test_glue_bom_header_and_test_split(tmp_path):
    _write(tmp_path / "SST-2/dev.tsv", b"\xef\xbb\xbfsentence\tlabel\nit 's good\t1\n")
    _write(tmp_path / "SST-2/test.tsv", "index\tsentence\n0\tunlabelled one\n7\tanother\n")
    rows, _ = glue.read_glue_split(glue.TASKS["sst2"], tmp_path, "validation")
    assert rows == [{"idx": 0, "text_a": "it 's good", "text_b": None, "label": 1}]
    test, _ = glue.read_glue_split(glue.TASKS["sst2"], tmp_path, "test")
    assert [r["idx"] for r in test] == [0, 7] and test[0]["label"] is None


def test_glue_qqp_malformed_rows_are_skipped_and_counted(tmp_path):
    _write(tmp_path / "QQP/train.tsv",
           "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
           "5\t1\t2\tHow?\tWhy?\t0\n"
           "6\t3\t4\tbroken row without enough fields\n"
           "7\t5\t6\tA?\tB?\t1\n")
    rows, skipped = glue.read_glue_split(glue.TASKS["qqp"], tmp_path, "train")
    assert skipped == 1 and [(r["idx"], r["text_b"], r["label"]) for r in rows] == [(5, "Why?", 0), (7, "B?", 1)]


def test_glue_stsb_and_mnli_columns(tmp_path):
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    _write(tmp_path / "STS-B/dev.tsv", header + "\n0\tmain\tf\t2012\t1\ts\ts\tA man.\tA person.\t4.250\n")
    rows, _ = glue.read_glue_split(glue.TASKS["stsb"], tmp_path, "validation")
    assert rows[0]["text_a"] == "A man." and rows[0]["text_b"] == "A person." and rows[0]["label"] == 4.25
    cols = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
            "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]
    _write(tmp_path / "MNLI/dev_matched.tsv", "\t".join(cols) + "\n" + "\t".join(
        ["3", "p", "q", "fiction", "(", "(", "(", "(", "He ran.", "He moved.", "entailment", "entailment"]) + "\n")
    rows, _ = glue.read_glue_split(glue.TASKS["mnli"], tmp_path, "validation_matched")
    assert rows[0]["label"] == 0 and rows[0]["text_b"] == "He moved." and rows[0]["idx"] == 3


def test_glue_metrics_use_official_definitions():
    cola = glue.compute_metrics(glue.TASKS["cola"], [1, 0, 1, 1], [1, 0, 0, 1])
    assert math.isclose(cola["matthews"], 0.5773502691896258)
    mrpc = glue.compute_metrics(glue.TASKS["mrpc"], [1, 0, 1, 1], [1, 0, 0, 1])
    assert mrpc == {"f1": 0.8, "accuracy": 0.75}
    stsb = glue.compute_metrics(glue.TASKS["stsb"], [1.0, 2.0, 3.0], [1.0, 2.5, 2.9])
    assert stsb["spearman"] == 1.0 and 0.9 < stsb["pearson"] < 1.0
    assert glue.task_score(glue.TASKS["mrpc"], mrpc) == pytest.approx(0.775)


def test_hub_offline_fails_fast_with_advice():
    with pytest.raises(StageError, match="glue_dir"):
        glue.read_hub_split(glue.TASKS["rte"], "train")


def test_prepare_reads_input_files_relative_to_the_project_not_the_working_directory(tmp_path, monkeypatch):
    """``lmcore --root proj prepare`` run from elsewhere reads ``corpus.paths`` and the local task
    files of params.yaml inside ``proj`` (they were looked up in the working directory)."""
    from lmcore.core.layout import Layout
    from lmcore.stages import run_stage

    proj, elsewhere = tmp_path / "proj", tmp_path / "elsewhere"
    (proj / "texts").mkdir(parents=True)
    elsewhere.mkdir()
    (proj / "texts/a.txt").write_text("A first document of the corpus, long enough to keep.\n", encoding="utf-8")
    rows = [{"text": f"review number {i}", "label": i % 2} for i in range(20)]
    (proj / "texts/reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = PrepareConfig(corpus=CorpusSource(kind="files", paths=["texts/a.txt", str(proj / "texts")]),
                        tasks=TaskSource(tasks=["reviews"], local={"reviews": {
                            "files": {"train": "texts/reviews.jsonl"}, "label_names": ["neg", "pos"]}}))
    rooted = cfg.rooted(Layout(proj))
    assert rooted.corpus.paths == [str(proj / "texts/a.txt"), str(proj / "texts")]  # an absolute path is kept
    assert rooted.tasks.local["reviews"].files == {"train": str(proj / "texts/reviews.jsonl")}
    glue = PrepareConfig(tasks=TaskSource(kind="glue_dir", glue_dir="glue", tasks=["sst2"]))
    assert glue.rooted(Layout(proj)).tasks.glue_dir == str(proj / "glue")
    assert glue.rooted(Layout(proj)).input_files() == [str(proj / "glue/SST-2")]
    assert rooted.input_files() == [str(proj / "texts/a.txt"), str(proj / "texts"), str(proj / "texts/reviews.jsonl")]
    monkeypatch.chdir(elsewhere)
    params = Params.model_validate({"prepare": cfg.model_dump(), "finetune": {"tasks": {"reviews": {}}},
                                    "tracking": {"enabled": False}})
    run_stage("prepare", params, Layout(proj))
    assert (proj / "data/raw/tasks/reviews").is_dir() and not (elsewhere / "data").exists()
    # the outputs name the files as the project does, not with the folder it was read from
    docs = [json.loads(line) for f in sorted((proj / "data/raw/corpus").glob("*.jsonl"))
            for line in f.read_text(encoding="utf-8").splitlines()]
    assert {d["source"] for d in docs} == {"texts/a.txt", "texts/reviews.jsonl"}
    report = json.loads((proj / "data/raw/read_report.json").read_text(encoding="utf-8"))
    assert set(report["status"]) == {"texts/a.txt", "texts/reviews.jsonl"}


def test_a_file_the_params_name_is_part_of_the_prefect_cache_key(tmp_path):
    """A corpus file (or a held-out text) edited in place left the key unchanged: the flow took
    prepare from its cache and trained on the old text."""
    from lmcore.core.layout import Layout
    from lmcore.stages import cache_key, named_inputs

    proj = tmp_path / "proj"
    (proj / "texts").mkdir(parents=True)
    (proj / "texts/a.txt").write_text("first text", encoding="utf-8")
    (proj / "held.txt").write_text("held out", encoding="utf-8")
    (proj / "texts/deep/er").mkdir(parents=True)
    (proj / "texts/deep/er/b.txt").write_text("a text two folders down", encoding="utf-8")
    params = Params.model_validate({"prepare": {"corpus": {"kind": "files", "paths": ["texts/**/*.txt"]}},
                                    "evaluate": {"texts": [{"name": "h", "paths": [str(proj / "held.txt")]}]}})
    layout = Layout(proj)
    # "**" at any depth, as prepare reads it (it matched one folder level only)
    assert named_inputs("prepare", params, layout) == [proj / "texts/a.txt", proj / "texts/deep/er/b.txt"]
    assert named_inputs("evaluate", params, layout) == [proj / "held.txt"]
    keys = {s: cache_key(s, params, layout) for s in ("prepare", "evaluate")}
    (proj / "texts/a.txt").write_text("edited text", encoding="utf-8")
    (proj / "held.txt").write_text("held out, edited", encoding="utf-8")
    assert all(cache_key(s, params, layout) != keys[s] for s in keys)


def test_an_unchanged_file_is_hashed_once_and_any_change_is_seen(tmp_path, monkeypatch):
    """The flow keys, checks and records each stage on its inputs: a process reads an unchanged
    file once; a rewrite of the same size and modification time (its change time moves) or a file
    written just now (racy: a rewrite could keep every time) is read again."""
    import hashlib
    import os
    import time

    from lmcore.core import io

    fresh = tmp_path / "fresh.bin"
    fresh.write_bytes(b"cccc")
    assert io.sha256_file(fresh) == hashlib.sha256(b"cccc").hexdigest()
    st = os.stat(fresh)
    assert (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) not in io._HASHED
    monkeypatch.setattr(io, "RACY_NS", 0)  # as if each file had been written long before
    f = tmp_path / "shard.bin"
    f.write_bytes(b"aaaa")
    old = 1_000_000_000
    os.utime(f, ns=(old, old))
    assert io.sha256_file(f) == hashlib.sha256(b"aaaa").hexdigest()
    st = os.stat(f)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    assert io._HASHED[key] == hashlib.sha256(b"aaaa").hexdigest()  # kept: read once
    io._HASHED[key] = "kept"
    assert io.sha256_file(f) == "kept"  # ... and not read again while unchanged
    time.sleep(0.1)  # past the change time's granularity: within it, this is the racy case
    f.write_bytes(b"bbbb")
    os.utime(f, ns=(old, old))  # same size, same modification time: the change time differs
    assert io.sha256_file(f) == hashlib.sha256(b"bbbb").hexdigest()


def test_a_local_task_without_a_usable_training_example_stops_prepare_naming_its_file(tmp_path):
    """It said "done" with 0 examples, and fine-tuning failed later naming the derived file."""
    (tmp_path / "a.txt").write_text("A document of the corpus, long enough to be kept by every filter.\n")
    (tmp_path / "reviews.jsonl").write_text('{"text": "fine", "label": null}\n')
    cfg = PrepareConfig(corpus=CorpusSource(kind="files", paths=[str(tmp_path / "a.txt")]),
                        tasks=TaskSource(tasks=["reviews"], local={"reviews": {
                            "files": {"train": "reviews.jsonl"}, "label_names": ["neg", "pos"]}}))
    with pytest.raises(StageError, match=r"task reviews: no usable training example in "
                                         r"prepare.tasks.local.reviews.files.train = 'reviews.jsonl'"):
        prepare(cfg, tmp_path / "raw", tmp_path / "m.json", TrackingConfig(enabled=False), root=tmp_path)
    assert not (tmp_path / "raw").exists()


@pytest.mark.parametrize("given", ["file", "held_out"])
def test_a_local_task_without_a_validation_example_stops_prepare_naming_the_setting(tmp_path, given):
    """prepare wrote an empty validation.jsonl and said "done"; fine-tuning failed later."""
    (tmp_path / "a.txt").write_text("A document of the corpus, long enough to be kept by every filter.\n")
    (tmp_path / "train.jsonl").write_text("".join(f'{{"text": "review {i}", "label": {i % 2}}}\n' for i in range(4)))
    (tmp_path / "dev.jsonl").write_text('{"text": "", "label": 1}\n')  # no text: skipped as malformed
    files = {"train": "train.jsonl"} | ({"validation": "dev.jsonl"} if given == "file" else {})
    cfg = PrepareConfig(corpus=CorpusSource(kind="files", paths=[str(tmp_path / "a.txt")]),
                        tasks=TaskSource(tasks=["reviews"], validation_fraction=0.001, local={"reviews": {
                            "files": files, "label_names": ["neg", "pos"]}}))
    expected = ("prepare.tasks.local.reviews.files.validation = 'dev.jsonl'" if given == "file" else
                "the 4 training example(s) of prepare.tasks.local.reviews held out at prepare.tasks.validation_fraction")
    with pytest.raises(StageError, match=r"task reviews: no usable validation example in " + re.escape(expected)):
        prepare(cfg, tmp_path / "raw", tmp_path / "m.json", TrackingConfig(enabled=False), root=tmp_path)
    assert not (tmp_path / "raw").exists()


def test_corpus_shards_are_cut_by_bytes_not_characters(tmp_path):
    from lmcore.data.prepare import write_shards

    docs = [{"text": "語" * 1000} for _ in range(40)]  # 3 bytes a character
    paths = write_shards(iter(docs), tmp_path, 10_000)
    assert all(p.stat().st_size < 10_000 + 3_100 for p in paths) and len(paths) == 10  # 4 documents each


def test_a_folder_replacement_interrupted_between_its_renames_keeps_the_old_folder(tmp_path, monkeypatch):
    """The old folder was moved aside, then a signal before the new one's rename deleted both."""
    import os

    from lmcore.core import io

    out = tmp_path / "runs/final"
    out.mkdir(parents=True)
    (out / "model.bin").write_text("old")
    real = os.replace

    def interrupted(src, dst):
        if Path(dst) == out and Path(src).name == "final":  # the new folder's rename: Ctrl-C arrives just then
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(io.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with io.atomic_path(out) as tmp:
            tmp.mkdir()
            (tmp / "model.bin").write_text("new")
    assert (out / "model.bin").read_text() == "old"
    assert [p.name for p in out.parent.iterdir()] == ["final"]  # no leftovers


def test_the_flow_records_the_key_its_stage_started_from(tmp_path):
    """The record was keyed on the inputs at the end of the stage: a file changed while it ran
    made the old outputs stand for the new inputs, and the next run took them from the cache."""
    from lmcore.core.layout import Layout
    from lmcore.stages import cache_key, outputs_current, record_produced

    proj = tmp_path / "proj"
    (proj / "texts").mkdir(parents=True)
    (proj / "texts/a.txt").write_text("first text", encoding="utf-8")
    params = Params.model_validate({"prepare": {"corpus": {"kind": "files", "paths": ["texts/a.txt"]}}})
    layout = Layout(proj)
    started = cache_key("prepare", params, layout)
    (proj / "data/raw/corpus").mkdir(parents=True)  # the outputs the stage wrote from "first text"
    (proj / "data/raw/corpus/00000.jsonl").write_text('{"text": "first text"}\n', encoding="utf-8")
    (proj / "texts/a.txt").write_text("edited while it ran", encoding="utf-8")
    record_produced("prepare", params, layout, key=started)
    assert not outputs_current("prepare", params, layout)  # the edited text is not what they hold
    (proj / "texts/a.txt").write_text("first text", encoding="utf-8")
    assert outputs_current("prepare", params, layout)


def test_a_write_removes_what_a_killed_writer_of_the_same_output_left(tmp_path):
    """A stage killed inside atomic_path (SIGKILL, out of memory) left its temporary folder, a
    whole checkpoint beside the output, for ever. The next write of that output removes it; a
    live writer's folder and another machine's (a shared file system) are left alone."""
    import os
    import subprocess
    import sys

    from lmcore.core import io

    out = tmp_path / "runs/final"
    killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    killed.kill()
    killed.wait()
    here = io._writer().rsplit("-", 1)[0]  # host and process-id namespace
    host, namespace = here.rsplit("-", 1)
    stale = tmp_path / f"runs/.final.{here}-{killed.pid}.abc_123.tmp"
    live = tmp_path / f"runs/.final.{here}-{os.getppid()}.def456.tmp"
    elsewhere = tmp_path / f"runs/.final.{host}x-{namespace}-{killed.pid}.ghi789.tmp"
    other_container = tmp_path / f"runs/.final.{host}-{int(namespace) + 1}-{killed.pid}.mno345.tmp"
    other_output = tmp_path / f"runs/.final2.{here}-{killed.pid}.jkl012.tmp"
    for d in (stale, live, elsewhere, other_container, other_output):
        (d / "final").mkdir(parents=True)
        (d / "final/model.bin").write_text("partial")
    io.write_text(out, "done")
    assert out.read_text() == "done"
    assert not stale.exists()
    assert live.exists() and elsewhere.exists() and other_container.exists() and other_output.exists()
