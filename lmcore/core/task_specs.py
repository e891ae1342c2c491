"""The labelled tasks lmcore knows: GLUE's nine, the AX diagnostic and Rotten Tomatoes.

A :class:`TaskSpec` says what a task is (labels or regression, metrics, sentence pairs, splits,
leaderboard file names); :data:`TASKS` is the registry. Plain data with no dependencies, so that
the settings (``lmcore.config``) can check task names and the data, training and evaluation code
can share one definition. Loading and scoring tasks is ``lmcore.data.glue``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from lmcore.core.errors import StageError

METRICS = ("accuracy", "f1", "matthews", "pearson", "spearman")
CLASSIFICATION_METRICS = ("accuracy", "f1", "matthews")
REGRESSION_METRICS = ("pearson", "spearman")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    """Registry name (``sst2``, ``rotten_tomatoes``...) or the name of a local task."""
    labels: tuple[str, ...] | None
    """Class names in id order (as the leaderboard spells them); None for a regression task."""
    metrics: tuple[str, ...]
    """Metric names; the task score (on which the epoch kept is chosen) is their mean."""
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
    test_splits: tuple[str, ...] = ("test",)
    """Unlabelled test split names (MNLI: matched, mismatched and the AX diagnostic)."""
    submissions: tuple[tuple[str, str], ...] = ()
    """(test split, file stem) of the prediction files: the GLUE leaderboard names (``CoLA``,
    ``MNLI-m``...) for GLUE tasks, the task name for other tasks."""
    hub_columns: tuple[str, ...] = ()
    """Column names of text_a[, text_b] in ``nyu-mll/glue``."""
    score_range: tuple[float, float] | None = None
    """Range regression predictions are clipped to in prediction files (STS-B: 0-5)."""

    @property
    def num_labels(self) -> int:
        return len(self.labels) if self.labels else 1

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def is_glue(self) -> bool:
        """One of the nine GLUE tasks (it counts in the GLUE score)."""
        return self.name in GLUE_TASKS

    def splits(self) -> list[str]:
        return ["train", *self.validation_splits, *self.test_splits]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any, where: str = "task description") -> "TaskSpec":
        """The spec :meth:`to_dict` wrote; ``where`` (the file, and key) names it in the
        :class:`StageError` a damaged or hand-edited one raises."""
        try:
            if not isinstance(d, dict):
                raise TypeError(f"a JSON object expected, not {type(d).__name__}")
            d = dict(d)
            for k in ("labels", "metrics", "columns", "validation_splits", "test_splits", "hub_columns",
                      "score_range"):
                if d.get(k) is not None:
                    d[k] = tuple(d[k])
            if d.get("submissions") is not None:
                d["submissions"] = tuple(tuple(s) for s in d["submissions"])
            spec = cls(**d)
            if not (isinstance(spec.name, str) and spec.validation_splits and spec.metrics):
                raise TypeError("no name, validation splits or metrics")
            return spec
        except (TypeError, ValueError) as e:
            raise StageError(f"{where}: not a task description as lmcore writes it ({e}); re-run the stage that "
                             "wrote it") from None


BINARY = ("0", "1")
NLI3 = ("entailment", "neutral", "contradiction")
NLI2 = ("entailment", "not_entailment")
GLUE_TASKS = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli")
"""The nine GLUE tasks, in the order of the leaderboard."""

TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec("cola", BINARY, ("matthews",), False, "CoLA", "cola", ("sentence", "label"),
                 submissions=(("test", "CoLA"),), hub_columns=("sentence",)),
        TaskSpec("sst2", BINARY, ("accuracy",), False, "SST-2", "sst2", ("sentence", "label"),
                 submissions=(("test", "SST-2"),), hub_columns=("sentence",)),
        TaskSpec("mrpc", BINARY, ("f1", "accuracy"), True, "MRPC", "mrpc", ("#1 String", "#2 String", "Quality"),
                 submissions=(("test", "MRPC"),), hub_columns=("sentence1", "sentence2")),
        TaskSpec("stsb", None, ("pearson", "spearman"), True, "STS-B", "stsb", ("sentence1", "sentence2", "score"),
                 submissions=(("test", "STS-B"),), hub_columns=("sentence1", "sentence2"), score_range=(0.0, 5.0)),
        TaskSpec("qqp", BINARY, ("f1", "accuracy"), True, "QQP", "qqp", ("question1", "question2", "is_duplicate"),
                 submissions=(("test", "QQP"),), hub_columns=("question1", "question2")),
        TaskSpec("mnli", NLI3, ("accuracy",), True, "MNLI", "mnli", ("sentence1", "sentence2", "gold_label"),
                 validation_splits=("validation_matched", "validation_mismatched"),
                 test_splits=("test_matched", "test_mismatched", "test_ax"),
                 submissions=(("test_matched", "MNLI-m"), ("test_mismatched", "MNLI-mm"), ("test_ax", "AX")),
                 hub_columns=("premise", "hypothesis")),
        TaskSpec("qnli", NLI2, ("accuracy",), True, "QNLI", "qnli", ("question", "sentence", "label"),
                 submissions=(("test", "QNLI"),), hub_columns=("question", "sentence")),
        TaskSpec("rte", NLI2, ("accuracy",), True, "RTE", "rte", ("sentence1", "sentence2", "label"),
                 submissions=(("test", "RTE"),), hub_columns=("sentence1", "sentence2")),
        TaskSpec("wnli", BINARY, ("accuracy",), True, "WNLI", "wnli", ("sentence1", "sentence2", "label"),
                 submissions=(("test", "WNLI"),), hub_columns=("sentence1", "sentence2")),
        # the diagnostic: no training data, predictions only, with the MNLI model (its test_ax split)
        TaskSpec("ax", NLI3, (), True, "diagnostic", "ax", ("sentence1", "sentence2", "label"),
                 validation_splits=(), submissions=(("test", "AX"),), hub_columns=("premise", "hypothesis")),
        TaskSpec("rotten_tomatoes", ("rotten", "fresh"), ("accuracy", "f1"), test_splits=()),
    ]
}

LEADERBOARD_FILES = ("CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI-m", "MNLI-mm", "QNLI", "RTE", "WNLI", "AX")
"""The files of a GLUE leaderboard submission (``<name>.tsv``), in the order of the leaderboard."""

def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        raise StageError(f"unknown task '{name}'; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def custom_spec(name: str, labels: Sequence[str] | None, metrics: Sequence[str] | None, pair: bool) -> TaskSpec:
    """The spec of a task read from local files that is not in the registry: classification with
    ``labels`` (default metric accuracy) or regression when ``labels`` is None (Pearson and
    Spearman)."""
    if metrics is None:
        metrics = ("accuracy",) if labels else REGRESSION_METRICS
    return TaskSpec(name, tuple(labels) if labels else None, tuple(metrics), pair, submissions=(("test", name),))


def glue_splits(spec: TaskSpec) -> list[str]:
    """Splits of a registry task, in order (MNLI's include its AX diagnostic split)."""
    return spec.splits()


def split_suffix(spec: TaskSpec, split: str) -> str:
    """Suffix of a validation split's metric names: none for a single validation split, else
    ``_matched`` / ``_mismatched`` (MNLI)."""
    return "" if len(spec.validation_splits) == 1 else "_" + split.removeprefix("validation_")


def metric_keys(spec: TaskSpec) -> list[str]:
    """The numbers a task reports: its metrics on each validation split (MNLI:
    ``accuracy_matched``, ``accuracy_mismatched``)."""
    return [f"{m}{split_suffix(spec, s)}" for s in spec.validation_splits for m in spec.metrics]
