"""GLUE: the registry, the three loaders (original GLUE layout with its quirks, local files with a
column mapping, the hub), metrics and scores, leaderboard files, and fine-tuning one task."""

from __future__ import annotations

import json
import math
import random
import re
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import make_text

from lmcore import config
from lmcore.config import ConfigError, FinetuneConfig, LocalTask, TaskSource, TrackingConfig
from lmcore.core.errors import StageError
from lmcore.core.io import write_json, write_jsonl
from lmcore.data import glue
from lmcore.data.prepare import task_splits

OFF = TrackingConfig(enabled=False)


def _write(path: Path, text: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())


def _tsv(*rows: list[str], end: str = "\n") -> str:
    return "\n".join("\t".join(r) for r in rows) + end


MNLI_TRAIN = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
              "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]
MNLI_DEV = MNLI_TRAIN[:11] + ["label2", "label3", "label4", "label5", "gold_label"]
MNLI_TEST = MNLI_TRAIN[:10]
STSB = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"]
BOM = "\ufeff"


def mnli_row(i: int, a: str, b: str, label: str | None, dev: bool = False) -> list[str]:
    parse = '( ( "He ) ran )'  # the parse columns hold unbalanced quotes
    row = [str(i), "31193", f"{i}n", "fiction", parse, parse, parse, parse, a, b]
    if label is None:
        return row
    return row + ([label] * 5 if dev else [label]) + [label]


def write_glue_dir(root: Path) -> Path:
    """The nine tasks and AX in the original GLUE layout, a few rows each, with the real quirks."""
    g = root / "glue"
    # CoLA: no header in train/dev, unbalanced quotes, a last line without its newline
    _write(g / "CoLA/train.tsv", _tsv(["gj04", "1", "", 'The "quote never closes.'],
                                      ["gj04", "0", "*", "Bad sentence here ."],
                                      ["cj99", "1", "", "It rained."], end=""))
    _write(g / "CoLA/dev.tsv", _tsv(["gj04", "1", "", "Fine here."], ["w_80", "0", "*", 'Him "went.']))
    _write(g / "CoLA/test.tsv", _tsv(["index", "sentence"], ["0", "Bill whistled."], ["1", 'An "odd one.']))
    # SST-2: a byte-order mark before the header; quotes inside sentences
    _write(g / "SST-2/train.tsv", BOM + _tsv(["sentence", "label"], ['it \'s " good ', "1"], ["dull , flat ", "0"],
                                             ["a joy ", "1"]))
    _write(g / "SST-2/dev.tsv", _tsv(["sentence", "label"], ["charming ", "1"], ["bleak ", "0"]))
    _write(g / "SST-2/test.tsv", _tsv(["index", "sentence"], ["0", "uneasy mishmash ."], ["1", "a \" film ."]))
    # MRPC: the header starts with a byte-order mark (as in the distributed files)
    mrpc = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
    _write(g / "MRPC/train.tsv", BOM + _tsv(mrpc,
                                            ["1", "702876", "702977", "Amrozi accused his brother .",
                                             "Referring to him , Amrozi accused ."],
                                            ["0", "2108705", "2108831", "Yucaipa owned Dominick 's .",
                                             "Yucaipa bought \" Dominick 's ."]))
    _write(g / "MRPC/dev.tsv", BOM + _tsv(mrpc, ["1", "1", "2", "He said .", "He stated ."],
                                          ["0", "3", "4", "Yes .", "No ."]))
    _write(g / "MRPC/test.tsv", BOM + _tsv(["index", *mrpc[1:]],
                                           ["0", "1089874", "1089925", "PCCW 's chief .", "Mr Wong , chief ."]))
    # STS-B: ten columns, the sentences at 7 and 8, the score last; CRLF line ends; test without score
    _write(g / "STS-B/train.tsv", _tsv(STSB, ["0", "main-captions", "MSRvid", "2012test", "0001", "none", "none",
                                              "A plane is taking off.", "An air plane is taking off.", "5.000"],
                                       ["1", "main-news", "MSRpar", "2012test", "0002", "none", "none", 'A "man.',
                                        "A woman.", "0.500"]).replace("\n", "\r\n"))
    _write(g / "STS-B/dev.tsv", _tsv(STSB, ["0", "main-captions", "MSRvid", "2012test", "0000", "none", "none",
                                            "A man is dancing.", "A man dances.", "4.750"],
                                     ["1", "main-captions", "MSRvid", "2012test", "0003", "none", "none",
                                      "A cat.", "A dog.", "1.200"]))
    _write(g / "STS-B/test.tsv", _tsv(STSB[:-1], ["0", "main-captions", "MSRvid", "2012test", "0024", "none", "none",
                                                  "A girl styles her hair.", "A girl brushes her hair."]))
    # QQP: malformed rows (a question broken over two lines; a row with too many fields)
    qqp = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
    _write(g / "QQP/train.tsv", _tsv(qqp, ["5", "1", "2", "How do I learn?", "How to learn?", "1"],
                                     ["6", "3", "4", "A question broken"], ["over two lines?", "Other?", "0"],
                                     ["7", "5", "6", "Why \" not?", "Why?", "0"],
                                     ["8", "7", "8", "a", "b", "1", "extra"]))
    _write(g / "QQP/dev.tsv", _tsv(qqp, ["40", "1", "2", "Is it?", "Is it so?", "1"], ["41", "3", "4", "A?", "B?", "0"],
                                   ["42", "5", "6", "no label?", "none", ""]))
    _write(g / "QQP/test.tsv", _tsv(["id", "question1", "question2"], ["0", "What is it?", "What's that?"]))
    # MNLI: 12 columns in train, 16 in dev, 10 in test; matched and mismatched; no final newline
    _write(g / "MNLI/train.tsv", _tsv(MNLI_TRAIN, mnli_row(0, "He ran.", "He moved.", "entailment"),
                                      mnli_row(1, "It is red.", "It is blue.", "contradiction"),
                                      mnli_row(2, "She sang.", "She was happy.", "neutral")))
    _write(g / "MNLI/dev_matched.tsv", _tsv(MNLI_DEV, mnli_row(3, "A cat sat.", "An animal sat.", "entailment", True),
                                            mnli_row(4, "It is day.", "It is night.", "contradiction", True)))
    _write(g / "MNLI/dev_mismatched.tsv", _tsv(MNLI_DEV,
                                               mnli_row(5, "The letter came.", "Mail arrived.", "entailment", True),
                                               mnli_row(6, "He left.", "He stayed late.", "neutral", True), end=""))
    _write(g / "MNLI/test_matched.tsv", _tsv(MNLI_TEST, mnli_row(0, "Dogs bark.", "Animals make noise.", None)))
    _write(g / "MNLI/test_mismatched.tsv", _tsv(MNLI_TEST, mnli_row(0, "Rain fell.", "It was dry.", None),
                                                mnli_row(1, "Two.", "Three.", None)))
    # QNLI, RTE, WNLI: index first; QNLI and RTE spell their labels
    _write(g / "QNLI/train.tsv", _tsv(["index", "question", "sentence", "label"],
                                      ["0", 'What "came first?', "The egg came first.", "entailment"],
                                      ["1", "Who?", "Nobody knows where.", "not_entailment"]))
    _write(g / "QNLI/dev.tsv", _tsv(["index", "question", "sentence", "label"],
                                    ["0", "When?", "At noon.", "entailment"]))
    _write(g / "QNLI/test.tsv", _tsv(["index", "question", "sentence"], ["0", "Where?", "Here."]))
    _write(g / "RTE/train.tsv", _tsv(["index", "sentence1", "sentence2", "label"],
                                     ["0", "No weapons were found.", "Weapons were found.", "not_entailment"],
                                     ["1", "A man sleeps.", "A person sleeps.", "entailment"], end=""))
    _write(g / "RTE/dev.tsv", _tsv(["index", "sentence1", "sentence2", "label"],
                                   ["0", "Dana won.", "Dana lost.", "not_entailment"]))
    _write(g / "RTE/test.tsv", _tsv(["index", "sentence1", "sentence2"], ["0", "Mao was born.", "Mao died."]))
    _write(g / "WNLI/train.tsv", BOM + _tsv(["index", "sentence1", "sentence2", "label"],
                                            ["0", "I stuck a pin through a carrot.", "The carrot had a hole.", "1"],
                                            ["1", "John couldn't see.", "John was tall.", "0"]))
    _write(g / "WNLI/dev.tsv", _tsv(["index", "sentence1", "sentence2", "label"],
                                    ["0", "The drain is clogged.", "It is.", "1"]))
    _write(g / "WNLI/test.tsv", _tsv(["index", "sentence1", "sentence2"], ["0", "Maude said.", "Maude spoke."]))
    # AX, the diagnostic: where download_glue_data.py puts it
    _write(g / "diagnostic/diagnostic.tsv", _tsv(["index", "sentence1", "sentence2"],
                                                 ["0", 'The cat sat on the "mat.', "The cat did not sit."],
                                                 ["1", "Some dogs bark.", "All dogs bark."]))
    return g


# (split -> [(idx, text_a, text_b, label)], malformed rows skipped) for every task
EXPECTED = {
    "cola": ({"train": [(0, 'The "quote never closes.', None, 1), (1, "Bad sentence here .", None, 0),
                        (2, "It rained.", None, 1)],
              "validation": [(0, "Fine here.", None, 1), (1, 'Him "went.', None, 0)],
              "test": [(0, "Bill whistled.", None, None), (1, 'An "odd one.', None, None)]}, 0),
    "sst2": ({"train": [(0, 'it \'s " good ', None, 1), (1, "dull , flat ", None, 0), (2, "a joy ", None, 1)],
              "validation": [(0, "charming ", None, 1), (1, "bleak ", None, 0)],
              "test": [(0, "uneasy mishmash .", None, None), (1, 'a " film .', None, None)]}, 0),
    "mrpc": ({"train": [(0, "Amrozi accused his brother .", "Referring to him , Amrozi accused .", 1),
                        (1, "Yucaipa owned Dominick 's .", "Yucaipa bought \" Dominick 's .", 0)],
              "validation": [(0, "He said .", "He stated .", 1), (1, "Yes .", "No .", 0)],
              "test": [(0, "PCCW 's chief .", "Mr Wong , chief .", None)]}, 0),
    "stsb": ({"train": [(0, "A plane is taking off.", "An air plane is taking off.", 5.0),
                        (1, 'A "man.', "A woman.", 0.5)],
              "validation": [(0, "A man is dancing.", "A man dances.", 4.75), (1, "A cat.", "A dog.", 1.2)],
              "test": [(0, "A girl styles her hair.", "A girl brushes her hair.", None)]}, 0),
    "qqp": ({"train": [(5, "How do I learn?", "How to learn?", 1), (7, 'Why " not?', "Why?", 0)],
             "validation": [(40, "Is it?", "Is it so?", 1), (41, "A?", "B?", 0)],
             "test": [(0, "What is it?", "What's that?", None)]}, 4),  # 3 malformed in train, 1 unlabelled in dev
    "mnli": ({"train": [(0, "He ran.", "He moved.", 0), (1, "It is red.", "It is blue.", 2),
                        (2, "She sang.", "She was happy.", 1)],
              "validation_matched": [(3, "A cat sat.", "An animal sat.", 0), (4, "It is day.", "It is night.", 2)],
              "validation_mismatched": [(5, "The letter came.", "Mail arrived.", 0),
                                        (6, "He left.", "He stayed late.", 1)],
              "test_matched": [(0, "Dogs bark.", "Animals make noise.", None)],
              "test_mismatched": [(0, "Rain fell.", "It was dry.", None), (1, "Two.", "Three.", None)],
              "test_ax": [(0, 'The cat sat on the "mat.', "The cat did not sit.", None),
                          (1, "Some dogs bark.", "All dogs bark.", None)]}, 0),
    "qnli": ({"train": [(0, 'What "came first?', "The egg came first.", 0), (1, "Who?", "Nobody knows where.", 1)],
              "validation": [(0, "When?", "At noon.", 0)], "test": [(0, "Where?", "Here.", None)]}, 0),
    "rte": ({"train": [(0, "No weapons were found.", "Weapons were found.", 1),
                       (1, "A man sleeps.", "A person sleeps.", 0)],
             "validation": [(0, "Dana won.", "Dana lost.", 1)], "test": [(0, "Mao was born.", "Mao died.", None)]}, 0),
    "wnli": ({"train": [(0, "I stuck a pin through a carrot.", "The carrot had a hole.", 1),
                        (1, "John couldn't see.", "John was tall.", 0)],
              "validation": [(0, "The drain is clogged.", "It is.", 1)],
              "test": [(0, "Maude said.", "Maude spoke.", None)]}, 0),
}


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory) -> Path:
    return write_glue_dir(tmp_path_factory.mktemp("data"))


def _tuples(rows):
    return [(r["idx"], r["text_a"], r["text_b"], r["label"]) for r in rows]


# --------------------------------------------------------------------------------------------- the registry


def test_registry_holds_the_nine_tasks_and_ax():
    assert glue.GLUE_TASKS == ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")
    assert set(glue.GLUE_TASKS) | {"ax", "rotten_tomatoes"} == set(glue.TASKS)
    t = glue.TASKS
    assert t["cola"].metrics == ("matthews",) and not t["cola"].pair and t["cola"].labels == ("0", "1")
    assert t["stsb"].is_regression and t["stsb"].num_labels == 1 and t["stsb"].metrics == ("pearson", "spearman")
    assert t["mrpc"].metrics == t["qqp"].metrics == ("f1", "accuracy")
    assert all(t[n].metrics == ("accuracy",) for n in ("sst2", "qnli", "rte", "wnli", "mnli"))
    assert t["mnli"].labels == ("entailment", "neutral", "contradiction") and t["mnli"].num_labels == 3
    assert t["qnli"].labels == t["rte"].labels == ("entailment", "not_entailment")
    assert t["mnli"].validation_splits == ("validation_matched", "validation_mismatched")
    assert t["ax"].metrics == () and t["ax"].validation_splits == () and t["ax"].labels == t["mnli"].labels
    assert [stem for task in glue.GLUE_TASKS for _, stem in t[task].submissions] == [
        "CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI-m", "MNLI-mm", "AX", "QNLI", "RTE", "WNLI"]
    assert set(glue.LEADERBOARD_FILES) == {stem for task in glue.GLUE_TASKS for _, stem in t[task].submissions}
    assert glue.TaskSpec.from_dict(json.loads(json.dumps(t["mnli"].to_dict()))) == t["mnli"]


# --------------------------------------------------------------------------------------------- the GLUE layout


@pytest.mark.parametrize("task", list(EXPECTED))
def test_glue_layout_reads_every_task_with_its_quirks(glue_dir, task):
    expected, malformed = EXPECTED[task]
    spec, splits, skipped = task_splits(TaskSource(kind="glue_dir", glue_dir=str(glue_dir), tasks=[task]), task)
    assert spec == glue.TASKS[task]
    assert list(splits) == list(expected)
    for split, rows in expected.items():
        assert _tuples(splits[split]) == rows, (task, split)
    assert skipped == malformed


def test_qqp_malformed_rows_are_skipped_and_counted_per_file(glue_dir):
    rows, skipped = glue.read_glue_split(glue.TASKS["qqp"], glue_dir, "train")
    assert skipped == 3 and [r["idx"] for r in rows] == [5, 7]
    rows, skipped = glue.read_glue_split(glue.TASKS["qqp"], glue_dir, "validation")
    assert skipped == 1 and len(rows) == 2


def test_ax_is_found_as_published_too_and_is_optional(tmp_path, glue_dir):
    g = tmp_path / "g"
    _write(g / "MNLI/train.tsv", (glue_dir / "MNLI/train.tsv").read_text())
    for name in ("dev_matched", "dev_mismatched"):
        _write(g / f"MNLI/{name}.tsv", (glue_dir / f"MNLI/{name}.tsv").read_text())
    src = TaskSource(kind="glue_dir", glue_dir=str(g), tasks=["mnli"])
    _, splits, _ = task_splits(src, "mnli")  # no test files, no AX: the labelled splits only
    assert list(splits) == ["train", "validation_matched", "validation_mismatched"]
    _write(g / "AX.tsv", BOM + _tsv(["index", "sentence1", "sentence2"], ["0", "A.", "B."]))
    _, splits, _ = task_splits(src, "mnli")
    assert _tuples(splits["test_ax"]) == [(0, "A.", "B.", None)]
    _, splits, _ = task_splits(src.model_copy(update={"ax": False}), "mnli")
    assert "test_ax" not in splits


def test_a_missing_glue_column_names_the_file(tmp_path):
    _write(tmp_path / "RTE/train.tsv", _tsv(["index", "premise", "hypothesis", "label"], ["0", "a", "b", "entailment"]))
    with pytest.raises(StageError, match=r"RTE/train.tsv: header lacks column\(s\) \['sentence1', 'sentence2'\]"):
        glue.read_glue_split(glue.TASKS["rte"], tmp_path, "train")


# --------------------------------------------------------------------------------------------- local files


def _local(tmp_path: Path, name: str, **task) -> TaskSource:
    return TaskSource(kind="rotten_tomatoes", tasks=[name], local={name: LocalTask(**task)})


def test_local_jsonl_with_a_column_mapping_and_label_names(tmp_path):
    rows = [{"review": "great film", "stars": "pos", "id": 10}, {"review": "awful", "stars": "neg", "id": 11},
            {"review": "fine", "stars": 1, "id": 12}, {"review": None, "stars": "pos", "id": 13}]
    _write(tmp_path / "train.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    _write(tmp_path / "dev.jsonl", json.dumps({"review": "meh", "stars": "neg", "id": 20}))  # no final newline
    _write(tmp_path / "test.jsonl", json.dumps({"review": "unseen", "id": 30}) + "\n")
    src = _local(tmp_path, "reviews", label_names=["neg", "pos"], metrics=["accuracy", "f1"],
                 files={"train": str(tmp_path / "train.jsonl"), "validation": str(tmp_path / "dev.jsonl"),
                        "test": str(tmp_path / "test.jsonl")},
                 columns={"text_a": "review", "label": "stars", "idx": "id"})
    spec, splits, skipped = task_splits(src, "reviews")
    assert spec.labels == ("neg", "pos") and spec.metrics == ("accuracy", "f1") and not spec.pair
    assert spec.submissions == (("test", "reviews"),) and not spec.is_glue
    assert _tuples(splits["train"]) == [(10, "great film", None, 1), (11, "awful", None, 0), (12, "fine", None, 1)]
    assert _tuples(splits["validation"]) == [(20, "meh", None, 0)]
    assert _tuples(splits["test"]) == [(30, "unseen", None, None)]
    assert skipped == 1  # the row without text


def test_local_csv_with_quotes_bom_and_a_held_out_validation_split(tmp_path):
    lines = ["sent,score,extra"] + [f'"Sentence {i}, ""quoted""",{i % 5}.5,x' for i in range(200)]
    _write(tmp_path / "train.csv", BOM + "\n".join(lines))
    src = _local(tmp_path, "similarity", regression=True, files={"train": str(tmp_path / "train.csv")},
                 columns={"text_a": "sent", "label": "score"})
    spec, splits, _ = task_splits(src, "similarity")
    assert spec.is_regression and spec.metrics == ("pearson", "spearman")
    assert list(splits) == ["train", "validation"]
    assert len(splits["train"]) + len(splits["validation"]) == 200 and 5 <= len(splits["validation"]) <= 40
    first = (splits["train"] + splits["validation"])[0]
    assert first["text_a"].endswith(', "quoted"') and isinstance(first["label"], float)
    assert {r["idx"] for r in splits["train"] + splits["validation"]} == set(range(200))
    again = task_splits(src, "similarity")[1]
    assert again == splits  # the hold-out is a function of the text


def test_local_parquet_for_a_glue_task_keeps_the_registry_spec(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    def table(rows):
        return pa.table({k: [r[k] for r in rows] for k in rows[0]})

    pq.write_table(table([{"premise": "A man sleeps.", "hypothesis": "A person sleeps.", "label": 0, "idx": 0},
                          {"premise": "No.", "hypothesis": "Yes.", "label": 1, "idx": 1}]), tmp_path / "train.parquet")
    pq.write_table(table([{"premise": "Dana won.", "hypothesis": "Dana lost.", "label": 1, "idx": 0}]),
                   tmp_path / "validation.parquet")
    pq.write_table(table([{"premise": "Mao.", "hypothesis": "Mao died.", "label": -1, "idx": 7}]),
                   tmp_path / "test.parquet")
    src = _local(tmp_path, "rte", files={s: str(tmp_path / f"{s}.parquet") for s in ("train", "validation", "test")},
                 columns={"text_a": "premise", "text_b": "hypothesis", "label": "label", "idx": "idx"})
    spec, splits, skipped = task_splits(src, "rte")
    assert spec == glue.TASKS["rte"] and skipped == 0
    assert _tuples(splits["train"]) == [(0, "A man sleeps.", "A person sleeps.", 0), (1, "No.", "Yes.", 1)]
    assert _tuples(splits["test"]) == [(7, "Mao.", "Mao died.", None)]  # the -1 of a test split is no label


def test_local_tsv_reads_with_quoting_off(tmp_path):
    _write(tmp_path / "t.tsv", _tsv(["a", "b", "y"], ['He said "no', "ok", "entailment"], ["x", "y", "not_entailment"]))
    spec = glue.TASKS["qnli"]
    rows, _ = glue.read_local_split(spec, tmp_path / "t.tsv", {"text_a": "a", "text_b": "b", "label": "y"}, "train")
    assert _tuples(rows) == [(0, 'He said "no', "ok", 0), (1, "x", "y", 1)]


def test_two_class_labels_written_true_and_false_in_a_csv_are_read(tmp_path):
    """The docs promised true/false for two classes; only JSON and parquet booleans worked."""
    _write(tmp_path / "t.csv", "text,label\ngood,true\nbad,False\nmeh, TRUE \n")
    rows, _ = glue.read_local_split(glue.TASKS["sst2"], tmp_path / "t.csv", {"text_a": "text", "label": "label"}, "train")
    assert [r["label"] for r in rows] == [1, 0, 1]
    spec = glue.TASKS["mnli"]  # three classes: a boolean is no label
    _write(tmp_path / "m.csv", "a,b,label\nx,y,true\n")
    with pytest.raises(StageError, match=r"m.csv: line 2: column 'label' = 'true' is not a label"):
        glue.read_local_split(spec, tmp_path / "m.csv", {"text_a": "a", "text_b": "b", "label": "label"}, "train")


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_a_bad_column_mapping_names_the_file_and_the_column(tmp_path, fmt):
    rows = [{"text": "good", "label": 1}, {"text": "bad", "label": 0}]
    path = tmp_path / f"train.{fmt}"
    if fmt == "jsonl":
        _write(path, "\n".join(json.dumps(r) for r in rows))
    elif fmt == "csv":
        _write(path, "text,label\ngood,1\nbad,0\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": ["good", "bad"], "label": [1, 0]}), path)
    spec = glue.TASKS["sst2"]
    with pytest.raises(StageError) as e:
        glue.read_local_split(spec, path, {"text_a": "sentence", "label": "label"}, "train")
    msg = str(e.value)
    assert str(path) in msg and "no column 'sentence'" in msg and "columns.text_a" in msg and "text, label" in msg


def test_a_label_outside_the_task_names_file_line_and_allowed_values(tmp_path):
    _write(tmp_path / "train.jsonl", '{"text": "a", "label": "positive"}\n{"text": "b", "label": "maybe"}\n')
    spec = glue.custom_spec("mood", ["negative", "positive"], None, False)
    with pytest.raises(StageError, match=r"train.jsonl: line 2: column 'label' = 'maybe' is not a label .*negative"):
        glue.read_local_split(spec, tmp_path / "train.jsonl", {"text_a": "text", "label": "label"}, "train")


def test_a_superscript_digit_is_not_a_label_id_nor_an_example_id(tmp_path):
    """'¹'.isdigit() is true but int('¹') raises: a bare ValueError reached the user."""
    _write(tmp_path / "train.jsonl", '{"text": "a", "label": "1", "id": "7"}\n{"text": "b", "label": "\u00b9"}\n')
    spec = glue.custom_spec("mood", ["negative", "positive"], None, False)
    with pytest.raises(StageError, match=r"train.jsonl: line 2: column 'label' = '\u00b9' is not a label"):
        glue.read_local_split(spec, tmp_path / "train.jsonl", {"text_a": "text", "label": "label"}, "train")


def test_local_task_definitions_are_validated(tmp_path):
    def check(tasks: dict, match: str) -> None:
        data = {"prepare": {"tasks": {"tasks": list(tasks), "local": tasks}},
                "finetune": {"tasks": {name: {} for name in tasks}}}
        with pytest.raises(ConfigError, match=match):
            config.from_dict(data)

    check({"mood": {"files": {"train": "a.jsonl"}}}, "label_names.*or regression")
    check({"mood": {"files": {"validation": "a.jsonl"}}}, "needs a 'train' file")
    check({"mood": {"files": {"train": "a"}, "regression": True, "metrics": ["accuracy"]}},
          "does not apply to a regression")
    check({"sst2": {"files": {"train": "a"}, "label_names": ["x", "y"]}}, "GLUE task with fixed labels")
    check({"rte": {"files": {"train": "a"}}}, r"columns.text_b is needed")
    check({"mnli": {"files": {"train": "a", "validation": "b"}, "columns": {"text_b": "h"}}},
          r"split\(s\) \['validation'\] do not belong to task mnli")
    check({"mood": {"files": {"train": "a"}, "label_names": ["x", "y"], "columns": {"txt": "t"}}},
          "unknown key 'prepare.tasks.local.mood.columns.txt'")


def test_the_hub_offline_fails_at_once_with_advice():
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(StageError) as e:
        task_splits(TaskSource(kind="hub", tasks=["cola"]), "cola")
    msg = str(e.value)
    assert "nyu-mll/glue/cola" in msg and "glue_dir" in msg and "prepare.tasks.local" in msg


# --------------------------------------------------------------------------------------------- params


def test_task_list_and_per_task_hyperparameters_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="ax .* is predicted with the MNLI model"):
        config.from_dict({"prepare": {"tasks": {"kind": "hub", "tasks": ["ax"]}}})
    with pytest.raises(ConfigError, match="unknown task 'colla'"):
        config.from_dict({"prepare": {"tasks": {"kind": "hub", "tasks": ["colla"]}}})
    with pytest.raises(ConfigError, match="needs prepare.tasks.kind glue_dir or hub"):
        config.from_dict({"prepare": {"tasks": {"tasks": ["cola"]}}, "finetune": {"tasks": {"cola": {}}}})
    with pytest.raises(ConfigError, match=r"params.yaml: finetune.tasks has no entry for cola .*'cola: \{\}'"):
        config.from_dict({"prepare": {"tasks": {"kind": "hub", "tasks": ["cola"]}}})
    with pytest.raises(ConfigError, match=r"finetune.tasks.cola.lr = -1 is invalid \(Input should be greater than 0"):
        config.from_dict({"finetune": {"tasks": {"cola": {"lr": -1}}}})
    with pytest.raises(ConfigError, match="unknown key 'finetune.tasks.cola.learning_rate'"):
        config.from_dict({"finetune": {"tasks": {"cola": {"learning_rate": 1e-4}}}})
    cfg = config.from_dict({"finetune": {"defaults": {"lr": 1e-3, "epochs": 4},
                                         "tasks": {"rotten_tomatoes": None, "cola": {"epochs": 3}}}}).finetune
    assert cfg.for_task("cola").epochs == 3 and cfg.for_task("cola").lr == 1e-3
    assert cfg.for_task("rotten_tomatoes") == cfg.defaults == cfg.for_task("not-listed")


def test_repo_params_have_an_entry_for_every_glue_task():
    params = yaml.safe_load(Path(__file__).resolve().parent.parent.joinpath("params.yaml").read_text())
    assert set(glue.GLUE_TASKS) | {"rotten_tomatoes"} <= set(params["finetune"]["tasks"])


# --------------------------------------------------------------------------------------------- metrics and scores


def test_metrics_are_the_official_ones_computed_by_sklearn_and_scipy():
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import f1_score, matthews_corrcoef

    p, y = [1, 0, 1, 1, 0, 1], [1, 0, 0, 1, 1, 1]
    assert glue.compute_metrics(glue.TASKS["cola"], p, y) == {"matthews": pytest.approx(matthews_corrcoef(y, p))}
    assert glue.compute_metrics(glue.TASKS["qqp"], p, y) == {"f1": pytest.approx(f1_score(y, p)), "accuracy": 4 / 6}
    a, b = [0.1, 2.0, 3.5, 4.9], [0.0, 2.5, 3.0, 5.0]
    stsb = glue.compute_metrics(glue.TASKS["stsb"], a, b)
    assert stsb == {"pearson": pytest.approx(pearsonr(a, b)[0]), "spearman": pytest.approx(spearmanr(a, b)[0])}
    assert glue.compute_metrics(glue.TASKS["stsb"], [2.0] * 4, b) == {"pearson": 0.0, "spearman": 0.0}  # constant
    # a diverged regression model is NaN, not the constant predictor's 0
    nan = glue.compute_metrics(glue.TASKS["stsb"], [float("nan")] * 4, b)
    assert set(nan) == {"pearson", "spearman"} and all(math.isnan(v) for v in nan.values())
    assert glue.compute_metrics(glue.TASKS["mnli"], [0, 1, 2, 2], [0, 1, 2, 0]) == {"accuracy": 0.75}


def test_task_scores_average_two_numbers_and_mnli_matched_with_mismatched():
    mnli = glue.TASKS["mnli"]
    m = glue.evaluate_splits(mnli, {"validation_matched": [0, 1, 2, 2], "validation_mismatched": [0, 0]},
                             {"validation_matched": [0, 1, 2, 0], "validation_mismatched": [0, 1]})
    assert m == {"accuracy_matched": 0.75, "accuracy_mismatched": 0.5}
    assert glue.metric_keys(mnli) == ["accuracy_matched", "accuracy_mismatched"]
    assert glue.task_score(mnli, m) == pytest.approx(0.625)
    assert glue.task_score(glue.TASKS["mrpc"], {"f1": 0.8, "accuracy": 0.7}) == pytest.approx(0.75)
    assert glue.task_score(glue.TASKS["stsb"], {"pearson": 0.9, "spearman": 0.8}) == pytest.approx(0.85)
    assert glue.task_score(glue.TASKS["cola"], {"matthews": 0.3}) == 0.3
    scores = {"cola": 0.3, "mrpc": 0.75, "stsb": 0.85, "mnli": 0.625, "rotten_tomatoes": 0.99}
    assert glue.glue_score(scores) == pytest.approx((0.3 + 0.75 + 0.85 + 0.625) / 4)  # non-GLUE tasks do not count
    assert glue.glue_score({"rotten_tomatoes": 0.9}) is None


def test_majority_baseline():
    assert glue.majority_baseline(glue.TASKS["sst2"], [1, 1, 0], [1, 0, 0, 0]) == {"accuracy": 0.25}
    assert glue.majority_baseline(glue.TASKS["stsb"], [1.0, 3.0], [0.0, 5.0]) == {"pearson": 0.0, "spearman": 0.0}


# --------------------------------------------------------------------------------------------- leaderboard files


def test_prediction_files_spell_labels_as_the_leaderboard_expects():
    assert glue.submission_tsv(glue.TASKS["mnli"], [0, 1, 2], [0, 1, 2]) == \
        "index\tprediction\n0\tentailment\n1\tneutral\n2\tcontradiction\n"
    assert glue.submission_tsv(glue.TASKS["rte"], [3], [1]) == "index\tprediction\n3\tnot_entailment\n"
    assert glue.submission_tsv(glue.TASKS["qnli"], [0], [0]) == "index\tprediction\n0\tentailment\n"
    for task in ("cola", "sst2", "mrpc", "qqp", "wnli"):
        assert glue.submission_tsv(glue.TASKS[task], [0, 1], [1, 0]) == "index\tprediction\n0\t1\n1\t0\n"
    assert glue.submission_tsv(glue.TASKS["stsb"], [0, 1, 2], [-0.3, 2.71828, 5.6]) == \
        "index\tprediction\n0\t0.000\n1\t2.718\n2\t5.000\n"  # clipped to 0-5


def test_the_submission_zip_holds_the_glue_files_at_the_top_in_order(tmp_path):
    files = []
    for name in ("WNLI", "AX", "CoLA", "MNLI-mm", "MNLI-m", "reviews"):
        files.append(tmp_path / "in" / f"{name}.tsv")
        _write(files[-1], f"index\tprediction\n0\t{name}\n")
    names = glue.write_submission_zip(files, tmp_path / "out/glue_submission.zip")
    assert names == ["CoLA.tsv", "MNLI-m.tsv", "MNLI-mm.tsv", "WNLI.tsv", "AX.tsv"]  # not reviews.tsv
    with zipfile.ZipFile(tmp_path / "out/glue_submission.zip") as z:
        assert z.namelist() == names
        assert z.read("AX.tsv").decode() == "index\tprediction\n0\tAX\n"
    first = (tmp_path / "out/glue_submission.zip").read_bytes()
    glue.write_submission_zip(files, tmp_path / "out/glue_submission.zip")
    assert (tmp_path / "out/glue_submission.zip").read_bytes() == first  # reproducible bytes
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["glue_submission.zip"]  # atomic: no leftovers
    with pytest.raises(StageError, match="no GLUE leaderboard"):
        glue.write_submission_zip(files[-1:], tmp_path / "none.zip")


# --------------------------------------------------------------------------------------------- fine-tuning


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    """A tiny tokenizer and a tiny random decoder, saved as the tokenizer and pretrain stages do."""
    import torch

    from lmcore.config import TokenizerConfig
    from lmcore.data.tokenizer import save as save_tokenizer
    from lmcore.data.tokenizer import train
    from lmcore.model.decoder import Decoder, DecoderConfig
    from lmcore.model.folder import save_decoder

    root = tmp_path_factory.mktemp("backbone")
    cfg = TokenizerConfig(vocab_size=300)
    rng = random.Random(0)
    save_tokenizer(train(cfg, [make_text(rng, 80) for _ in range(20)]), cfg, root / "tokenizer")
    torch.manual_seed(0)
    save_decoder(Decoder(DecoderConfig(vocab_size=300, n_layer=1, n_head=2, n_embd=32, block_size=32)), root / "pretrained")
    return root


def _prepare(glue_dir: Path, raw: Path, task: str) -> Path:
    spec, splits, _ = task_splits(TaskSource(kind="glue_dir", glue_dir=str(glue_dir), tasks=[task]), task)
    for split, rows in splits.items():
        write_jsonl(raw / task / f"{split}.jsonl", rows)
    write_json(raw / task / "task.json", spec.to_dict())
    return raw / task


def test_finetune_one_task_at_a_time_then_evaluate_collects_score_and_zip(tmp_path, glue_dir, backbone):
    from lmcore.eval.evaluate import task_results
    from lmcore.train.finetune import finetune

    cfg = FinetuneConfig(mixed_precision="no", defaults={"epochs": 1, "batch_size": 2, "max_length": 32},
                         tasks={"mnli": {"epochs": 2, "select_epoch": "validation"}, "stsb": {"scratch_baseline": False},
                                "cola": None})
    out = tmp_path / "runs/finetune"
    results = {}
    for task in ("mnli", "stsb", "cola"):
        folder = _prepare(glue_dir, tmp_path / "raw", task)
        results[task] = finetune(cfg, folder, backbone / "pretrained", backbone / "tokenizer", out / task,
                                 tmp_path / f"metrics/finetune/{task}.json", OFF)

    res = json.loads((out / "mnli/results.json").read_text())
    m = res["metrics"]
    assert len(res["history"]) == 2 and res["hyperparameters"]["epochs"] == 2  # the per-task override
    assert m["score"] == pytest.approx((m["accuracy_matched"] + m["accuracy_mismatched"]) / 2)
    assert m["best_epoch"] in (1, 2) and m["score"] == max(h["score"] for h in res["history"])
    assert {"majority_accuracy_matched", "majority_score", "bow_accuracy_mismatched", "bow_score"} <= set(m)
    # the same fine-tuning from random weights, beside it (on by default; off for stsb here)
    assert {"scratch_accuracy_matched", "scratch_accuracy_mismatched", "scratch_score", "scratch_best_epoch"} <= set(m)
    assert not any(k.startswith("scratch_") for k in json.loads((out / "stsb/results.json").read_text())["metrics"])
    assert res["submissions"] == {"test_matched": "submission/MNLI-m.tsv", "test_mismatched": "submission/MNLI-mm.tsv",
                                  "test_ax": "submission/AX.tsv"}
    ax = (out / "mnli/submission/AX.tsv").read_text().splitlines()
    assert ax[0] == "index\tprediction" and [line.split("\t")[0] for line in ax[1:]] == ["0", "1"]
    assert all(line.split("\t")[1] in glue.NLI3 for line in ax[1:])
    # DVC's metrics file: the results without the speed and the prediction counts
    dvc_metrics = json.loads((tmp_path / "metrics/finetune/mnli.json").read_text())
    assert dvc_metrics == {k: v for k, v in m.items() if not k.startswith("train_") and not k.endswith("_predictions")}
    assert "train_examples_per_second" in m and "test_ax_predictions" in m
    stsb = (out / "stsb/submission/STS-B.tsv").read_text().splitlines()
    assert len(stsb) == 2 and 0.0 <= float(stsb[1].split("\t")[1]) <= 5.0
    assert json.loads((out / "cola/results.json").read_text())["hyperparameters"]["epochs"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["cola", "mnli", "stsb"]  # no temporary leftovers

    metrics, rows, files = task_results(out, ["cola", "stsb", "mnli"])
    scores = {t: r.score for t, r in results.items()}
    assert metrics["glue.score"] == pytest.approx(sum(scores.values()) / 3) and metrics["glue.tasks"] == 3
    assert metrics["mnli.score"] == scores["mnli"] and "mnli.bow_accuracy_matched" in metrics
    assert math.isfinite(metrics["stsb.pearson"]) and "cola.majority_matthews" in metrics
    assert metrics["mnli.scratch_accuracy_matched"] == m["scratch_accuracy_matched"] and "stsb.scratch_pearson" not in metrics
    assert ("mnli", "accuracy_matched", m["accuracy_matched"], m["scratch_accuracy_matched"], "from scratch") in rows
    names = glue.write_submission_zip(files, tmp_path / "glue_submission.zip")
    assert names == ["CoLA.tsv", "STS-B.tsv", "MNLI-m.tsv", "MNLI-mm.tsv", "AX.tsv"]


def test_selection_split_holds_out_the_same_examples_whatever_the_order():
    rows = [{"text_a": f"text {i}", "text_b": None if i % 3 else "b", "label": i % 2, "idx": i} for i in range(50)]
    kept, held = glue.selection_split(rows, 5)
    assert len(held) == 5 and len(kept) == 45 and sorted(r["idx"] for r in kept + held) == list(range(50))
    assert [r["idx"] for r in kept] == sorted(r["idx"] for r in kept)  # the file's order kept
    shuffled = rows[::-1]
    assert {r["idx"] for r in glue.selection_split(shuffled, 5)[1]} == {r["idx"] for r in held}
    assert glue.selection_split(rows, 0) == (rows, [])


def _labelled_task(folder: Path, n_train: int, n_valid: int = 24) -> Path:
    """A one-text binary task whose label a word decides, so a few steps learn something; its
    validation split says the opposite ("good" is 0), so the better the model learns the training
    rule, the worse it scores there: choosing the epoch on validation and on held-out training
    examples pick different epochs."""
    rng = random.Random(1)

    def rows(n, start, inverted=False):
        out = []
        for i in range(n):
            label = i % 2
            out.append({"text_a": ("good " if label else "bad ") + make_text(rng, 6), "text_b": None,
                        "label": 1 - label if inverted else label, "idx": start + i})
        return out

    write_jsonl(folder / "train.jsonl", rows(n_train, 0))
    write_jsonl(folder / "validation.jsonl", rows(n_valid, 10_000, inverted=True))
    write_json(folder / "task.json", glue.TASKS["rotten_tomatoes"].to_dict())
    return folder


@pytest.mark.parametrize("select", ["holdout", "last"])
def test_finetune_keeps_the_epoch_chosen_on_held_out_training_examples_or_the_last(tmp_path, backbone, select):
    """The reported validation numbers must not choose the epoch (they would be optimistic): the
    default holds a tenth of the training split out and chooses on it."""
    from lmcore.train.finetune import PREDICTIONS, finetune

    folder = _labelled_task(tmp_path / "raw/rotten_tomatoes", n_train=60)
    cfg = FinetuneConfig(mixed_precision="no", defaults={"epochs": 3, "batch_size": 4, "max_length": 16,
                                                         "lr": 3e-3, "scratch_baseline": False,
                                                         "select_epoch": select, "holdout": 1000})
    got = finetune(cfg, folder, backbone / "pretrained", backbone / "tokenizer", tmp_path / "out",
                   tmp_path / "m.json", OFF)
    res = json.loads((tmp_path / "out/results.json").read_text())
    history, m = res["history"], res["metrics"]
    assert res["select_epoch"] == select and len(history) == 3
    if select == "holdout":
        assert res["holdout_examples"] == 6 and m["train_examples"] == 54  # a tenth, not trained on
        held = [h["holdout_score"] for h in history]
        assert m["best_epoch"] == held.index(max(held)) + 1  # the first of equal bests
        valid = [h["score"] for h in history]
        assert valid.index(max(valid)) != held.index(max(held))  # validation would have chosen another
    else:
        assert res["holdout_examples"] == 0 and m["train_examples"] == 60 and m["best_epoch"] == 3
        assert all("holdout_score" not in h for h in history)
    chosen = history[m["best_epoch"] - 1]
    assert got.score == m["score"] == chosen["score"] and m["accuracy"] == chosen["accuracy"]
    # the model kept is that epoch's: its saved validation predictions score what was reported
    preds = json.loads((tmp_path / "out" / PREDICTIONS).read_text())["splits"]["validation"]
    assert glue.compute_metrics(glue.TASKS["rotten_tomatoes"], preds["predictions"], preds["labels"])[
        "accuracy"] == pytest.approx(m["accuracy"])


def test_finetune_refuses_to_hold_out_a_tenth_of_too_small_a_training_split(tmp_path, backbone):
    from lmcore.train.finetune import finetune

    folder = _labelled_task(tmp_path / "raw/rotten_tomatoes", n_train=9)
    cfg = FinetuneConfig(mixed_precision="no", defaults={"epochs": 2, "batch_size": 4, "max_length": 16})
    with pytest.raises(StageError, match=r"9 training examples.*select_epoch 'holdout'.*finetune.tasks.rotten_tomatoes"):
        finetune(cfg, folder, backbone / "pretrained", backbone / "tokenizer", tmp_path / "out", tmp_path / "m.json", OFF)
    assert not (tmp_path / "out").exists()


def test_finetune_with_several_seeds_reports_their_mean_spread_and_each_score(tmp_path, glue_dir, backbone):
    from lmcore.eval.evaluate import task_results
    from lmcore.train.finetune import finetune

    cfg = FinetuneConfig(mixed_precision="no", defaults={"epochs": 1, "batch_size": 2, "max_length": 32, "seeds": 3})
    folder = _prepare(glue_dir, tmp_path / "raw", "rte")
    got = finetune(cfg, folder, backbone / "pretrained", backbone / "tokenizer", tmp_path / "out/rte",
                   tmp_path / "rte.json", OFF)
    res = json.loads((tmp_path / "out/rte/results.json").read_text())
    m = res["metrics"]
    assert [r["seed"] for r in res["seeds"]] == [1337, 1338, 1339]
    each = [r["score"] for r in res["seeds"]]
    assert [m[f"score_seed_{s}"] for s in (1337, 1338, 1339)] == each
    assert m["score"] == pytest.approx(sum(each) / 3) == got.score
    assert m["accuracy"] == pytest.approx(sum(r["metrics"]["accuracy"] for r in res["seeds"]) / 3)
    mean = sum(each) / 3
    assert m["score_std"] == pytest.approx((sum((x - mean) ** 2 for x in each) / 2) ** 0.5)
    assert {"scratch_score", "scratch_score_std", "scratch_score_seed_1339"} <= set(m)  # from scratch per seed too
    metrics, rows, _ = task_results(tmp_path / "out", ["rte"])
    assert metrics["rte.score_std"] == m["score_std"]
    assert ("rte", "score std over 3 seeds", m["score_std"]) in [r[:3] for r in rows]


def test_finetune_stage_refuses_a_task_that_is_not_listed(tmp_path):
    from lmcore.core.layout import Layout
    from lmcore.stages import run_stage

    with pytest.raises(StageError, match="task 'cola' is not in prepare.tasks.tasks"):
        run_stage("finetune", config.Params(), Layout(tmp_path), task="cola")


def test_length_grouped_batches_cover_each_example_once_pad_less_and_are_seeded():
    import numpy as np

    from lmcore.train.finetune import epoch_batches

    rng = np.random.default_rng(0)
    lengths = [int(x) for x in rng.integers(3, 120, size=1000)]

    def padded(batches):  # tokens computed: every batch padded to its longest example
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    grouped = epoch_batches(lengths, 16, np.random.default_rng(7), True, window=8)
    plain = epoch_batches(lengths, 16, np.random.default_rng(7), False)
    for batches in (grouped, plain):
        assert sorted(int(i) for b in batches for i in b) == list(range(1000))
        assert sorted(len(b) for b in batches) == [8] + [16] * 62
    assert padded(grouped) < 0.75 * padded(plain)
    again = epoch_batches(lengths, 16, np.random.default_rng(7), True, window=8)
    assert [b.tolist() for b in again] == [b.tolist() for b in grouped]
    # still shuffled: the batches do not come in length order
    maxima = [max(lengths[i] for i in b) for b in grouped]
    assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)


# --------------------------------------------------------------------------------------------- damaged prepared files


def _prepared(folder: Path, spec: glue.TaskSpec, train: list[dict]) -> Path:
    write_json(folder / "task.json", spec.to_dict())
    write_jsonl(folder / "train.jsonl", train)
    write_jsonl(folder / "validation.jsonl", train[:1])
    return folder


REMOVED = object()


@pytest.mark.parametrize("change, message", [
    ({"label": 7}, "line 2: label 7 is not a class index 0 .. 1"),
    ({"label": True}, "line 2: label True is not a class index 0 .. 1"),
    ({"text_a": 5}, "line 2: text_a is 5, not a string"),
    ({"text_b": "x"}, "line 2: text_b is 'x': task rotten_tomatoes has one text"),
    ({"label": None}, "line 2: no label, in the train split"),
    ({"idx": REMOVED}, "line 2: no idx"),
])
def test_a_damaged_prepared_example_is_named_by_file_and_line(tmp_path, change, message):
    """Training used to stop deep inside with ``IndexError: Target 7 is out of bounds`` or the
    tokenizer's TypeError; now loading the task names the line."""
    good = {"idx": 0, "text_a": "a good film", "text_b": None, "label": 1}
    bad = {k: v for k, v in {**good, "idx": 1, **change}.items() if v is not REMOVED}
    folder = _prepared(tmp_path / "t", glue.TASKS["rotten_tomatoes"], [good, bad])
    with pytest.raises(StageError, match=re.escape(f"train.jsonl: {message}")):
        glue.load_task(folder)
    stsb = _prepared(tmp_path / "s", glue.TASKS["stsb"], [{"idx": 0, "text_a": "a", "text_b": "b", "label": 3.8}])
    write_jsonl(stsb / "test.jsonl", [{"idx": 0, "text_a": "a", "text_b": "b", "label": None}])
    splits = glue.load_task(stsb)[1]
    assert splits["train"][0]["label"] == 3.8 and splits["test"][0]["label"] is None  # a test split has no labels


def test_a_task_description_or_results_file_of_the_wrong_shape_is_named(tmp_path):
    from lmcore.eval.tasks import task_results

    folder = _prepared(tmp_path / "t", glue.TASKS["rotten_tomatoes"], [{"idx": 0, "text_a": "a", "label": 0}])
    (folder / "task.json").write_text("[1, 2]")
    with pytest.raises(StageError, match=r"task.json: not a task description as lmcore writes it \(a JSON object"):
        glue.load_task(folder)
    run = tmp_path / "runs/rotten_tomatoes"
    write_json(run / "config.json", {"task": glue.TASKS["rotten_tomatoes"].to_dict()})
    (run / "results.json").write_text("[1]")
    with pytest.raises(StageError, match=r"results.json: no number for metrics.score"):
        task_results(tmp_path / "runs", ["rotten_tomatoes"])
    write_json(run / "results.json", {"metrics": {"score": 0.5, "accuracy": 0.5}})
    with pytest.raises(StageError, match=r"results.json: no number for metrics.majority_accuracy"):
        task_results(tmp_path / "runs", ["rotten_tomatoes"])


def test_no_test_row_goes_missing_from_a_submission(tmp_path):
    """A malformed or empty test row was skipped like a training row: the leaderboard file lacked
    its index, and only a total count of skipped rows said so. A diverged STS-B model's NaN went
    into the file as 'nan'."""
    rte = glue.TASKS["rte"]
    _write(tmp_path / "RTE/test.tsv", _tsv(["index", "sentence1", "sentence2"], ["0", "a", "b"], ["1", "c"],
                                           ["2", "d", "e"]))
    with pytest.raises(StageError, match=r"RTE/test.tsv: line 3: 2 fields where the header has 3"):
        glue.read_glue_split(rte, tmp_path, "test")
    _write(tmp_path / "t.jsonl", "\n".join(json.dumps(r) for r in (
        {"i": 0, "a": "x", "b": "y"}, {"i": 1, "a": "", "b": "z"}, {"i": 2, "a": "p", "b": "q"})) + "\n")
    rows, skipped = glue.read_local_split(rte, tmp_path / "t.jsonl", {"text_a": "a", "text_b": "b", "idx": "i"}, "test")
    assert [r["idx"] for r in rows] == [0, 1, 2] and rows[1]["text_a"] == "" and skipped == 0
    assert glue.submission_tsv(rte, [r["idx"] for r in rows], [0, 1, 0]).splitlines()[1:] == [
        "0\tentailment", "1\tnot_entailment", "2\tentailment"]
    with pytest.raises(StageError, match="a prediction is nan"):
        glue.submission_tsv(glue.TASKS["stsb"], [0, 1], [2.5, math.nan])
    assert all(math.isnan(v) for v in glue.compute_metrics(glue.TASKS["stsb"], [], []).values())


def test_max_examples_keeps_the_test_splits_whole(tmp_path):
    """prepare.tasks.max_examples cut the test splits too: the leaderboard files lacked rows."""
    from lmcore.config import PrepareConfig
    from lmcore.data.prepare import prepare

    def rows(n: int, label: bool) -> str:
        return "\n".join(json.dumps({"s": f"text {i}", **({"y": i % 2} if label else {})}) for i in range(n)) + "\n"

    for split, n in (("train", 40), ("validation", 20), ("test", 30)):
        _write(tmp_path / f"{split}.jsonl", rows(n, split != "test"))
    _write(tmp_path / "corpus.txt", make_text(random.Random(0), 200))
    cfg = PrepareConfig.model_validate({
        "corpus": {"kind": "files", "paths": [str(tmp_path / "corpus.txt")]},
        "tasks": {"kind": "rotten_tomatoes", "tasks": ["mine"], "max_examples": 10, "local": {"mine": {
            "label_names": ["neg", "pos"], "metrics": ["accuracy"],
            "files": {s: str(tmp_path / f"{s}.jsonl") for s in ("train", "validation", "test")},
            "columns": {"text_a": "s", "label": "y"}}}}})
    prepare(cfg, tmp_path / "raw", tmp_path / "prepare.json", TrackingConfig(enabled=False))
    counted = {p.stem: len(p.read_text().splitlines()) for p in (tmp_path / "raw/tasks/mine").glob("*.jsonl")}
    assert counted == {"train": 10, "validation": 10, "test": 30}
