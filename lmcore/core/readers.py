"""Readers: turn files (or a hub dataset) into a stream of documents ``{"text", "source", "id"}``.

Formats, chosen by file name: plain text (``.txt``, ``.md``, ``.text``: one document per file or
per blank-line-separated block), JSONL (``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``), parquet and
CSV. Bad input is never fatal for a whole corpus and never silent: binary files, lines that are
not valid UTF-8, lines that are not JSON objects and records without the text field are skipped
and counted per file in :class:`ReadStats` (with the first line numbers), which the stage writes to
its metrics and prints as warnings.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from lmcore.core.errors import StageError

TEXT_SUFFIXES = (".txt", ".md", ".text")
SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet", ".csv")
MAX_EXAMPLES = 5  # line numbers remembered per kind of problem and file


@dataclasses.dataclass
class FileProblems:
    """What went wrong in one file: counts per kind, and the first line numbers of each."""

    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    lines: dict[str, list[int]] = dataclasses.field(default_factory=dict)

    def add(self, kind: str, line: int | None = None) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if line is not None and len(self.lines.setdefault(kind, [])) < MAX_EXAMPLES:
            self.lines[kind].append(line)


@dataclasses.dataclass
class ReadStats:
    """Documents read, and problems per file."""

    files: int = 0
    documents: int = 0
    problems: dict[str, FileProblems] = dataclasses.field(default_factory=dict)

    def problem(self, path: Path, kind: str, line: int | None = None) -> None:
        self.problems.setdefault(str(path), FileProblems()).add(kind, line)

    def totals(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for fp in self.problems.values():
            for kind, n in fp.counts.items():
                out[kind] = out.get(kind, 0) + n
        return out

    def warnings(self) -> list[str]:
        """One line per file with problems, naming the file, the problem and the first lines."""
        return warning_lines(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return {"files": self.files, "documents": self.documents, "skipped": self.totals(),
                "problems": {p: dataclasses.asdict(fp) for p, fp in sorted(self.problems.items())}}


def warning_lines(report: dict[str, Any]) -> list[str]:
    """The warning lines of a :meth:`ReadStats.to_dict` report (also after crossing processes)."""
    out = []
    for path, fp in sorted(report.get("problems", {}).items()):
        parts = []
        for kind, n in sorted(fp["counts"].items()):
            where = fp["lines"].get(kind)
            parts.append(f"{n} {kind.replace('_', ' ')}" + (f" (line {', '.join(map(str, where))})" if where else ""))
        out.append(f"{path}: skipped {'; '.join(parts)}")
    return out


def _open_binary(path: Path) -> IO[bytes]:
    name = path.name
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
    return open(path, "rb")


def _is_binary(head: bytes) -> bool:
    return b"\x00" in head


def read_text_file(path: Path, unit: str, stats: ReadStats) -> Iterator[dict[str, Any]]:
    """One document per file (``unit='file'``) or per blank-line-separated block."""
    raw = path.read_bytes()
    if _is_binary(raw[:8192]):
        stats.problem(path, "binary_file")
        return
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        lines = []
        for lineno, line in enumerate(raw.split(b"\n"), 1):
            try:
                lines.append(line.decode("utf-8"))
            except UnicodeDecodeError:
                stats.problem(path, "invalid_utf8_line", lineno)
        text = "\n".join(lines)
    if unit == "file":
        if text.strip():
            yield {"text": text, "source": str(path), "id": path.stem}
        return
    for i, block in enumerate(b for b in text.split("\n\n") if b.strip()):
        yield {"text": block, "source": str(path), "id": f"{path.stem}:{i}"}


def read_jsonl_file(path: Path, field: str, stats: ReadStats) -> Iterator[dict[str, Any]]:
    with _open_binary(path) as f:
        buffered = io.BufferedReader(f) if not hasattr(f, "peek") else f
        if _is_binary(buffered.peek(8192)[:8192]):
            stats.problem(path, "binary_file")
            return
        for lineno, raw in enumerate(buffered, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                stats.problem(path, "invalid_utf8_line", lineno)
                continue
            except json.JSONDecodeError:
                stats.problem(path, "invalid_json_line", lineno)
                continue
            text = obj.get(field) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                stats.problem(path, f"records_without_{field}", lineno)
                continue
            doc = {"source": str(path), "id": f"{path.name.split('.')[0]}:{lineno}", **obj}  # keep metadata
            if field != "text":
                doc["text"] = doc.pop(field)
            yield doc


def read_parquet_file(path: Path, field: str, stats: ReadStats) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several error types for bad files
        stats.problem(path, f"unreadable_parquet ({type(e).__name__})")
        return
    if field not in pf.schema_arrow.names:
        raise StageError(f"{path}: no column '{field}' (columns: {pf.schema_arrow.names})")
    row = 0
    for batch in pf.iter_batches(columns=[field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            row += 1
            if isinstance(text, str) and text:
                yield {"text": text, "source": str(path), "id": f"{path.stem}:{row}"}
            else:
                stats.problem(path, f"records_without_{field}", row)


def read_csv_file(path: Path, field: str, stats: ReadStats) -> Iterator[dict[str, Any]]:
    with open(path, "rb") as f:
        if _is_binary(f.read(8192)):
            stats.problem(path, "binary_file")
            return
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or field not in reader.fieldnames:
            raise StageError(f"{path}: no column '{field}' (header: {reader.fieldnames})")
        for row in reader:
            text = row.get(field)
            lineno = reader.line_num
            if text is None:
                stats.problem(path, "malformed_csv_row", lineno)
                continue
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                stats.problem(path, "invalid_utf8_line", lineno)
                continue
            if text:
                yield {"text": text, "source": str(path), "id": f"{path.stem}:{lineno}"}


def reader_for(path: Path, field: str, unit: str) -> Callable[[ReadStats], Iterator[dict[str, Any]]] | None:
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst")):
        return lambda st: read_jsonl_file(path, field, st)
    if name.endswith(".parquet"):
        return lambda st: read_parquet_file(path, field, st)
    if name.endswith(".csv"):
        return lambda st: read_csv_file(path, field, st)
    if name.endswith(TEXT_SUFFIXES):
        return lambda st: read_text_file(path, unit, st)
    return None


def list_files(paths: list[str]) -> list[Path]:
    """Files named directly, and files with a known suffix inside folders, in a stable order."""
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise StageError(f"{p}: corpus path not found (prepare.corpus.paths)")
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(SUFFIXES))
        else:
            out.append(p)
    return out


def read_files(paths: list[str], field: str, unit: str, stats: ReadStats) -> Iterator[dict[str, Any]]:
    """Documents of every file under ``paths``; files of unknown type are skipped and counted."""
    for f in list_files(paths):
        read = reader_for(f, field, unit)
        stats.files += 1
        if read is None:
            stats.problem(f, "unknown_file_type")
            continue
        for doc in read(stats):
            stats.documents += 1
            yield doc


def read_hub(dataset: str, config: str | None, split: str, field: str, stats: ReadStats) -> Iterator[dict[str, Any]]:
    """A Hugging Face hub dataset in streaming mode (needs network)."""
    try:
        import datasets

        ds = datasets.load_dataset(dataset, config, split=split, streaming=True)
        for i, row in enumerate(ds):
            text = row.get(field)
            if not isinstance(text, str):
                stats.problem(Path(f"hf://{dataset}"), f"records_without_{field}", i)
                continue
            stats.documents += 1
            yield {"text": text, "source": f"hf://{dataset}", "id": f"{split}:{i}"}
    except StageError:
        raise
    except Exception as e:  # noqa: BLE001 - offline, datasets raises several kinds of errors
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise StageError(
            f"could not read hub dataset {dataset} ({type(e).__name__}: {first}); without network, "
            "download it elsewhere and point prepare.corpus (kind: files) at the files"
        ) from None
