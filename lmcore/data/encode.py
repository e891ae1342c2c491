"""Stage ``encode``: tokenize the clean splits into token shards.

Input shard ``i`` of a split (``clean/<split>/*.jsonl``, sorted by name) becomes token shard ``i``
(``<split>.bin`` when the split has one shard, else ``<split>-<i:05d>-of-<n:05d>.bin``): the tokens
of every document followed by the end-of-text token, as uint16 while the vocabulary fits (else
uint32), plus ``<same name>.idx`` with the uint64 start offset of every document and the shard's
token count, and ``<same name>.bytes`` with the UTF-8 bytes of every document's text as it was
read (before the tokenizer's normaliser; the layout is described in :mod:`lmcore.data.shards`). ``manifest.json`` records the
dtype, vocabulary size, end-of-text id, the tokenizer's sha256 and, per split, the token, document
and UTF-8 byte counts, the source shards with their sha256, and the token shards.

Shards are encoded by a pool of ``encode.workers`` processes (see :func:`plan_workers`; a single
process uses the tokenizer's own threads instead), each streaming its input in batches of
``encode.batch_size`` documents: memory is bounded by a batch per worker, whatever the corpus
size. Each output depends only on its input shard and the tokenizer, so the output is
byte-identical whatever the number of workers. Special-token strings inside a document are
encoded as plain text: the only end-of-text tokens are the ones after each document. These rules
are :func:`encode_batches` (with :func:`lmcore.data.tokenizer.specials_as_text`), which the evaluate stage uses too, to
score held-out text exactly as the model saw its training text.

Read the shards with :func:`load_tokens` (a :class:`lmcore.data.shards.TokenShards` over ``np.memmap``:
no copy) and the manifest with :func:`load_manifest`.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import json
import logging
import multiprocessing as mp
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lmcore.config import EncodeConfig, TrackingConfig, flatten
from lmcore.core.errors import StageError
from lmcore.core.io import atomic_path, require, sha256_file, split_shards, write_json
from lmcore.data import tokenizer as tokmod
from lmcore.data.shards import INDEX_DTYPE, TokenShards, read_manifest
from lmcore.data.tokenizer import BATCH_CHARS, batched, load
from lmcore.tracking import stage_run

log = logging.getLogger(__name__)

SPLITS = ("train", "validation")
FORMAT = "lmcore-token-shards/3"


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def load_manifest(tokens_dir: Path) -> dict[str, Any]:
    return read_manifest(tokens_dir)


def load_tokens(tokens_dir: Path, split: str) -> TokenShards:
    """The tokens of one split: a read-only flat view over the memmapped shards (``len()``,
    slicing across shards, ``np.asarray()``, ``.document(i)``)."""
    return TokenShards.open(tokens_dir, split)


def shard_name(split: str, i: int, n: int) -> str:
    return split if n == 1 else f"{split}-{i:05d}-of-{n:05d}"


# --------------------------------------------------------------------------------------------
# the rules: documents to token ids


def encode_batches(tok, texts: Iterable[str], batch_size: int, eot: int) -> Iterator[tuple[list[str], list[list[int]]]]:
    """Documents encoded as the encode stage encodes them: ``(texts, ids)`` per batch of at most
    ``batch_size`` documents holding up to ``BATCH_CHARS`` characters (the memory bound), where the
    ids of each document end with ``eot``. ``tok`` must encode special-token strings as plain text
    (:func:`lmcore.data.tokenizer.specials_as_text`; the stage's own tokenizers always do)."""
    if not tok.encode_special_tokens:
        raise ValueError("encode_batches: the tokenizer must encode special-token strings as text "
                         "(use specials_as_text)")
    for batch in batched(texts, batch_size, max_chars=BATCH_CHARS):
        docs = []
        for enc in tok.encode_batch_fast(batch):
            ids = enc.ids  # a new list
            ids.append(eot)
            docs.append(ids)
        yield batch, docs


# --------------------------------------------------------------------------------------------
# one shard (runs in a worker process, or in this one)


@dataclasses.dataclass(frozen=True)
class ShardJob:
    split: str
    source: str  # path of the input shard
    source_name: str  # relative to the clean folder, for the manifest
    out_bin: str
    out_idx: str
    out_bytes: str
    tokenizer: str
    eot: int
    dtype: str
    batch_size: int


_TOKENIZERS: dict[tuple[str, int, int], Any] = {}


def _tokenizer(path: str):
    """The tokenizer of ``path``, loaded once per process while the file stays the same (a
    tokenizer trained again at the same path, in the same process, is loaded again)."""
    st = os.stat(path)
    key = (path, st.st_mtime_ns, st.st_size)
    tok = _TOKENIZERS.get(key)
    if tok is None:
        tok = load(path)
        tok.encode_special_tokens = True  # "<|endoftext|>" in a document is text, not a separator
        _TOKENIZERS.clear()
        _TOKENIZERS[key] = tok
    return tok


def _texts(path: Path, sha: Any):
    """The ``text`` of every line of a JSONL shard; updates ``sha`` with the file's bytes."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            sha.update(raw)
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except UnicodeDecodeError as e:
                raise StageError(f"{path}: line {lineno}: invalid UTF-8 ({e.reason})") from None
            except json.JSONDecodeError as e:
                raise StageError(f"{path}: line {lineno}: not valid JSON ({e.msg})") from None
            text = obj.get("text") if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise StageError(f"{path}: line {lineno}: expected a JSON object with a string field 'text'")
            yield text


def encode_shard(job: ShardJob, progress: Any = None) -> dict[str, Any]:
    """Encode one input shard into ``job.out_bin``, ``job.out_idx`` and ``job.out_bytes``; return
    its counts."""
    tok = _tokenizer(job.tokenizer)
    dtype, eot = np.dtype(job.dtype), job.eot
    sha = hashlib.sha256()
    n_tok = n_docs = n_bytes = 0
    with open(job.out_bin, "wb") as fb, open(job.out_idx, "wb") as fi, open(job.out_bytes, "wb") as fy:

        def flush(docs: list[list[int]]) -> None:
            nonlocal n_tok, n_docs
            flat: list[int] = []
            starts = np.empty(len(docs), dtype=INDEX_DTYPE)
            for k, ids in enumerate(docs):
                starts[k] = n_tok + len(flat)
                flat += ids
            fb.write(np.array(flat, dtype=dtype).tobytes())
            fi.write(starts.tobytes())
            n_tok += len(flat)
            n_docs += len(docs)
            if progress is not None:
                progress(len(docs))

        for batch, docs in encode_batches(tok, _texts(Path(job.source), sha), job.batch_size, eot):
            sizes = np.array([len(t.encode("utf-8")) for t in batch], dtype=INDEX_DTYPE)
            fy.write(sizes.tobytes())
            n_bytes += int(sizes.sum())
            flush(docs)
        fi.write(np.array([n_tok], dtype=INDEX_DTYPE).tobytes())
    return {"tokens": n_tok, "documents": n_docs, "bytes": n_bytes, "source_sha256": sha.hexdigest()}


def _init_worker(threads: int) -> None:
    if threads == 1:
        # a forked worker: the tokenizer must not use its thread pool (if the parent process
        # already used it, its threads do not exist here and a parallel call would hang)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    else:
        os.environ["RAYON_NUM_THREADS"] = str(threads)  # read when the tokenizer first runs in parallel


def plan_workers(cfg: EncodeConfig, sizes: list[int], cores: int | None = None) -> tuple[int, int | None]:
    """(worker processes, tokenizer threads per worker; None: tokenizers' default, all cores).

    Default (``workers: null``): one process with the tokenizer's threads when there is one core
    or one job, or when the biggest input shard is more than half of the input (a pool of
    single-threaded workers would wait on it); else one single-threaded worker per core.
    """
    cores = cores or os.cpu_count() or 1
    n = len(sizes)
    if cfg.workers is None:
        if cores == 1 or n <= 1 or max(sizes) * 2 > sum(sizes):
            return 1, None
        workers = min(cores, n)
    else:
        workers = max(1, min(cfg.workers, n))
    if workers == 1:
        return 1, None
    return workers, cfg.threads or max(1, cores // workers)


# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EncodeResult:
    manifest: Path
    tokens: dict[str, int]


def encode(cfg: EncodeConfig, clean_dir: Path, tokenizer_dir: Path, out: Path, metrics: Path,
           tracking: TrackingConfig = TrackingConfig()) -> EncodeResult:
    """Encode ``clean_dir/{train,validation}/*.jsonl`` with the tokenizer into ``out``."""


    clean_dir, out = Path(clean_dir), Path(out)
    tok_path = require(Path(tokenizer_dir) / "tokenizer.json", "tokenizer")
    tok = tokmod.load(tok_path)
    eot = tokmod.special_ids(tok).eot
    vocab_size = tok.get_vocab_size()
    dtype = dtype_for(vocab_size)
    sources = {split: split_shards(clean_dir, split) for split in SPLITS}
    with stage_run("encode", tracking, flatten(cfg, "encode."), inputs=[clean_dir, tokenizer_dir],
                   outputs=[out]) as tr:
        t0 = time.perf_counter()
        with atomic_path(out) as tmp:
            tmp.mkdir()
            jobs: list[ShardJob] = []
            for split, srcs in sources.items():
                for i, src in enumerate(srcs):
                    name = shard_name(split, i, len(srcs))
                    jobs.append(ShardJob(split, str(src), src.relative_to(clean_dir).as_posix(),
                                         str(tmp / f"{name}.bin"), str(tmp / f"{name}.idx"),
                                         str(tmp / f"{name}.bytes"), str(tok_path), eot, dtype.str, cfg.batch_size))
            results, workers = _run(jobs, cfg, tqdm)
            manifest: dict[str, Any] = {
                "format": FORMAT, "dtype": dtype.name, "index_dtype": "uint64", "vocab_size": vocab_size,
                "eot_id": eot, "tokenizer_sha256": sha256_file(tok_path), "splits": {}}
            for split in SPLITS:
                entries = [(j, r) for j, r in zip(jobs, results) if j.split == split]
                info = {k: sum(r[k] for _, r in entries) for k in ("tokens", "documents", "bytes")}
                if info["tokens"] == 0:
                    raise StageError(f"{clean_dir / split}: no documents to encode")
                info["sources"] = {j.source_name: r["source_sha256"] for j, r in entries}
                info["shards"] = [{"file": Path(j.out_bin).name, "index": Path(j.out_idx).name,
                                   "document_bytes": Path(j.out_bytes).name, "source": j.source_name,
                                   "source_sha256": r["source_sha256"], "tokens": r["tokens"],
                                   "documents": r["documents"], "bytes": r["bytes"]} for j, r in entries]
                manifest["splits"][split] = info
            write_json(tmp / "manifest.json", manifest)
        seconds = time.perf_counter() - t0
        counts = {s: v["tokens"] for s, v in manifest["splits"].items()}
        total_tokens = sum(counts.values())
        total_bytes = sum(v["bytes"] for v in manifest["splits"].values())
        m = {**{f"{s}_tokens": n for s, n in counts.items()},
             **{f"{s}_documents": v["documents"] for s, v in manifest["splits"].items()},
             "bytes_per_token": total_bytes / max(total_tokens, 1),
             "tokens_per_second": total_tokens / max(seconds, 1e-9)}
        write_json(metrics, m)
        tr.metrics({**m, "seconds": seconds, "workers": workers})
        log.info("encode: %d tokens from %.1f MB in %d shard(s) in %.1f s (%.0f tokens/s, %d worker(s))",
                 total_tokens, total_bytes / 1e6, len(jobs), seconds, m["tokens_per_second"], workers)
        tr.artifact(out / "manifest.json")
        return EncodeResult(out / "manifest.json", counts)


def _run(jobs: list[ShardJob], cfg: EncodeConfig, tqdm: Any) -> tuple[list[dict[str, Any]], int]:
    """Encode every job; return the results in the order of ``jobs`` and the worker count."""
    sizes = [os.path.getsize(j.source) for j in jobs]
    workers, threads = plan_workers(cfg, sizes)
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    if workers == 1:  # in this process, with the tokenizer's own threads
        with tqdm(desc="encode", unit="doc", mininterval=2) as bar:
            for k, job in enumerate(jobs):
                results[k] = encode_shard(job, bar.update)
        return results, 1  # type: ignore[return-value]
    # single-threaded workers are forked (cheap); multi-threaded ones need a fresh interpreter,
    # since the tokenizer's thread pool does not survive a fork. The biggest shards go first.
    method = "fork" if threads == 1 and "fork" in mp.get_all_start_methods() else "spawn"
    order = sorted(range(len(jobs)), key=lambda k: -sizes[k])
    with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context(method), initializer=_init_worker,
                                initargs=(threads,)) as pool, \
            tqdm(total=sum(sizes), desc="encode", unit="B", unit_scale=True, mininterval=2) as bar:
        futures = {pool.submit(encode_shard, jobs[k]): k for k in order}
        for fut in cf.as_completed(futures):
            k = futures[fut]
            results[k] = fut.result()
            bar.update(sizes[k])
    return results, workers  # type: ignore[return-value]
