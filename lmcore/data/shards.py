"""Read the token shards written by the ``encode`` stage.

Layout of ``data/tokens/`` (written by :mod:`lmcore.data.encode`):

- ``manifest.json``: dtype, vocabulary size, end-of-text id, tokenizer sha256 and, per split, the
  token, document and UTF-8 byte counts, the source shards with their sha256, and the list of
  token shards (``manifest["splits"][split]["shards"]``, in order).
- per split and input shard ``i`` one token shard: ``<split>.bin`` when the split has a single
  shard, else ``<split>-<i:05d>-of-<n:05d>.bin``: the flat tokens (``uint16`` while the vocabulary
  fits, else ``uint32``, little-endian) of every document followed by the end-of-text token;
- beside it ``<same name>.idx``: ``uint64`` offsets, one per document (where it starts in the
  shard) plus a last one equal to the shard's token count, so document ``j`` is
  ``tokens[idx[j] : idx[j + 1] - 1]`` followed by end-of-text at ``idx[j + 1] - 1``;
- and ``<same name>.bytes``: ``uint64``, the UTF-8 bytes of each document's text as read (before
  the tokenizer's normaliser): the denominator of bits per byte for any first documents.

:class:`TokenShards` shows the shards of one split as one flat read-only array over
``np.memmap``: nothing is read until it is sliced, and a slice inside one shard is a view (no
copy).
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lmcore.core.errors import StageError
from lmcore.core.io import read_json

INDEX_DTYPE = np.dtype("<u8")


def manifest_path(tokens_dir: str | Path) -> Path:
    return Path(tokens_dir) / "manifest.json"


class _Shard(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    file: str
    index: str
    tokens: int = Field(ge=0)
    documents: int = Field(ge=0)


class _Split(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    tokens: int = Field(ge=0)
    documents: int = Field(ge=0)
    shards: list[_Shard]


class _Manifest(BaseModel):
    """What every reader of ``manifest.json`` relies on (the encode stage writes more)."""

    model_config = ConfigDict(extra="allow", strict=True)
    dtype: Literal["uint16", "uint32"]
    vocab_size: int = Field(ge=1)
    eot_id: int = Field(ge=0)
    tokenizer_sha256: str
    splits: dict[str, _Split]


def read_manifest(tokens_dir: str | Path) -> dict[str, Any]:
    """``tokens_dir/manifest.json``, checked for the keys and types its readers use; a damaged or
    hand-edited file is a :class:`StageError` naming the key."""
    path = manifest_path(tokens_dir)
    data = read_json(path)
    try:
        _Manifest.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(map(str, err["loc"])) or "the top level"
        what = "missing" if err["type"] == "missing" else f"{err['msg'].split(' or instance of ')[0]}, not {err['input']!r:.80}"
        raise StageError(f"{path}: {where}: {what}; re-run the encode stage") from None
    return data


def _memmap(path: Path, dtype: np.dtype, count: int, what: str) -> np.ndarray:
    if not path.exists():
        raise StageError(f"{path}: {what} not found (run the encode stage)")
    size = path.stat().st_size
    if size != count * dtype.itemsize:
        raise StageError(f"{path}: {size} bytes, but manifest.json says {count} {what} of {dtype.name} "
                         f"({count * dtype.itemsize} bytes): re-run the encode stage")
    if count == 0:
        return np.empty(0, dtype=dtype)  # mmap cannot map an empty file
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


class TokenShards:
    """The token shards of one split as one flat, read-only array.

    Supports ``len()``, integer indexing, slicing (contiguous slices across shard boundaries give
    a new ``np.ndarray``; inside one shard a view of the memmap), index arrays, ``np.asarray()``
    (a view when there is a single shard), iteration, and documents through the index:
    :meth:`document` and :attr:`n_documents`; with ``document_bytes`` (one array per shard) also
    :meth:`bytes_of_first`.
    """

    def __init__(self, shards: Sequence[np.ndarray], indexes: Sequence[np.ndarray] | None = None,
                 dtype: np.dtype | str | None = None, document_bytes: Sequence[np.ndarray] | None = None):
        if dtype is None:
            if not shards:
                raise ValueError("TokenShards needs at least one shard or a dtype")
            dtype = shards[0].dtype
        self.dtype = np.dtype(dtype)
        self._shards = [np.asarray(s) if not isinstance(s, np.memmap) else s for s in shards]
        if any(s.ndim != 1 or s.dtype != self.dtype for s in self._shards):
            raise ValueError(f"every shard must be a flat array of {self.dtype}")
        # start offset of every shard, plus the total: shard k holds [_starts[k], _starts[k + 1])
        self._starts = np.zeros(len(self._shards) + 1, dtype=np.int64)
        np.cumsum([len(s) for s in self._shards], out=self._starts[1:])
        self._indexes = None if indexes is None else list(indexes)
        if self._indexes is not None:
            if len(self._indexes) != len(self._shards):
                raise ValueError("one index per shard")
            self._doc_starts = np.zeros(len(self._shards) + 1, dtype=np.int64)
            np.cumsum([max(len(ix) - 1, 0) for ix in self._indexes], out=self._doc_starts[1:])
        self._doc_bytes = None if document_bytes is None else list(document_bytes)
        if self._doc_bytes is not None and (self._indexes is None or [len(b) for b in self._doc_bytes]
                                            != [max(len(ix) - 1, 0) for ix in self._indexes]):
            raise ValueError("document_bytes needs the indexes, and one count per document of each shard")

    # ------------------------------------------------------------------------------ opening

    @classmethod
    def open(cls, tokens_dir: str | Path, split: str, manifest: dict[str, Any] | None = None) -> TokenShards:
        """Memory-map the shards of ``split`` listed in ``tokens_dir/manifest.json``."""
        tokens_dir = Path(tokens_dir)
        manifest = read_manifest(tokens_dir) if manifest is None else manifest
        mpath = manifest_path(tokens_dir)
        splits = manifest.get("splits", {})
        if split not in splits:
            raise StageError(f"{mpath}: no split '{split}' (has: {', '.join(sorted(splits)) or 'none'})")
        info = splits[split]
        try:
            dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
            entries = info["shards"]
        except (KeyError, TypeError) as e:
            raise StageError(f"{mpath}: missing key {e} (written by an older lmcore? re-run the encode stage)") \
                from None
        shards, indexes, doc_bytes = [], [], []
        vocab = int(manifest["vocab_size"])
        for e in entries:
            shards.append(_memmap(tokens_dir / e["file"], dtype, int(e["tokens"]), "tokens"))
            # one pass over the shard (memory speed; training reads it all anyway): an id the
            # model has no embedding for would stop training deep inside with an IndexError
            top = int(shards[-1].max()) if len(shards[-1]) else -1
            if top >= vocab:
                raise StageError(f"{tokens_dir / e['file']}: token id {top} is outside the vocabulary of {vocab} "
                                 f"(manifest.json): a damaged shard, or one another tokenizer wrote; re-run the "
                                 "encode stage")
            ix = _memmap(tokens_dir / e["index"], INDEX_DTYPE, int(e["documents"]) + 1, "document offsets")
            if len(ix) and int(ix[-1]) != int(e["tokens"]):
                raise StageError(f"{tokens_dir / e['index']}: last offset {int(ix[-1])} != {e['tokens']} tokens")
            indexes.append(ix)
            if e.get("document_bytes"):
                doc_bytes.append(_memmap(tokens_dir / e["document_bytes"], INDEX_DTYPE, int(e["documents"]),
                                         "document byte counts"))
        total = sum(len(s) for s in shards)
        if total != int(info["tokens"]):
            raise StageError(f"{mpath}: split '{split}' lists {info['tokens']} tokens but its shards hold {total}")
        return cls(shards, indexes, dtype=dtype, document_bytes=doc_bytes if len(doc_bytes) == len(shards) else None)

    # ------------------------------------------------------------------------------ array protocol

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    @property
    def ndim(self) -> int:
        return 1

    @property
    def size(self) -> int:
        return len(self)

    @property
    def nbytes(self) -> int:
        return len(self) * self.dtype.itemsize

    @property
    def shards(self) -> list[np.ndarray]:
        """The per-shard arrays (memmaps), in order."""
        return list(self._shards)

    def __repr__(self) -> str:
        return f"TokenShards({len(self)} tokens of {self.dtype.name} in {len(self._shards)} shard(s))"

    def _locate(self, i: int) -> int:
        """The shard holding flat position ``0 <= i < len(self)`` (empty shards never match)."""
        return int(np.searchsorted(self._starts, i, side="right")) - 1

    def _range(self, start: int, stop: int) -> np.ndarray:
        if stop <= start:
            return np.empty(0, dtype=self.dtype)
        a, b = self._locate(start), self._locate(stop - 1)
        if a == b:
            off = int(self._starts[a])
            return np.asarray(self._shards[a][start - off : stop - off])  # a view of the memmap
        parts = [self._shards[a][start - int(self._starts[a]) :]]
        parts += [self._shards[k] for k in range(a + 1, b)]
        parts.append(self._shards[b][: stop - int(self._starts[b])])
        return np.concatenate(parts)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step == 1:
                return self._range(start, stop)
            if step > 0:
                return self._range(start, stop)[::step].copy() if stop > start else np.empty(0, self.dtype)
            return self._take(np.arange(start, stop, step, dtype=np.int64))
        if isinstance(key, (np.ndarray, list)):
            return self._take(np.asarray(key))
        try:
            i = operator.index(key)
        except TypeError:
            raise TypeError("TokenShards indices must be integers, slices or integer arrays, "
                            f"not {type(key).__name__}") from None
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {key} is out of bounds for {n} tokens")
        k = self._locate(i)
        return self._shards[k][i - int(self._starts[k])]

    def _take(self, idx: np.ndarray) -> np.ndarray:
        if idx.dtype == bool:
            raise TypeError("boolean masks are not supported; use np.asarray(tokens)[mask]")
        idx = idx.astype(np.int64, copy=True)
        n = len(self)
        idx[idx < 0] += n
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"index out of bounds for {n} tokens")
        out = np.empty(idx.shape, dtype=self.dtype)
        shard = np.searchsorted(self._starts, idx, side="right") - 1
        for k in np.unique(shard):
            sel = shard == k
            out[sel] = self._shards[k][idx[sel] - self._starts[k]]
        return out

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        nonempty = [s for s in self._shards if len(s)]
        if len(nonempty) <= 1 and copy is not True:
            arr = np.asarray(nonempty[0]) if nonempty else np.empty(0, dtype=self.dtype)
        elif copy is False:
            raise ValueError("TokenShards over several shards cannot be viewed as one array without a copy")
        else:
            arr = np.concatenate(nonempty) if len(nonempty) > 1 else np.array(nonempty[0] if nonempty else [],
                                                                             dtype=self.dtype)
        if dtype is not None and np.dtype(dtype) != arr.dtype:
            if copy is False:
                raise ValueError(f"converting {self.dtype} to {np.dtype(dtype)} needs a copy")
            arr = arr.astype(dtype)
        return arr

    def __iter__(self) -> Iterator[Any]:
        for s in self._shards:
            yield from s

    def tolist(self) -> list[int]:
        return np.asarray(self).tolist()

    # ------------------------------------------------------------------------------ documents

    @property
    def n_documents(self) -> int:
        """Number of documents (needs the ``.idx`` files)."""
        self._need_index()
        return int(self._doc_starts[-1])

    def _need_index(self) -> None:
        if self._indexes is None:
            raise StageError("these token shards were opened without their .idx document index")

    def document_span(self, i: int) -> tuple[int, int]:
        """Flat ``[start, end)`` of document ``i``'s tokens, its end-of-text token excluded."""
        self._need_index()
        n = self.n_documents
        i = operator.index(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"document {i} is out of bounds for {n} documents")
        k = int(np.searchsorted(self._doc_starts, i, side="right")) - 1
        j = i - int(self._doc_starts[k])
        ix = self._indexes[k]
        base = int(self._starts[k])
        return base + int(ix[j]), base + int(ix[j + 1]) - 1

    def bytes_of_first(self, k: int) -> int | None:
        """UTF-8 bytes of the text of the first ``k`` documents as encode read it, or None for
        shards written without their ``.bytes`` files (an older encode)."""
        if self._doc_bytes is None:
            return None
        if not 0 <= k <= self.n_documents:
            raise IndexError(f"{k} documents of {self.n_documents}")
        total, left = 0, k
        for b in self._doc_bytes:
            take = min(left, len(b))
            total += int(np.asarray(b[:take], dtype=np.uint64).sum())
            left -= take
            if left == 0:
                break
        return total

    def document(self, i: int) -> np.ndarray:
        """The tokens of document ``i`` (in corpus order), without its end-of-text token."""
        start, end = self.document_span(i)
        return self._range(start, end)

    def documents(self) -> Iterator[np.ndarray]:
        """Every document's tokens, in order."""
        for i in range(self.n_documents):
            yield self.document(i)
