"""Readers: one format detection and one record iterator per format, shared by every stage.

Formats, chosen by file name (:func:`detect_format`): plain text (``.txt``, ``.md``, ``.text``:
one document per file or per blank-line-separated block), JSONL (``.jsonl``, ``.ndjson``, each
optionally ``.gz`` or ``.zst`` compressed), CSV (standard quoting), TSV (quoting off, like the
GLUE files) and parquet; and hub streams (:func:`read_hub`).

Each record iterator yields ``(line or row number, record)`` and reports every problem to a
*sink*: :func:`counting` counts them per file (a corpus: bad input is never fatal for the whole
corpus and never silent), :func:`strict` raises a :class:`StageError` naming the file and line
(a stage's own outputs, held-out texts, task files). :func:`read_files` reads a corpus and keeps
a read report (:class:`ReadStats`) listing every file given or found in a folder as ``read``,
``partly read`` (some records skipped, with counts) or ``skipped`` with the reason (``corrupt
archive``, ``binary``, ``empty``, ``unknown extension``...).
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import gzip
import itertools
import json
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from lmcore.core.errors import MayPass, StageError

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = tuple(base + comp for base in (".jsonl", ".ndjson") for comp in ("", ".gz", ".zst"))
FORMATS: dict[str, str] = {**dict.fromkeys(TEXT_SUFFIXES, "text"), **dict.fromkeys(JSONL_SUFFIXES, "jsonl"),
                           ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
SUFFIXES = tuple(FORMATS)
MAX_EXAMPLES = 5  # line numbers remembered per kind of problem and file
HEAD = 8192  # bytes looked at to tell a binary file

# problem kinds that make a whole file skipped, and the reason the read report gives
SKIP_REASONS = {"corrupt_archive": "corrupt archive", "binary_file": "binary", "empty_file": "empty",
                "unknown_extension": "unknown extension"}

Sink = Callable[[str, "int | None", str], None]  # (kind, line or row number, message)


def detect_format(path: str | Path) -> str | None:
    """``text``, ``jsonl``, ``csv``, ``tsv`` or ``parquet`` from the file name; None if unknown."""
    name = Path(path).name.lower()
    for suffix in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(suffix):
            return FORMATS[suffix]
    return None


# ---------------------------------------------------------------------------------------------
# problems


@dataclasses.dataclass
class FileProblems:
    """What went wrong in one file: counts per kind, and the first line numbers of each."""

    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    lines: dict[str, list[int]] = dataclasses.field(default_factory=dict)

    def add(self, kind: str, line: int | None = None) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if line is not None and len(self.lines.setdefault(kind, [])) < MAX_EXAMPLES:
            self.lines[kind].append(line)


def counting(problems: FileProblems) -> Sink:
    """A sink that counts problems (with their first line numbers) and lets reading go on."""
    return lambda kind, line, message: problems.add(kind, line)


def strict(path: str | Path, note: str = "") -> Sink:
    """A sink that raises a :class:`StageError` naming the file and line at the first problem;
    ``note`` is added to the message of a record without the wanted field."""

    def sink(kind: str, line: int | None, message: str) -> None:
        if note and kind.startswith("records_without_"):
            message += f" ({note})"
        raise StageError(f"{path}: line {line}: {message}" if line is not None else f"{path}: {message}")

    return sink


# ---------------------------------------------------------------------------------------------
# byte streams and lines


class _Broken(Exception):
    """A compressed stream that cannot be decoded: corrupt (nothing came out) or truncated."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind, self.message = kind, message


def _broken(started: bool, e: BaseException) -> _Broken:
    what = f"{type(e).__name__}: {e}"[:200]
    if started:
        return _Broken("truncated_stream", f"truncated or corrupt compressed stream ({what})")
    return _Broken("corrupt_archive", f"corrupt archive ({what})")


def _split_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Lines (each with its ``\\n``, the last one maybe without) of a stream of byte chunks."""
    pending: list[bytes] = []
    for chunk in chunks:
        if b"\n" not in chunk:
            pending.append(chunk)
            continue
        parts = chunk.split(b"\n")
        parts[0] = b"".join([*pending, parts[0]])
        tail = parts.pop()
        pending = [tail] if tail else []
        for p in parts:
            yield p + b"\n"
    if pending and (last := b"".join(pending)):
        yield last


def _zstd_chunks(path: Path, size: int = 1 << 16) -> Iterator[bytes]:
    import zstandard  # lazy: optional dependency, only for .zst files

    dctx = zstandard.ZstdDecompressor()
    obj = None
    started = False
    with open(path, "rb") as f:
        while data := f.read(size):
            while data:
                if obj is None or obj.eof:  # a new frame
                    obj = dctx.decompressobj()
                try:
                    out = obj.decompress(data)
                except zstandard.ZstdError as e:
                    raise _broken(started, e) from None
                if out:
                    started = True
                    yield out
                data = obj.unused_data if obj.eof else b""
    if obj is not None and not obj.eof:
        raise _broken(started, EOFError("the stream ends inside a frame"))


def _open_lines(path: Path) -> Iterator[bytes]:
    """The lines of a file, decompressed by name (``.gz``, ``.zst``); a stream that cannot be
    decoded raises :class:`_Broken`."""
    name = path.name.lower()
    try:
        if name.endswith(".zst"):
            yield from _split_lines(_zstd_chunks(path))
        elif name.endswith(".gz"):
            started = False
            with gzip.open(path, "rb") as f:
                try:
                    for line in f:
                        started = True
                        yield line
                except (OSError, EOFError, zlib.error) as e:
                    raise _broken(started, e) from None
        else:
            with open(path, "rb") as f:
                yield from f
    except _Broken:
        raise
    except OSError as e:
        raise StageError(f"{path}: cannot read ({e.strerror or e})") from None


def _peek(lines: Iterator[bytes], n: int = HEAD) -> tuple[bytes, Iterator[bytes]]:
    """The first ``n`` bytes (at least) of a stream of lines, and the whole stream again."""
    head: list[bytes] = []
    size = 0
    for line in lines:
        head.append(line)
        size += len(line)
        if size >= n:
            break
    return b"".join(head)[:n], itertools.chain(head, lines)


def _is_binary(head: bytes) -> bool:
    return b"\x00" in head


# ---------------------------------------------------------------------------------------------
# one record iterator per format


@dataclasses.dataclass(frozen=True)
class LineProblem:
    kind: str
    message: str


def decode_json_line(raw: bytes, first: bool = False) -> Any:
    """The JSON value of one line, or a :class:`LineProblem` (invalid UTF-8, not valid JSON); a
    byte-order mark is accepted on the first line."""
    try:
        text = raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as e:
        return LineProblem("invalid_utf8_line", f"invalid UTF-8 ({e.reason} at byte {e.start})")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return LineProblem("invalid_json_line", f"not valid JSON ({e.msg})")
    except (ValueError, RecursionError) as e:  # an integer too long, nesting too deep
        return LineProblem("invalid_json_line", f"not valid JSON ({type(e).__name__})")
    if "\\u" in text and _has_lone_surrogate(obj):  # only an escape can write one
        return LineProblem("invalid_utf8_line", "a lone surrogate escape (\\ud800-\\udfff): not text UTF-8 can hold")
    return obj


def _has_lone_surrogate(obj: Any) -> bool:
    """A string anywhere in a decoded JSON value that cannot be written as UTF-8."""
    if isinstance(obj, str):
        return _bad_utf8(obj)
    if isinstance(obj, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in obj.items())
    if isinstance(obj, list):
        return any(_has_lone_surrogate(v) for v in obj)
    return False


def jsonl_records(path: Path, sink: Sink, field: str | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line of a JSONL file; lines that are not
    UTF-8 or not JSON objects (with a string ``field``, when given) go to ``sink``."""
    path = Path(path)
    try:
        head, lines = _peek(_open_lines(path))
        if _is_binary(head):
            sink("binary_file", None, "binary file (NUL bytes)")
            return
        for lineno, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            obj = decode_json_line(raw, first=lineno == 1)
            if isinstance(obj, LineProblem):
                sink(obj.kind, lineno, obj.message)
            elif field is not None and not (isinstance(obj, dict) and isinstance(obj.get(field), str)):
                sink(f"records_without_{field}", lineno, f"expected a JSON object with a string field '{field}'")
            elif not isinstance(obj, dict):
                sink("not_an_object", lineno, "expected a JSON object")
            else:
                yield lineno, obj
    except _Broken as e:
        sink(e.kind, None, e.message)


def text_records(path: Path, sink: Sink, unit: str = "file") -> Iterator[tuple[int, dict[str, str]]]:
    """``(line number, {"text"})``: the whole file (``unit='file'``) or each non-blank block
    between blank lines (``unit='paragraph'``). Lines that are not UTF-8 go to ``sink`` and are
    left out."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise StageError(f"{path}: cannot read ({e.strerror or e})") from None
    if _is_binary(raw[:HEAD]):
        sink("binary_file", None, "binary file (NUL bytes)")
        return
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        lines = []
        for lineno, line in enumerate(raw.split(b"\n"), 1):
            try:
                lines.append(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                sink("invalid_utf8_line", lineno, f"invalid UTF-8 ({e.reason} at byte {e.start})")
        text = "\n".join(lines)
    if unit == "file":
        yield 1, {"text": text}
        return
    text = text.replace("\r\n", "\n").replace("\r", "\n")  # blank lines of Windows and old Mac files too
    # a paragraph ends at a blank line, one holding only spaces and tabs included; each is
    # numbered by its first line
    line, pos = 1, 0
    for m in _PARAGRAPH.finditer(text):
        line += text.count("\n", pos, m.start())
        pos = m.start()
        yield line, {"text": m.group()}


def _bad_utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def csv_rows(path: Path, sink: Sink, tsv: bool = False) -> tuple[list[str] | None, Iterator[tuple[int, list[str]]]]:
    """The header (None for an empty or binary file) and ``(line number, fields)`` of each
    non-empty row of a CSV (standard quoting) or TSV (quoting off) file; a byte-order mark is
    dropped. Bytes that are not UTF-8 come out as surrogates (see :func:`has_bad_utf8`); a row
    the csv module cannot parse goes to ``sink`` and ends the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            binary = _is_binary(f.read(HEAD))
    except OSError as e:
        raise StageError(f"{path}: cannot read ({e.strerror or e})") from None
    if binary:
        sink("binary_file", None, "binary file (NUL bytes)")
        return None, iter(())
    csv.field_size_limit(2**31 - 1)  # a long document is a long field (the default stops at 131,072 characters)
    f = open(path, encoding="utf-8-sig", errors="surrogateescape", newline="")  # noqa: SIM115 - rows() closes it
    reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if tsv else csv.reader(f)
    try:
        header = next(reader, None)
    except csv.Error as e:
        f.close()
        sink("malformed_csv", reader.line_num, str(e))
        return None, iter(())
    if header is None:
        f.close()
        return None, iter(())

    def rows() -> Iterator[tuple[int, list[str]]]:
        with f:
            try:
                for fields in reader:
                    if fields:
                        yield reader.line_num, fields
            except csv.Error as e:
                sink("malformed_csv", reader.line_num, str(e))

    return header, rows()


def has_bad_utf8(values: Iterable[Any]) -> bool:
    """Whether any of the strings of a :func:`csv_rows` row holds bytes that were not UTF-8."""
    return any(isinstance(v, str) and _bad_utf8(v) for v in values)


def parquet_rows(path: Path, sink: Sink, columns: Sequence[str] | None = None
                 ) -> tuple[list[str] | None, Iterator[tuple[int, dict[str, Any]]]]:
    """The column names (None for an unreadable file) and ``(row number, record)`` of each row of
    a parquet file (only ``columns``, if given). A file that cannot be opened goes to ``sink`` as
    a corrupt archive; one that breaks part way ends there, as a truncated stream."""
    path = Path(path)
    try:
        import pyarrow.parquet as pq  # lazy: optional heavy dependency, only for parquet files

        pf = pq.ParquetFile(path)
        names = list(pf.schema_arrow.names)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several error types for bad files
        sink("corrupt_archive", None, f"not a readable parquet file ({type(e).__name__}: {e})"[:300])
        return None, iter(())

    def rows() -> Iterator[tuple[int, dict[str, Any]]]:
        n = 0
        try:
            for batch in pf.iter_batches(columns=list(columns) if columns is not None else None, batch_size=4096):
                for rec in batch.to_pylist():
                    n += 1
                    yield n, rec
        except Exception as e:  # noqa: BLE001 - pyarrow raises several error types for bad files
            sink("truncated_stream", n + 1, f"unreadable parquet data ({type(e).__name__}: {e})"[:300])

    return names, rows()


# ---------------------------------------------------------------------------------------------
# a corpus: documents {"text", "source", "id"} and the read report


@dataclasses.dataclass
class FileStatus:
    """How far one file was read: ``pending`` (not reached), ``reading``, then ``done``."""

    state: str = "pending"
    documents: int = 0
    skip: str | None = None  # a kind of SKIP_REASONS when the whole file was skipped


@dataclasses.dataclass
class ReadStats:
    """Documents read, problems per file, and the status of every file."""

    files: int = 0
    documents: int = 0
    problems: dict[str, FileProblems] = dataclasses.field(default_factory=dict)
    status: dict[str, FileStatus] = dataclasses.field(default_factory=dict)

    def problem(self, path: Path | str, kind: str, line: int | None = None) -> None:
        self.problems.setdefault(str(path), FileProblems()).add(kind, line)

    def sink(self, path: Path | str) -> Sink:
        return lambda kind, line, message: self.problem(path, kind, line)

    def totals(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for fp in self.problems.values():
            for kind, n in fp.counts.items():
                out[kind] = out.get(kind, 0) + n
        return out

    def warnings(self) -> list[str]:
        """One line per file with problems, naming the file, the problem and the first lines."""
        return warning_lines(self.to_dict())

    def file_status(self, path: str) -> dict[str, Any]:
        """``{"status": "read" | "partly read" | "skipped", "documents", ["reason"], ["skipped"]}``."""
        st = self.status[path]
        counts = dict(sorted(self.problems[path].counts.items())) if path in self.problems else {}
        out: dict[str, Any] = {"status": "read", "documents": st.documents}
        if st.state == "pending":
            out.update(status="skipped", reason="not reached (max_documents)")
        elif st.skip is not None and st.documents == 0:
            out.update(status="skipped", reason=SKIP_REASONS.get(st.skip, st.skip.replace("_", " ")))
        elif counts and st.documents == 0:
            out.update(status="skipped", reason="no readable records")
        elif counts:
            out["status"] = "partly read"
        elif st.state == "reading":
            out.update(status="partly read", reason="stopped at max_documents")
        if counts:
            out["skipped"] = counts
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"files": self.files, "documents": self.documents, "skipped": self.totals(),
                "problems": {p: dataclasses.asdict(fp) for p, fp in sorted(self.problems.items())},
                "status": {p: self.file_status(p) for p in self.status}}


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


# a paragraph: consecutive lines that each hold something other than spaces and tabs
_PARAGRAPH = re.compile(r"^[^\n]*\S[^\n]*(?:\n[^\n]*\S[^\n]*)*", re.MULTILINE)


def read_text_file(path: Path, unit: str, stats: ReadStats) -> Iterator[dict[str, Any]]:
    """One document per file (``unit='file'``) or per blank-line-separated block."""
    for i, (_, rec) in enumerate(text_records(path, stats.sink(path), unit)):
        if unit == "file":
            if rec["text"].strip():
                yield {"text": rec["text"], "source": str(path), "id": path.stem}
        else:
            yield {"text": rec["text"], "source": str(path), "id": f"{path.stem}:{i}"}


def read_jsonl_file(path: Path, field: str, stats: ReadStats) -> Iterator[dict[str, Any]]:
    """The records with a string ``field`` (kept as ``text``, other keys kept as metadata)."""
    for lineno, obj in jsonl_records(path, stats.sink(path), field):
        doc = {"source": str(path), "id": f"{path.name.split('.')[0]}:{lineno}", **obj}  # keep metadata
        if field != "text":
            doc["text"] = doc.pop(field)
        yield doc


def read_parquet_file(path: Path, field: str, stats: ReadStats) -> Iterator[dict[str, Any]]:
    names, rows = parquet_rows(path, stats.sink(path), [field])
    if names is not None and field not in names:
        raise StageError(f"{path}: no column '{field}' (columns: {names})")
    for row, rec in rows:
        text = rec.get(field)
        if isinstance(text, str) and text:
            yield {"text": text, "source": str(path), "id": f"{path.stem}:{row}"}
        else:
            stats.problem(path, f"records_without_{field}", row)


def read_csv_file(path: Path, field: str, stats: ReadStats, tsv: bool = False) -> Iterator[dict[str, Any]]:
    header, rows = csv_rows(path, stats.sink(path), tsv)
    if header is None:
        return  # empty or binary: the report says which
    if field not in header:
        raise StageError(f"{path}: no column '{field}' (header: {header})")
    col = len(header) - 1 - header[::-1].index(field)  # the last one, as csv.DictReader does
    for lineno, fields in rows:
        text = fields[col] if col < len(fields) else None
        if text is None:
            stats.problem(path, "malformed_csv_row", lineno)
        elif _bad_utf8(text):
            stats.problem(path, "invalid_utf8_line", lineno)
        elif text:
            yield {"text": text, "source": str(path), "id": f"{path.stem}:{lineno}"}


def reader_for(path: Path, field: str, unit: str) -> Callable[[ReadStats], Iterator[dict[str, Any]]] | None:
    fmt = detect_format(path)
    if fmt == "jsonl":
        return lambda st: read_jsonl_file(path, field, st)
    if fmt == "parquet":
        return lambda st: read_parquet_file(path, field, st)
    if fmt in ("csv", "tsv"):
        return lambda st: read_csv_file(path, field, st, tsv=fmt == "tsv")
    if fmt == "text":
        return lambda st: read_text_file(path, unit, st)
    return None


def expand_paths(paths: Sequence[str | Path], what: str, empty_folder_ok: bool = False) -> list[Path]:
    """Files named by ``paths``: files, folders (every file under them but hidden ones and those in
    hidden folders, sorted)
    and glob patterns (sorted; ``**`` matches subfolders). ``what`` names the setting in errors."""
    out: list[Path] = []
    for p in map(str, paths):
        if glob.has_magic(p):
            found = sorted(Path(f) for f in glob.glob(p, recursive=True) if Path(f).is_file())
            if not found:
                raise StageError(f"{what}: no file matches '{p}'")
            out += found
        elif Path(p).is_dir():
            found = sorted(f for f in Path(p).rglob("*") if f.is_file()  # not under .git, .ipynb_checkpoints...
                           and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found and not empty_folder_ok:
                raise StageError(f"{what}: folder '{p}' holds no files")
            out += found
        elif Path(p).is_file():
            out.append(Path(p))
        else:
            raise StageError(f"{what}: '{p}' not found")
    return out


def list_files(paths: list[str]) -> list[Path]:
    """The files of a corpus (see :func:`expand_paths`), in a stable order."""
    for p in map(str, paths):
        if not glob.has_magic(p) and not Path(p).exists():
            raise StageError(f"{p}: corpus path not found (prepare.corpus.paths)")
    return expand_paths(paths, "prepare.corpus.paths", empty_folder_ok=True)


def read_files(paths: list[str], field: str, unit: str, stats: ReadStats,
               limit: int | None = None) -> Iterator[dict[str, Any]]:
    """Documents of every file under ``paths`` (at most ``limit``); every file gets a status in
    ``stats``: read, partly read, or skipped (unknown extension, binary, corrupt archive,
    empty...). At the limit, the file being read is looked at for one more document: a file
    whose last document was the limit's is read, not partly read; the files after it are not
    reached."""
    files = list_files(paths)
    for f in files:
        stats.status.setdefault(str(f), FileStatus())
    given = 0
    for f in files:
        if limit is not None and given >= limit:
            return
        st = stats.status[str(f)]
        st.state = "reading"
        stats.files += 1
        read = reader_for(f, field, unit)
        if read is None:
            stats.problem(f, "unknown_extension")
        else:
            for doc in read(stats):
                if limit is not None and given >= limit:
                    return  # the file holds more: it stays partly read
                st.documents += 1
                stats.documents += 1
                given += 1
                yield doc
        st.state = "done"
        counts = stats.problems[str(f)].counts if str(f) in stats.problems else {}
        st.skip = next((k for k in SKIP_REASONS if k in counts), None)
        if st.documents == 0 and not counts:
            stats.problem(f, "empty_file")
            st.skip = "empty_file"


def read_texts(paths: Sequence[str | Path], text_field: str = "text", what: str = "texts") -> Iterator[str]:
    """The documents of the files under ``paths`` (see :func:`expand_paths`), in order, strictly:
    a JSONL file gives the ``text_field`` of each line, parquet that column of each row, any other
    file is one document. Empty documents are skipped. Any problem (invalid UTF-8, bad JSON, a
    record without the field, a corrupt archive...) raises :class:`StageError` naming the file
    and line."""
    for path in expand_paths(paths, what):
        sink = strict(path, note=f"the text_field of {what}")
        fmt = detect_format(path)
        if fmt not in ("jsonl", "parquet"):
            for _, rec in text_records(path, sink):
                if rec["text"]:
                    yield rec["text"]
            continue
        if fmt == "jsonl":
            records: Iterator[tuple[int, dict[str, Any]]] = jsonl_records(path, sink, text_field)
        else:
            names, records = parquet_rows(path, sink, [text_field])
            if names is not None and text_field not in names:
                raise StageError(f"{path}: no column '{text_field}' (the text_field of {what}; columns: {names})")
        for n, rec in records:
            text = rec.get(text_field)
            if not isinstance(text, str):
                sink(f"records_without_{text_field}", n, f"expected a string field '{text_field}'")
            elif text:
                yield text


def read_hub(dataset: str, config: str | None, split: str, field: str, stats: ReadStats) -> Iterator[dict[str, Any]]:
    """A Hugging Face hub dataset in streaming mode (needs network)."""
    try:
        import datasets  # lazy: heavy optional dependency, only for hub corpora

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
        raise MayPass(
            f"could not read hub dataset {dataset} ({type(e).__name__}: {first}); without network, "
            "download it elsewhere and point prepare.corpus (kind: files) at the files"
        ) from None
