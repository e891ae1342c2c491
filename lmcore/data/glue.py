"""GLUE-shaped task definitions, loaders, metrics and leaderboard files.

Every task is stored the same way once prepared: ``<task>/<split>.jsonl`` with ``text_a``,
optional ``text_b``, ``label`` (an int class id, a float score, or None on test splits) and
``idx``, plus ``task.json`` (the :class:`TaskSpec`). Fine-tuning and evaluation read only that
form, whatever the source: the original GLUE folder layout (:func:`read_glue_split`), the Hugging
Face hub (:func:`read_hub_split`), local JSONL/CSV/TSV/parquet files with a column mapping
(:func:`read_local_split`), or the Rotten Tomatoes default.

Splits: ``train``, the task's validation split(s) (``validation``; MNLI has
``validation_matched`` and ``validation_mismatched``) and optional unlabelled test split(s)
(``test``; MNLI ``test_matched``, ``test_mismatched`` and ``test_ax``, the AX diagnostic, which is
predicted with the MNLI model).

Metrics are the official GLUE ones, computed with scikit-learn and scipy. A task's score is the
mean of its numbers (MRPC: F1 and accuracy; STS-B: Pearson and Spearman; MNLI: matched and
mismatched accuracy); the GLUE score is the mean of the task scores of the nine GLUE tasks.
"""

from __future__ import annotations

import hashlib
import math
import zipfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from lmcore.core import readers
from lmcore.core.errors import MayPass, StageError
from lmcore.core.io import atomic_path, read_json, read_jsonl_lines

# the task registry, re-exported: lmcore.data.glue is where tasks are loaded and scored
from lmcore.core.task_specs import BINARY as BINARY
from lmcore.core.task_specs import CLASSIFICATION_METRICS as CLASSIFICATION_METRICS
from lmcore.core.task_specs import GLUE_TASKS as GLUE_TASKS
from lmcore.core.task_specs import LEADERBOARD_FILES as LEADERBOARD_FILES
from lmcore.core.task_specs import METRICS as METRICS
from lmcore.core.task_specs import NLI2 as NLI2
from lmcore.core.task_specs import NLI3 as NLI3
from lmcore.core.task_specs import REGRESSION_METRICS as REGRESSION_METRICS
from lmcore.core.task_specs import TASKS as TASKS
from lmcore.core.task_specs import TaskSpec as TaskSpec
from lmcore.core.task_specs import custom_spec as custom_spec
from lmcore.core.task_specs import metric_keys as metric_keys
from lmcore.core.task_specs import split_suffix as split_suffix
from lmcore.core.task_specs import get_task as get_task
from lmcore.core.task_specs import glue_splits as glue_splits

# where the AX diagnostic may sit in a GLUE folder: download_glue_data.py writes
# diagnostic/diagnostic.tsv; the file is published as AX.tsv
AX_FILES = ("diagnostic/diagnostic.tsv", "diagnostic/AX.tsv", "AX/AX.tsv", "AX.tsv")

# file stems of the original GLUE layout, per split
_GLUE_FILES = {"train": "train", "validation": "dev", "test": "test"}
_MNLI_FILES = {
    "train": "train",
    "validation_matched": "dev_matched",
    "validation_mismatched": "dev_mismatched",
    "test_matched": "test_matched",
    "test_mismatched": "test_mismatched",
}


# ---------------------------------------------------------------------------------------------
# the original GLUE folder layout


def _read_tsv(path: Path) -> list[tuple[int, list[str]]]:
    """Split a GLUE TSV into (line number, fields) with quoting off (the files hold unbalanced
    quotes); strip a byte-order mark, accept CRLF and a last line without its newline, and drop
    blank lines."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise StageError(f"{path}: invalid UTF-8 at byte {e.start}") from None
    return [(n, line.rstrip("\r").split("\t")) for n, line in enumerate(text.split("\n"), 1) if line.strip()]


def glue_path(spec: TaskSpec, folder: Path, split: str) -> Path | None:
    """The file of one split in a GLUE folder, or None for an AX file that is not there."""
    folder = Path(folder)
    if spec.name == "ax":
        return next((folder / f for f in AX_FILES if (folder / f).is_file()), None)
    files = _MNLI_FILES if spec.name == "mnli" else _GLUE_FILES
    if split not in files:
        raise StageError(f"task {spec.name} has no split '{split}' in the GLUE layout")
    return folder / spec.glue_folder / f"{files[split]}.tsv"


def read_glue_split(spec: TaskSpec, folder: Path, split: str) -> tuple[list[dict[str, Any]], int]:
    """Read one split of a task from the original GLUE layout (``folder/CoLA/train.tsv``...).

    Returns the examples and the number of malformed rows skipped (a wrong number of fields or
    an unreadable label; QQP's train and dev files have a few).
    """
    path = glue_path(spec, folder, split)
    if path is None:
        raise StageError(f"{folder}: no AX diagnostic file (looked for {', '.join(AX_FILES)})")
    if not path.exists():
        raise StageError(f"{path}: GLUE file not found (expected the original GLUE layout)")
    rows = _read_tsv(path)
    is_test = split.startswith("test")
    if spec.name == "cola" and not is_test:
        header = ["source", "label", "original_mark", "sentence"]  # CoLA train/dev: no header
    elif not rows:
        raise StageError(f"{path}: empty file (expected a header line)")
    else:
        header, rows = rows[0][1], rows[1:]
    col = {name: i for i, name in enumerate(header)}
    text_cols = spec.columns[: 2 if spec.pair else 1]
    label_col = spec.columns[-1]
    needed = list(text_cols) if is_test else [*text_cols, label_col]
    missing = [c for c in needed if c not in col]
    if missing:
        raise StageError(f"{path}: header lacks column(s) {missing}; header is {header}")
    id_col = col.get("index", col.get("id"))
    out: list[dict[str, Any]] = []
    skipped = 0
    for n, (lineno, row) in enumerate(rows):
        if len(row) != len(header):
            if is_test:  # the leaderboard wants a prediction for every test index: none may go missing
                raise StageError(f"{path}: line {lineno}: {len(row)} fields where the header has {len(header)}; a "
                                 "test row cannot be skipped (the submission would lack its index)")
            skipped += 1
            continue
        raw_id = row[id_col].strip() if id_col is not None else ""
        ex: dict[str, Any] = {"idx": int(raw_id) if raw_id.isdecimal() else n}
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


# ---------------------------------------------------------------------------------------------
# the hub


def read_hub_split(spec: TaskSpec, split: str) -> list[dict[str, Any]]:
    """Read one split of ``nyu-mll/glue`` from the Hugging Face hub (needs network). MNLI's
    ``test_ax`` split is the ``ax`` configuration's ``test`` split."""
    config, hub_split, cols = spec.hub_config, split, spec.hub_columns
    if spec.name == "mnli" and split == "test_ax":
        config, hub_split, cols = "ax", "test", TASKS["ax"].hub_columns
    try:
        import datasets  # lazy: heavy optional dependency, only for hub tasks

        ds = datasets.load_dataset("nyu-mll/glue", config, split=hub_split)
    except Exception as e:  # noqa: BLE001 - the hub raises many kinds of errors offline
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise MayPass(
            f"could not load nyu-mll/glue/{config} split {hub_split} from the Hugging Face hub "
            f"({type(e).__name__}: {first}); without network, set prepare.tasks.kind: glue_dir and "
            "prepare.tasks.glue_dir to a local GLUE folder, or read local files with prepare.tasks.local"
        ) from None
    a, b = cols[0], cols[1] if spec.pair else None
    out = []
    for row in ds:
        label = row["label"]
        if split.startswith("test") or (label is not None and label < 0):
            label = None  # test splits carry -1
        elif spec.is_regression:
            label = float(label)
        out.append({"idx": int(row["idx"]), "text_a": row[a], "text_b": row[b] if b else None, "label": label})
    return out


# ---------------------------------------------------------------------------------------------
# local files with a column mapping

LOCAL_FORMATS = {suffix: kind for suffix, kind in readers.FORMATS.items() if kind != "text"}


def local_format(path: Path, fmt: str = "auto") -> str:
    """``jsonl``, ``csv``, ``tsv`` or ``parquet``: ``fmt`` unless it is ``auto``, else from the name
    (:func:`lmcore.core.readers.detect_format`)."""
    if fmt != "auto":
        return fmt
    kind = readers.detect_format(path)
    if kind is None or kind not in LOCAL_FORMATS.values():
        raise StageError(f"{path}: unknown file type (expected {', '.join(LOCAL_FORMATS)}, "
                         "or set the task's format)")
    return kind


def _records(path: Path, fmt: str) -> tuple[list[str] | None, Iterator[tuple[int, dict[str, Any] | None]]]:
    """The column names (None for JSONL, whose records each carry theirs) and (line or row
    number, record) pairs, from the shared readers; a record is None when its row is malformed
    (wrong field count). Anything unreadable raises a :class:`StageError` naming file and line."""
    sink = readers.strict(path)
    if fmt == "parquet":
        names, rows = readers.parquet_rows(path, sink)
        return names, rows
    if fmt == "jsonl":
        return None, read_jsonl_lines(path)
    # csv: standard quoting; tsv: quoting off (like the GLUE files, which hold unbalanced quotes)
    header, fields = readers.csv_rows(path, sink, tsv=fmt == "tsv")
    if header is None:
        raise StageError(f"{path}: empty file (expected a header line)")
    if readers.has_bad_utf8(header):
        sink("invalid_utf8_line", 1, "invalid UTF-8")

    def rows() -> Iterator[tuple[int, dict[str, Any] | None]]:
        for lineno, row in fields:
            if not any(f.strip() for f in row):
                continue
            if readers.has_bad_utf8(row):
                sink("invalid_utf8_line", lineno, "invalid UTF-8")
            yield lineno, (dict(zip(header, row)) if len(row) == len(header) else None)

    return header, rows()


def _missing(value: Any) -> bool:
    """An empty cell: null, NaN (pandas/parquet) or blank text."""
    if isinstance(value, float):
        return math.isnan(value)
    return value is None or (isinstance(value, str) and not value.strip())


def _local_label(spec: TaskSpec, value: Any, where: str, column: str) -> int | float | None:
    """A label value as a class id or a float score; None when the cell is empty."""
    if _missing(value):
        return None
    if spec.is_regression:
        try:
            v = float(value)
        except (TypeError, ValueError):
            v = math.nan
        if isinstance(value, bool) or not math.isfinite(v):
            raise StageError(f"{where}: column '{column}' = {value!r} is not a number (the task is a regression)")
        return v
    labels = spec.labels
    if isinstance(value, str):
        v = value.strip()
        if v in labels:
            return labels.index(v)
        if v.lstrip("-").isdecimal() and 0 <= int(v) < len(labels):
            return int(v)  # class ids written as text (CSV)
        if len(labels) == 2 and v.lower() in ("true", "false"):
            return int(v.lower() == "true")  # booleans written as text (CSV, TSV)
    elif isinstance(value, bool):
        if len(labels) == 2:
            return int(value)
    elif isinstance(value, (int, float)) and float(value).is_integer() and 0 <= int(value) < len(labels):
        return int(value)
    raise StageError(f"{where}: column '{column}' = {value!r} is not a label of task {spec.name} "
                     f"(allowed: {', '.join(labels)}, or their ids 0-{len(labels) - 1}"
                     f"{', or true/false' if len(labels) == 2 else ''})")


def read_local_split(spec: TaskSpec, path: Path, columns: Mapping[str, str | None], split: str,
                     fmt: str = "auto") -> tuple[list[dict[str, Any]], int]:
    """Read one split of a task from a local JSONL, CSV, TSV or parquet file.

    ``columns`` maps ``text_a``, ``text_b`` (None for single-text tasks), ``label`` and ``idx``
    (None: the row number, from 0) to the file's column names. A mapped column the file lacks is
    an error naming the file and the column; so is a label that is not one of the task's labels.
    Rows with a missing text or label (empty, null) and malformed CSV/TSV rows (a wrong number of
    fields) are skipped and counted. Labels are ignored on test splits.
    """
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: file not found (prepare.tasks.local.{spec.name}.files.{split})")
    kind = local_format(path, fmt)
    is_test = split.startswith("test")
    wanted = {"text_a": columns.get("text_a"), "text_b": columns.get("text_b") if spec.pair else None,
              "label": None if is_test else columns.get("label"), "idx": columns.get("idx")}
    if spec.pair and not wanted["text_b"]:
        raise StageError(f"task {spec.name} is a sentence-pair task: "
                         f"set prepare.tasks.local.{spec.name}.columns.text_b")
    header, records = _records(path, kind)

    def check(available: Sequence[str], where: str) -> None:
        for field, name in wanted.items():
            if name and name not in available:
                raise StageError(f"{where}: no column '{name}' (prepare.tasks.local.{spec.name}.columns.{field}); "
                                 f"the file has: {', '.join(map(str, available))}")

    if header is not None:
        check(header, str(path))
    out: list[dict[str, Any]] = []
    skipped = 0
    unit = "line" if kind in ("jsonl", "csv", "tsv") else "row"
    for n, (lineno, rec) in enumerate(records):
        if rec is None:
            skipped += 1
            continue
        where = f"{path}: {unit} {lineno}"
        if header is None:
            check(list(rec), where)
        texts = [rec.get(wanted["text_a"])] + ([rec.get(wanted["text_b"])] if spec.pair else [])
        if any(_missing(t) for t in texts):
            if is_test:  # kept, with its empty text: the submission needs a prediction for every index
                texts = ["" if _missing(t) else t for t in texts]
            else:
                skipped += 1
                continue
        label = None
        if not is_test:
            label = _local_label(spec, rec.get(wanted["label"]), where, wanted["label"])
            if label is None:
                skipped += 1
                continue
        idx: Any = n
        if wanted["idx"]:
            raw = rec.get(wanted["idx"])
            idx = int(raw) if isinstance(raw, (int, float)) and not isinstance(raw, bool) and float(raw).is_integer() \
                else int(raw) if isinstance(raw, str) and raw.strip().lstrip("-").isdecimal() else raw
        text_b = str(texts[1]) if spec.pair else None
        out.append({"idx": idx, "text_a": str(texts[0]), "text_b": text_b, "label": label})
    return out, skipped


# ---------------------------------------------------------------------------------------------
# metrics and scores


def compute_metrics(spec: TaskSpec, preds: Sequence[float], labels: Sequence[float]) -> dict[str, float]:
    """The official GLUE metrics of a task on one split, with scikit-learn and scipy: accuracy,
    F1 of class 1 (binary tasks), Matthews correlation, Pearson and Spearman correlation. An
    undefined correlation (constant predictions or labels) counts as 0."""
    # lazy: scipy and scikit-learn take ~1.5 s to import; only scoring needs them
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    out: dict[str, float] = {}
    if not len(labels) or not all(math.isfinite(float(p)) for p in preds):  # nothing to score, or a diverged model
        return {m: math.nan for m in spec.metrics}
    for m in spec.metrics:
        if m == "accuracy":
            v = accuracy_score(labels, preds)
        elif m == "f1":
            v = f1_score(labels, preds, zero_division=0.0)
        elif m == "matthews":
            v = matthews_corrcoef(labels, preds)
        elif m in ("pearson", "spearman"):
            constant = len(set(preds)) < 2 or len(set(labels)) < 2
            v = 0.0 if constant else (pearsonr if m == "pearson" else spearmanr)(preds, labels)[0]
        else:  # pragma: no cover - the registry and the config only name the metrics above
            raise ValueError(m)
        out[m] = 0.0 if math.isnan(float(v)) else float(v)
    return out


def evaluate_splits(spec: TaskSpec, preds: Mapping[str, Sequence[float]],
                    labels: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """The task's metrics on every validation split, named as in :func:`metric_keys`."""
    out: dict[str, float] = {}
    for split in spec.validation_splits:
        scores = compute_metrics(spec, preds[split], labels[split])
        out |= {f"{k}{split_suffix(spec, split)}": v for k, v in scores.items()}
    return out


def task_score(spec: TaskSpec, metrics: Mapping[str, float]) -> float:
    """One number per task: the mean of its numbers (the GLUE convention: MRPC and QQP average
    F1 and accuracy, STS-B Pearson and Spearman, MNLI matched and mismatched accuracy)."""
    keys = metric_keys(spec)
    if all(k in metrics for k in keys):
        return sum(metrics[k] for k in keys) / len(keys)
    return sum(metrics[m] for m in spec.metrics) / len(spec.metrics)  # the metrics of one split


def glue_score(task_scores: Mapping[str, float]) -> float | None:
    """The GLUE score: the mean of the task scores of the GLUE tasks present (other tasks do not
    count); None when there is none. The leaderboard's figure needs all nine."""
    scores = [v for k, v in task_scores.items() if k in GLUE_TASKS]
    return sum(scores) / len(scores) if scores else None


def majority_baseline(spec: TaskSpec, train_labels: Sequence[Any], eval_labels: Sequence[Any]) -> dict[str, float]:
    """Metrics of always predicting the most common training label (the mean for regression)."""
    if spec.is_regression:
        mean = sum(train_labels) / len(train_labels)
        return compute_metrics(spec, [mean] * len(eval_labels), eval_labels)
    top = Counter(train_labels).most_common(1)[0][0]
    return compute_metrics(spec, [top] * len(eval_labels), eval_labels)


# ---------------------------------------------------------------------------------------------
# prediction files and the leaderboard submission


def format_prediction(spec: TaskSpec, pred: float) -> str:
    """A prediction as the leaderboard expects it: the label name (``entailment``; ``0``/``1``
    for the binary GLUE tasks), or a score with 3 decimals, clipped to the task's range."""
    if spec.is_regression:
        v = float(pred)
        if not math.isfinite(v):  # a diverged model: the server would reject the file
            raise StageError(f"task {spec.name}: a prediction is {v}; no submission file from a diverged model")
        if spec.score_range:
            v = min(max(v, spec.score_range[0]), spec.score_range[1])
        return f"{v:.3f}"
    return spec.labels[int(pred)]


def submission_tsv(spec: TaskSpec, idx: Sequence[Any], preds: Sequence[float]) -> str:
    """A prediction file: header ``index<TAB>prediction``, one line per test example."""
    lines = ["index\tprediction"] + [f"{i}\t{format_prediction(spec, p)}" for i, p in zip(idx, preds)]
    return "\n".join(lines) + "\n"


def write_submission_zip(files: Sequence[Path], out: Path) -> list[str]:
    """Zip the leaderboard files among ``files`` (``CoLA.tsv``... at the top of the archive, in
    leaderboard order) into ``out``, atomically and byte-reproducibly (fixed timestamps). Returns
    the names zipped."""
    by_name = {Path(f).name: Path(f) for f in files}
    names = [f"{n}.tsv" for n in LEADERBOARD_FILES if f"{n}.tsv" in by_name]
    if not names:
        raise StageError("no GLUE leaderboard prediction files to zip")
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for name in names:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            z.writestr(info, by_name[name].read_bytes())
    return names


def _checked_example(spec: TaskSpec, row: dict[str, Any], split: str, where: str) -> dict[str, Any]:
    """A prepared example as training and scoring read it: an ``idx``, ``text_a`` a string,
    ``text_b`` one for a pair task (else absent or null), and a ``label`` the task has (a class
    index below its number of labels; a finite number for regression), or null in a test split."""
    def bad(what: str) -> StageError:
        return StageError(f"{where}: {what}: damaged or not written by prepare; run the prepare stage again")

    if "idx" not in row:
        raise bad("no idx")
    if row.get("label") is None and split not in spec.test_splits:
        raise bad(f"no label, in the {split} split")
    if not isinstance(row.get("text_a"), str):
        raise bad(f"text_a is {row.get('text_a')!r:.40}, not a string")
    b = row.get("text_b")
    if spec.pair and not isinstance(b, str) or not spec.pair and b is not None:
        raise bad(f"text_b is {b!r:.40}: task {spec.name} {'pairs two texts' if spec.pair else 'has one text'}")
    y = row.get("label")
    if y is not None:
        if spec.is_regression:
            ok = isinstance(y, (int, float)) and not isinstance(y, bool) and math.isfinite(y)
        else:
            ok = isinstance(y, int) and not isinstance(y, bool) and 0 <= y < spec.num_labels
        if not ok:
            allowed = "a finite number" if spec.is_regression else f"a class index 0 .. {spec.num_labels - 1}"
            raise bad(f"label {y!r:.40} is not {allowed}")
    return row


def load_task(folder: Path) -> tuple[TaskSpec, dict[str, list[dict[str, Any]]]]:
    """A prepared task folder (``data/raw/tasks/<task>``, what ``prepare`` writes): its spec
    (``task.json``) and its splits (``<split>.jsonl``)."""
    folder = Path(folder)
    spec = TaskSpec.from_dict(read_json(folder / "task.json"), str(folder / "task.json"))
    splits = {p.stem: [_checked_example(spec, row, p.stem, f"{p}: line {n}") for n, row in read_jsonl_lines(p)]
              for p in sorted(folder.glob("*.jsonl"))}
    if not splits.get("train"):
        raise StageError(f"{folder}/train.jsonl: no training examples")
    for name in spec.validation_splits:
        if not splits.get(name):
            raise StageError(f"{folder}/{name}.jsonl: no validation examples")
    return spec, splits


def selection_split(train: Sequence[dict[str, Any]], n: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(kept, held)``: the ``n`` training examples whose text hashes lowest held out (to choose
    a fine-tuning epoch on), the others kept in their order. The same examples are held out
    whatever the order of the file or the seed."""
    def key(i: int) -> bytes:
        r = train[i]
        text = r["text_a"] + ("\0" + r["text_b"] if r.get("text_b") is not None else "")
        return hashlib.blake2b(f"lmcore-select\0{text}".encode(), digest_size=8).digest() + i.to_bytes(8, "big")

    held = set(sorted(range(len(train)), key=key)[:n])
    return [r for i, r in enumerate(train) if i not in held], [train[i] for i in sorted(held)]
