"""Atomic writes, hashing and JSONL helpers shared by every stage.

Every output goes to a temporary name in the same folder and is renamed into place only when it
is complete, so a failed or killed stage never leaves a half-written file that a later stage
would trust.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from lmcore.core import readers
from lmcore.core.errors import StageError


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _writer() -> str:
    """Who writes: the host, the process-id namespace (containers sharing a host name and a volume
    do not see each other's processes) and the process id."""
    try:
        namespace = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:  # no /proc (macOS)
        namespace = "0"
    return f"{socket.gethostname()}-{namespace}-{os.getpid()}"


def _remove_stale(path: Path) -> None:
    """Remove the temporary folders that writes of ``path`` by processes of this machine left
    when they died without cleaning up (SIGKILL, the out-of-memory killer): a killed pretraining
    left a whole checkpoint beside its output. A live writer's folder, and those of other machines
    sharing the file system, are left alone (the folder's name holds the host, the process-id
    namespace and the process id: :func:`_writer`)."""
    here = _writer().rsplit("-", 1)[0]
    pattern = re.compile(rf"\.{re.escape(path.name)}\.{re.escape(here)}-(\d+)\.\w+\.tmp")
    for p in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        m = pattern.fullmatch(p.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    Works for files and folders: write a file or create a folder at the yielded path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{_writer()}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if not target.exists():
            raise RuntimeError(f"nothing was written to {path}")
        old = tmp / (path.name + ".old")
        if path.is_dir() and not path.is_symlink():
            os.replace(path, old)  # a folder cannot be renamed over another
        try:
            os.replace(target, path)
        except BaseException:  # interrupted (a signal, Ctrl-C) between the two renames: the old one back
            if old.exists() and not path.exists():
                os.replace(old, path)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sync_tree(path: str | Path, files: bool = True) -> None:
    """Flush a folder to the disk: with ``files``, every file under it (and the folders'
    entries), else only the folder's own entries (after a rename into it)."""
    path = Path(path)
    folders = [path]
    if files:
        for p in sorted(path.rglob("*")):
            if p.is_dir():
                folders.append(p)
            elif p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
    for d in folders:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.exists():
        raise StageError(f"{path}: file not found (has the stage that writes it run?)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise StageError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write rows as JSON lines atomically; return how many were written."""
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False))
            f.write("\n")
            n += 1
    return n


def read_jsonl_lines(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line number, object)`` for each non-blank line of a JSONL file (``.gz`` or
    ``.zst`` compressed or not; a byte-order mark on the first line is accepted); a bad line
    raises :class:`StageError` naming the file and line (the shared reader of
    :mod:`lmcore.core.readers`, strictly)."""

    path = Path(path)
    if not path.exists():
        raise StageError(f"{path}: file not found")
    yield from readers.jsonl_records(path, readers.strict(path))


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield the objects of a JSONL file; a bad line raises :class:`StageError` naming it."""
    for _, obj in read_jsonl_lines(path):
        yield obj


def split_shards(folder: str | Path, split: str) -> list[Path]:
    """The shards of one split of a sharded JSONL dataset: ``folder/<split>/*.jsonl``, sorted."""
    d = Path(folder) / split
    shards = sorted(d.glob("*.jsonl")) if d.is_dir() else []
    if not shards:
        raise StageError(f"{d}: no *.jsonl shards of the {split} split (run the stage that produces it first)")
    return shards


def iter_field(paths: Iterable[str | Path], field: str = "text") -> Iterator[str]:
    """One field (default ``text``) of every object in the given JSONL files, in order."""
    for p in paths:
        for obj in read_jsonl(p):
            yield obj[field]


_HASHED: dict[tuple[int, ...], str] = {}
"""Digests of files already read by this process, by file identity and change times."""
RACY_NS = 2_000_000_000
"""A file changed less than this long before it was read is hashed again at the next call: a
rewrite within the filesystem's timestamp granularity could keep its size and times (git's
"racy" files)."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file's bytes. A process hashes an unchanged file once (the same device,
    inode, size, modification and change times: what DVC's state database keys on), so a flow that
    keys, checks and records a stage on gigabytes of token shards reads them once."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if key in _HASHED:
            return _HASHED[key]
        h = hashlib.sha256()
        while block := f.read(chunk):
            h.update(block)
    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > RACY_NS:
        _HASHED[key] = h.hexdigest()
    return h.hexdigest()


def fingerprint(*paths: str | Path) -> str:
    """A content hash of files and folders (names and bytes), e.g. for cache keys."""
    h = hashlib.sha256()
    for p in paths:
        p = Path(p)
        files = sorted(x for x in p.rglob("*") if x.is_file() and "__pycache__" not in x.parts) if p.is_dir() else [p]
        for f in files:
            h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
            h.update(sha256_file(f).encode() if f.exists() else b"<missing>")
    return h.hexdigest()


def require(path: str | Path, what: str) -> Path:
    """Return ``path`` if it exists, else raise a :class:`StageError` saying what is missing."""
    path = Path(path)
    if not path.exists():
        raise StageError(f"{path}: {what} not found (run the stage that produces it first)")
    return path
