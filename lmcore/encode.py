"""Stage ``encode``: tokenize the clean splits into flat binary token files.

``out/{split}.bin`` holds the tokens of every document followed by the end-of-text token, as
uint16 while the vocabulary fits (else uint32); ``out/manifest.json`` records per split the
token, document and UTF-8 byte counts, the dtype and the tokenizer's sha256. Read them with
:func:`load_tokens` (a ``np.memmap``, no copy).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lmcore.config import EncodeConfig, TrackingConfig, flatten
from lmcore.io import StageError, atomic_path, iter_field, read_json, require, sha256_file, split_shards, write_json

SPLITS = ("train", "validation")


def dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def load_manifest(tokens_dir: Path) -> dict[str, Any]:
    return read_json(Path(tokens_dir) / "manifest.json")


def load_tokens(tokens_dir: Path, split: str) -> np.memmap:
    """The tokens of one split as a read-only memmap."""
    manifest = load_manifest(tokens_dir)
    if split not in manifest["splits"]:
        raise StageError(f"{tokens_dir}: no split '{split}' in manifest.json")
    path = require(Path(tokens_dir) / f"{split}.bin", f"{split} tokens")
    return np.memmap(path, dtype=np.dtype(manifest["dtype"]), mode="r")


def _write_batch(f, tok, texts: list[str], eot: int, dtype: np.dtype) -> int:
    """Encode texts (the tokenizer runs them in parallel) and append each, plus end-of-text."""
    n = 0
    for enc in tok.encode_batch(texts):
        arr = np.asarray(enc.ids + [eot], dtype=dtype)
        f.write(arr.tobytes())
        n += len(arr)
    return n


@dataclasses.dataclass
class EncodeResult:
    manifest: Path
    tokens: dict[str, int]


def encode(cfg: EncodeConfig, clean_dir: Path, tokenizer_dir: Path, out: Path, metrics: Path,
           tracking: TrackingConfig = TrackingConfig()) -> EncodeResult:
    from lmcore import tokenizer as tokmod
    from lmcore.tracking import stage_run

    clean_dir, out = Path(clean_dir), Path(out)
    tok_path = require(Path(tokenizer_dir) / "tokenizer.json", "tokenizer")
    tok = tokmod.load(tok_path)
    eot = tokmod.special_ids(tok).eot
    dtype = dtype_for(tok.get_vocab_size())
    with stage_run("encode", tracking, flatten(cfg, "encode.")) as tr:
        manifest: dict[str, Any] = {"dtype": dtype.name, "vocab_size": tok.get_vocab_size(), "eot_id": eot,
                                    "tokenizer_sha256": sha256_file(tok_path), "splits": {}}
        t0 = time.perf_counter()
        with atomic_path(out) as tmp:
            tmp.mkdir()
            for split in SPLITS:
                srcs = split_shards(clean_dir, split)
                n_tok = n_docs = n_bytes = 0
                with open(tmp / f"{split}.bin", "wb") as f:
                    batch: list[str] = []
                    for text in tqdm(iter_field(srcs), desc=f"encode {split}", unit="doc", mininterval=2):
                        batch.append(text)
                        n_docs += 1
                        n_bytes += len(text.encode("utf-8"))
                        if len(batch) >= cfg.batch_size:
                            n_tok += _write_batch(f, tok, batch, eot, dtype)
                            batch = []
                    n_tok += _write_batch(f, tok, batch, eot, dtype)
                if n_tok == 0:
                    raise StageError(f"{clean_dir / split}: no documents to encode")
                manifest["splits"][split] = {"tokens": n_tok, "documents": n_docs, "bytes": n_bytes,
                                             "sources": {str(s): sha256_file(s) for s in srcs}}
            write_json(tmp / "manifest.json", manifest)
        seconds = time.perf_counter() - t0
        counts = {s: v["tokens"] for s, v in manifest["splits"].items()}
        total_bytes = sum(v["bytes"] for v in manifest["splits"].values())
        m = {**{f"{s}_tokens": n for s, n in counts.items()},
             "bytes_per_token": total_bytes / max(sum(counts.values()), 1),
             "tokens_per_second": sum(counts.values()) / max(seconds, 1e-9)}
        write_json(metrics, m)
        tr.metrics(m)
        tr.artifact(out / "manifest.json")
        return EncodeResult(out / "manifest.json", counts)
