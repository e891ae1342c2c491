"""GLUE-shaped task definitions, loaders and metrics.

Every task is stored the same way once prepared: ``<task>/{train,validation,test}.jsonl`` with
``text_a``, optional ``text_b``, ``label`` (an int class id, a float score, or None on test
splits) and ``idx``, plus ``task.json`` (the :class:`TaskSpec`). Fine-tuning and evaluation read
only that form, whatever the source (the original GLUE folder layout, the Hugging Face hub, or
the Rotten Tomatoes default).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmcore.io import StageError


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    """Registry name (``sst2``, ``rotten_tomatoes``...)."""
    labels: tuple[str, ...] | None
    """Class names in id order; None for a regression task."""
    metrics: tuple[str, ...]
    """Metric names, the first being the one the best epoch is chosen on."""
    pair: bool = False
    """Whether examples are sentence pairs."""
    glue_folder: str | None = None
    """Folder name in the original GLUE distribution."""
    hub_config: str | None = None
    """Configuration name of ``nyu-mll/glue`` on the hub."""
    columns: tuple[str, ...] = ()
    """Header names of text_a[, text_b] and the label in the GLUE TSV files."""
    validation_splits: tuple[str, ...] = ("validation",)
    """Validation split names (MNLI has matched and mismatched)."""

    @property
    def num_labels(self) -> int:
        return len(self.labels) if self.labels else 1

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TaskSpec":
        d = dict(d)
        for k in ("labels", "metrics", "columns", "validation_splits"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)


BINARY = ("0", "1")
TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec("cola", BINARY, ("matthews",), False, "CoLA", "cola", ("sentence", "label")),
        TaskSpec("sst2", BINARY, ("accuracy",), False, "SST-2", "sst2", ("sentence", "label")),
        TaskSpec("mrpc", BINARY, ("f1", "accuracy"), True, "MRPC", "mrpc", ("#1 String", "#2 String", "Quality")),
        TaskSpec("stsb", None, ("pearson", "spearman"), True, "STS-B", "stsb", ("sentence1", "sentence2", "score")),
        TaskSpec("qqp", BINARY, ("f1", "accuracy"), True, "QQP", "qqp", ("question1", "question2", "is_duplicate")),
        TaskSpec(
            "mnli", ("entailment", "neutral", "contradiction"), ("accuracy",), True, "MNLI", "mnli",
            ("sentence1", "sentence2", "gold_label"), ("validation_matched", "validation_mismatched"),
        ),
        TaskSpec("qnli", ("entailment", "not_entailment"), ("accuracy",), True, "QNLI", "qnli", ("question", "sentence", "label")),
        TaskSpec("rte", ("entailment", "not_entailment"), ("accuracy",), True, "RTE", "rte", ("sentence1", "sentence2", "label")),
        TaskSpec("wnli", BINARY, ("accuracy",), True, "WNLI", "wnli", ("sentence1", "sentence2", "label")),
        TaskSpec("rotten_tomatoes", ("rotten", "fresh"), ("accuracy", "f1")),
    ]
}

# file stems of the original GLUE layout, per split
_GLUE_FILES = {"train": "train", "validation": "dev", "test": "test"}
_MNLI_FILES = {
    "train": "train",
    "validation_matched": "dev_matched",
    "validation_mismatched": "dev_mismatched",
    "test_matched": "test_matched",
    "test_mismatched": "test_mismatched",
}


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise StageError(f"unknown task '{name}'; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


# ---------------------------------------------------------------------------------------------
# the original GLUE folder layout


def _read_tsv(path: Path) -> tuple[list[str] | None, list[list[str]]]:
    """Split a GLUE TSV into rows with quoting off; strip a byte-order mark and accept a last
    line without its newline. Returns (None, rows) -- the caller decides what the header is."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise StageError(f"{path}: invalid UTF-8 at byte {e.start}") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return None, [line.rstrip("\r").split("\t") for line in lines]


def read_glue_split(spec: TaskSpec, folder: Path, split: str) -> tuple[list[dict[str, Any]], int]:
    """Read one split of a task from the original GLUE layout.

    Returns the examples and the number of malformed rows skipped (a wrong number of fields or
    an unreadable label).
    """
    files = _MNLI_FILES if spec.name == "mnli" else _GLUE_FILES
    path = folder / spec.glue_folder / f"{files[split]}.tsv"
    if not path.exists():
        raise StageError(f"{path}: GLUE file not found (expected the original GLUE layout)")
    _, rows = _read_tsv(path)
    is_test = split.startswith("test")
    if spec.name == "cola" and not is_test:
        header = ["source", "label", "original_mark", "sentence"]  # CoLA train/dev: no header
    else:
        header, rows = rows[0], rows[1:]
    col = {name: i for i, name in enumerate(header)}
    text_cols = spec.columns[: 2 if spec.pair else 1]
    label_col = spec.columns[-1]
    needed = list(text_cols) if is_test else [*text_cols, label_col]
    missing = [c for c in needed if c not in col]
    if missing:
        raise StageError(f"{path}: header lacks column(s) {missing}; header is {header}")
    out: list[dict[str, Any]] = []
    skipped = 0
    for n, row in enumerate(rows):
        if len(row) != len(header):
            skipped += 1
            continue
        ex: dict[str, Any] = {"idx": int(row[col["index"]]) if "index" in col and row[col["index"]].isdigit() else n}
        if spec.name == "qqp" and "id" in col and row[col["id"]].isdigit():
            ex["idx"] = int(row[col["id"]])
        ex["text_a"] = row[col[text_cols[0]]]
        ex["text_b"] = row[col[text_cols[1]]] if spec.pair else None
        if is_test:
            ex["label"] = None
        else:
            label = _parse_label(spec, row[col[label_col]])
            if label is None:
                skipped += 1
                continue
            ex["label"] = label
        out.append(ex)
    return out, skipped


def _parse_label(spec: TaskSpec, raw: str) -> int | float | None:
    raw = raw.strip()
    if spec.is_regression:
        try:
            v = float(raw)
        except ValueError:
            return None
        return v if math.isfinite(v) else None
    return spec.labels.index(raw) if raw in spec.labels else None


def glue_splits(spec: TaskSpec) -> list[str]:
    if spec.name == "mnli":
        return ["train", *spec.validation_splits, "test_matched", "test_mismatched"]
    return ["train", "validation", "test"]


# ---------------------------------------------------------------------------------------------
# the hub


def read_hub_split(spec: TaskSpec, split: str) -> list[dict[str, Any]]:
    """Read one split of ``nyu-mll/glue`` from the Hugging Face hub (needs network)."""
    try:
        import datasets

        ds = datasets.load_dataset("nyu-mll/glue", spec.hub_config, split=split)
    except Exception as e:  # noqa: BLE001 - the hub raises many kinds of errors offline
        raise StageError(
            f"could not load nyu-mll/glue/{spec.hub_config} split {split} from the Hugging Face hub "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
            "without network, set prepare.tasks.kind: glue_dir and prepare.tasks.glue_dir to a local GLUE folder"
        ) from None
    names = {"cola": ("sentence", None), "sst2": ("sentence", None), "qnli": ("question", "sentence"),
             "qqp": ("question1", "question2")}
    a, b = names.get(spec.name, ("sentence1", "sentence2"))
    out = []
    for row in ds:
        label = row["label"]
        if label is not None and label < 0:
            label = None  # test splits carry -1
        if spec.is_regression and label is not None:
            label = float(label)
        out.append({"idx": int(row["idx"]), "text_a": row[a], "text_b": row[b] if b else None, "label": label})
    return out


# ---------------------------------------------------------------------------------------------
# metrics


def compute_metrics(spec: TaskSpec, preds: Sequence[float], labels: Sequence[float]) -> dict[str, float]:
    """The official GLUE metrics of a task, with scikit-learn and scipy."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    out: dict[str, float] = {}
    for m in spec.metrics:
        if m == "accuracy":
            out[m] = float(accuracy_score(labels, preds))
        elif m == "f1":
            out[m] = float(f1_score(labels, preds, zero_division=0.0))
        elif m == "matthews":
            out[m] = float(matthews_corrcoef(labels, preds))
        elif m == "pearson":
            out[m] = float(pearsonr(preds, labels)[0]) if len(set(preds)) > 1 else 0.0
        elif m == "spearman":
            out[m] = float(spearmanr(preds, labels)[0]) if len(set(preds)) > 1 else 0.0
        else:  # pragma: no cover - the registry only names the metrics above
            raise ValueError(m)
    return out


def task_score(spec: TaskSpec, metrics: dict[str, float]) -> float:
    """One number per task: the mean of its metrics (the GLUE convention)."""
    return sum(metrics[m] for m in spec.metrics) / len(spec.metrics)


def majority_baseline(spec: TaskSpec, train_labels: Sequence[Any], eval_labels: Sequence[Any]) -> dict[str, float]:
    """Metrics of always predicting the most common training label (the mean for regression)."""
    if spec.is_regression:
        mean = sum(train_labels) / len(train_labels)
        return compute_metrics(spec, [mean] * len(eval_labels), eval_labels)
    top = Counter(train_labels).most_common(1)[0][0]
    return compute_metrics(spec, [top] * len(eval_labels), eval_labels)
