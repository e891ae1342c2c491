"""Stage ``clean``: normalise, filter and de-duplicate documents, then split train/validation.

A stream of documents passes through small steps, each one class: *normalisers* rewrite the text,
*filters* return ``None`` (keep) or a drop reason, the de-duplicator drops repeats. Every step
counts the documents and characters it dropped, per reason; the counts go to MLflow and to the
stage's DVC metrics file. The split is deterministic: a salted hash of the cleaned text decides.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lmcore.config import CleanConfig, TrackingConfig, flatten
from lmcore.io import StageError, atomic_path, read_jsonl, require, write_json

# ---------------------------------------------------------------------------------------------
# normalisers: text -> text


class UnicodeNormalizer:
    name = "unicode"

    def __init__(self, form: str) -> None:
        self.form = form

    def __call__(self, text: str) -> str:
        return unicodedata.normalize(self.form, text)


# C0/C1 controls except tab and newline, plus zero-width characters and the BOM
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200d\u2060\ufeff]")


class ControlCharRemover:
    name = "control_chars"

    def __call__(self, text: str) -> str:
        return _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))


_TRAILING = re.compile(r"[ \t]+\n")
_BLANKS = re.compile(r"\n{3,}")


class WhitespaceNormalizer:
    """Strip trailing spaces on each line, keep at most one blank line in a row, trim ends."""

    name = "whitespace"

    def __call__(self, text: str) -> str:
        return _BLANKS.sub("\n\n", _TRAILING.sub("\n", text)).strip()


# ---------------------------------------------------------------------------------------------
# filters: text -> drop reason or None


@dataclasses.dataclass
class MinLengthFilter:
    min_chars: int
    name: str = "min_length"

    def __call__(self, text: str) -> str | None:
        return "too_short" if len(text) < self.min_chars else None


@dataclasses.dataclass
class MaxLengthFilter:
    max_chars: int
    name: str = "max_length"

    def __call__(self, text: str) -> str | None:
        return "too_long" if len(text) > self.max_chars else None


class ExactDedup:
    """Drop a document whose normalised text hashes like an earlier one."""

    name = "exact_dedup"

    def __init__(self) -> None:
        self.seen: set[bytes] = set()

    def __call__(self, text: str) -> str | None:
        h = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        if h in self.seen:
            return "duplicate"
        self.seen.add(h)
        return None


# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class StepStats:
    docs_in: int = 0
    chars_in: int = 0
    dropped_docs: Counter = dataclasses.field(default_factory=Counter)
    dropped_chars: Counter = dataclasses.field(default_factory=Counter)
    chars_changed: int = 0


class Cleaner:
    """Runs the configured steps over a stream of documents, keeping per-step statistics."""

    def __init__(self, cfg: CleanConfig) -> None:
        self.normalizers: list[Any] = []
        if cfg.normalization != "none":
            self.normalizers.append(UnicodeNormalizer(cfg.normalization))
        self.normalizers += [ControlCharRemover(), WhitespaceNormalizer()]
        self.filters: list[Any] = [MinLengthFilter(cfg.min_chars), MaxLengthFilter(cfg.max_chars)]
        if cfg.dedup:
            self.filters.append(ExactDedup())
        self.stats = {s.name: StepStats() for s in self.normalizers + self.filters}

    def __call__(self, docs: Iterable[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], str | None]]:
        """Yield ``(document, None)`` for kept documents and ``(document, reason)`` for drops."""
        for doc in docs:
            text = doc["text"]
            for step in self.normalizers:
                st = self.stats[step.name]
                st.docs_in += 1
                st.chars_in += len(text)
                new = step(text)
                st.chars_changed += len(text) - len(new) if new != text else 0
                text = new
            doc = {**doc, "text": text}
            reason = None
            for step in self.filters:
                st = self.stats[step.name]
                st.docs_in += 1
                st.chars_in += len(text)
                reason = step(text)
                if reason:
                    st.dropped_docs[reason] += 1
                    st.dropped_chars[reason] += len(text)
                    break
            yield doc, reason

    def summary(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for name, st in self.stats.items():
            out[f"{name}.docs_in"] = st.docs_in
            if st.chars_changed:
                out[f"{name}.chars_removed"] = st.chars_changed
            for reason, n in st.dropped_docs.items():
                out[f"{name}.dropped_docs.{reason}"] = n
                out[f"{name}.dropped_chars.{reason}"] = st.dropped_chars[reason]
        return out


def split_of(text: str, fraction: float, salt: str) -> str:
    """``validation`` for a ``fraction`` of texts chosen by a salted hash, else ``train``."""
    h = hashlib.blake2b(f"{salt}\0{text}".encode("utf-8"), digest_size=8).digest()
    return "validation" if int.from_bytes(h, "big") / 2**64 < fraction else "train"


@dataclasses.dataclass
class CleanResult:
    train: Path
    validation: Path
    stats: dict[str, int]


def clean(cfg: CleanConfig, raw: Path, out: Path, metrics: Path, tracking: TrackingConfig = TrackingConfig()) -> CleanResult:
    """Clean ``raw`` (prepare's ``corpus.jsonl``) into ``out/{train,validation}/*.jsonl`` shards."""
    from lmcore.tracking import stage_run

    raw, out = Path(raw), Path(out)
    corpus = require(raw if raw.suffix == ".jsonl" else raw / "corpus.jsonl", "raw corpus")
    with stage_run("clean", tracking, flatten(cfg, "clean.")) as tr:
        cleaner = Cleaner(cfg)
        counts = Counter()
        chars = Counter()
        with atomic_path(out) as tmp:
            tmp.mkdir()
            for s in ("train", "validation"):
                (tmp / s).mkdir()
            files = {s: open(tmp / s / "00000.jsonl", "w", encoding="utf-8") for s in ("train", "validation")}
            try:
                for doc, reason in tqdm(cleaner(read_jsonl(corpus)), desc="clean", unit="doc", mininterval=2):
                    counts["input"] += 1
                    if reason:
                        counts["dropped"] += 1
                        continue
                    split = split_of(doc["text"], cfg.validation_fraction, cfg.split_salt)
                    counts[split] += 1
                    chars[split] += len(doc["text"])
                    files[split].write(json.dumps(doc, ensure_ascii=False) + "\n")
            finally:
                for f in files.values():
                    f.close()
            if counts["input"] == 0:
                raise StageError(f"{corpus}: the corpus is empty")
            if counts["train"] == 0 or counts["validation"] == 0:
                raise StageError(
                    f"{corpus}: after cleaning, {counts['train']} train and {counts['validation']} validation "
                    f"documents remain (of {counts['input']}); both splits need at least one "
                    "(lower clean.min_chars, change clean.validation_fraction or clean.split_salt, or add data)"
                )
        stats = {
            "documents_in": counts["input"], "documents_dropped": counts["dropped"],
            "train_documents": counts["train"], "validation_documents": counts["validation"],
            "train_chars": chars["train"], "validation_chars": chars["validation"],
            **cleaner.summary(),
        }
        write_json(metrics, stats)
        tr.metrics(stats)
        return CleanResult(out / "train", out / "validation", stats)
