"""Stage ``clean``: reader -> normalisers -> filters -> de-duplication -> writer, over shards.

The unit of work is one raw shard: :func:`clean_shard` reads it, normalises and filters every
document (one small class per step, each counting what it changed or dropped, per reason), and
writes the surviving documents plus their de-duplication signatures (exact hash, MinHash band
keys) to a work folder. Shards run in a process pool here, or as mapped Prefect tasks on any task
runner (a Dask cluster, for instance). :func:`finalize` then walks the signatures in one global
order (shard, then position) to decide duplicates -- so the output is byte-identical whatever the
number of workers -- splits train/validation by a salted hash of the text, writes
``out/{train,validation}/NNNNN.jsonl`` (and ``out/dropped/`` with reasons, by option), the
statistics and a data report (length histograms, drops per reason). Memory holds one document
at a time per worker plus the signatures, never the corpus.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import hashlib
import json
import logging
import multiprocessing as mp
import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from tqdm import tqdm

from lmcore.config import CleanConfig, TrackingConfig, flatten
from lmcore.core.errors import StageError
from lmcore.core.io import atomic_path, write_json
from lmcore.core.readers import ReadStats, read_jsonl_file, warning_lines
from lmcore.data.clean.dedup import DedupIndex, MinHashConfig, MinHasher, exact_key
from lmcore.data.clean.filters import PerLanguage
from lmcore.data.clean.langid import Language, LanguageIdentifier
from lmcore.data.clean.normalizers import (
    ControlCharRemover,
    MojibakeFixer,
    PIIRedactor,
    UnicodeNormalizer,
    WhitespaceNormalizer,
)
from lmcore.data.clean.registry import make_filters
from lmcore.data.clean.segment import splitter_for
from lmcore.tracking import stage_run

log = logging.getLogger(__name__)

HIST_BINS = np.linspace(0.0, 8.0, 81)  # log10(characters + 1)


# ---------------------------------------------------------------------------------------------
# length filters (the quality filters live in lmcore.data.clean.filters)


@dataclasses.dataclass
class MinLengthFilter:
    """Drops documents shorter than ``min_chars`` characters after normalisation."""

    min_chars: int = 0
    name: ClassVar[str] = "min_length"

    def __call__(self, text: str, lang: Language | None = None) -> str | None:
        return "too_short" if len(text) < max(self.min_chars, 1) else None  # an empty document never stays


@dataclasses.dataclass
class MinLengthAfterFilter(MinLengthFilter):
    """``min_chars`` again after the filters that remove lines (C4's): a document they cut below
    it, or to nothing, is dropped as the setting says ("shorter than this after clean-up")."""

    name: ClassVar[str] = "min_length_after_lines"


@dataclasses.dataclass
class MaxLengthFilter:
    """Drops documents longer than ``max_chars`` characters."""

    max_chars: int = 10**9
    name: ClassVar[str] = "max_length"

    def __call__(self, text: str, lang: Language | None = None) -> str | None:
        return "too_long" if len(text) > self.max_chars else None


def build_steps(cfg: CleanConfig) -> list[tuple[str, Any]]:
    """The configured steps in order, each ``("normalizer" | "identify" | "filter", step)``: the
    normalisers, the language identification (on the normalised text, first ``max_chars`` of the
    language filter's settings), then the filters and the normalisers that need the language."""
    steps: list[tuple[str, Any]] = []
    if cfg.fix_mojibake:
        steps.append(("normalizer", MojibakeFixer()))
    # zero-width and control characters go before Unicode normalisation: removing one between a
    # letter and its combining mark would leave the text out of NFC
    steps.append(("normalizer", ControlCharRemover()))
    if cfg.normalization != "none":
        steps.append(("normalizer", UnicodeNormalizer(cfg.normalization)))
    steps.append(("normalizer", WhitespaceNormalizer()))
    if cfg.redact_pii:
        steps.append(("normalizer", PIIRedactor()))
    language = cfg.filters.get("language")
    filters = [step for name, settings in cfg.filters.items() for step in make_filters(name, settings)]
    steps.append(("identify", LanguageIdentifier(language.max_chars if language is not None else 2000,
                                                 identifies_language(cfg))))
    steps += [("filter", MinLengthFilter(cfg.min_chars)), ("filter", MaxLengthFilter(cfg.max_chars))]
    cutting = any(kind == "normalizer" for kind, _ in filters)  # C4's line removal shortens documents
    return steps + filters + ([("filter", MinLengthAfterFilter(cfg.min_chars))] if cutting else [])


def identifies_language(cfg: CleanConfig) -> bool:
    """Whether the stage identifies each document's language (and tags the record with it): when a
    step reads it (the language filter, a filter with per-language thresholds); else only the
    script is found (MinHash's shingles need no more)."""
    return "language" in cfg.filters or any(
        getattr(settings, "thresholds", None) == "per_language" for settings in cfg.filters.values())


def minhash_config(cfg: CleanConfig) -> MinHashConfig | None:
    """The MinHash settings of ``cfg`` (None: near-duplicate removal is off)."""
    return cfg.minhash


# ---------------------------------------------------------------------------------------------
# statistics


@dataclasses.dataclass
class StepStats:
    docs_in: int = 0
    docs_changed: int = 0
    chars_removed: int = 0
    dropped_docs: Counter = dataclasses.field(default_factory=Counter)
    dropped_chars: Counter = dataclasses.field(default_factory=Counter)
    counts: Counter = dataclasses.field(default_factory=Counter)
    seconds: float = 0.0

    def merge(self, other: StepStats) -> None:
        self.docs_in += other.docs_in
        self.docs_changed += other.docs_changed
        self.chars_removed += other.chars_removed
        self.dropped_docs.update(other.dropped_docs)
        self.dropped_chars.update(other.dropped_chars)
        self.counts.update(other.counts)
        self.seconds += other.seconds


@dataclasses.dataclass
class ShardResult:
    """What :func:`clean_shard` produced for one raw shard."""

    index: int
    kept: Path
    signatures: Path
    dropped: Path | None
    docs_in: int
    chars_in: int
    bytes_in: int
    steps: dict[str, StepStats]
    read: dict[str, Any]
    hist_in: np.ndarray
    seconds: float


def clean_shard(index: int, source: Path, work: Path, cfg: CleanConfig) -> ShardResult:
    """Normalise and filter one raw shard; write the kept documents and their signatures."""
    t0 = time.perf_counter()
    source, work = Path(source), Path(work)
    work.mkdir(parents=True, exist_ok=True)
    steps = build_steps(cfg)

    mh = minhash_config(cfg)
    hasher = MinHasher(mh) if mh is not None else None

    stats = {step.name: StepStats() for _, step in steps}
    read = ReadStats()
    hist = np.zeros(len(HIST_BINS) - 1, dtype=np.int64)
    # fingerprints accumulate as raw bytes (no per-document array objects), saved as .npy files
    # that finalize memory-maps: 16 + 8 * bands + num_perm bytes per kept document
    exact, bands, sigs = bytearray(), bytearray(), bytearray()
    docs_in = chars_in = bytes_in = 0
    kept_path = work / f"{index:05d}.kept.jsonl"
    dropped_path = work / f"{index:05d}.dropped.jsonl" if cfg.write_dropped else None
    with open(kept_path, "w", encoding="utf-8") as kept, \
            (open(dropped_path, "w", encoding="utf-8") if dropped_path else _Null()) as dropped:
        for doc in read_jsonl_file(source, "text", read):
            text = doc["text"]
            docs_in += 1
            chars_in += len(text)
            bytes_in += len(text.encode("utf-8"))
            hist[_bin(len(text))] += 1
            reason = lang = None
            tagged = False
            for kind, step in steps:
                st = stats[step.name]
                st.docs_in += 1
                ts = time.perf_counter()
                if kind == "identify":
                    lang = step(text)
                    tagged = step.languages
                elif isinstance(step, PerLanguage) and step.for_language(lang) is None:
                    st.counts[f"skipped.{lang.code}"] += 1  # no sound definition for this language
                elif kind == "normalizer":
                    new = step(text) if lang is None else step(text, lang)
                    if new != text:
                        st.docs_changed += 1
                        st.chars_removed += len(text) - len(new)
                        text = new
                else:
                    reason = step(text, lang)
                    if reason:
                        st.dropped_docs[reason] += 1
                        st.dropped_chars[reason] += len(text)
                st.seconds += time.perf_counter() - ts
                if reason:
                    break
            # the language of the record, when identified (not when only the script was looked at)
            tags = {"language": lang.code, "language_score": round(lang.score, 4)} if tagged else {}
            if reason:
                dropped.write(json.dumps({**doc, "text": text, **tags, "drop_step": step.name, "drop_reason": reason},
                                         ensure_ascii=False) + "\n")
                continue
            kept.write(json.dumps({**doc, "text": text, **tags}, ensure_ascii=False) + "\n")
            if hasher is None:
                exact += exact_key(text)
            else:
                fp = hasher.fingerprint(text, splitter_for(lang))
                exact += fp.exact_key
                bands += np.asarray(fp.band_keys, dtype=np.uint64).tobytes()
                if fp.signature is not None:  # the index compares the low byte of each value
                    sigs += np.asarray(fp.signature).astype(np.uint8).tobytes()
    for _, step in steps:
        if hasattr(step, "counts"):
            stats[step.name].counts.update(step.counts)
    sig_path = work / f"{index:05d}.sig"
    n = len(exact) // 16
    for name, buf, dtype in (("exact", exact, np.uint8), ("bands", bands, np.uint64), ("signatures", sigs, np.uint8)):
        arr = np.frombuffer(buf, dtype=dtype)
        np.save(sig_path.with_suffix(f".{name}.npy"), arr.reshape(n, -1) if n and arr.size else arr.reshape(n, 0))
    return ShardResult(index, kept_path, sig_path, dropped_path, docs_in, chars_in, bytes_in, stats,
                       read.to_dict(), hist, time.perf_counter() - t0)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, _: str) -> None:
        pass


def _bin(n_chars: int) -> int:
    return min(int(np.log10(n_chars + 1) * 10), len(HIST_BINS) - 2)


def split_of(text: str, fraction: float, salt: str) -> str:
    """``validation`` for a ``fraction`` of texts chosen by a salted hash, else ``train``."""
    h = hashlib.blake2b(f"{salt}\0{text}".encode("utf-8"), digest_size=8).digest()
    return "validation" if int.from_bytes(h, "big") / 2**64 < fraction else "train"


# ---------------------------------------------------------------------------------------------
# global de-duplication, split and writing


@dataclasses.dataclass
class CleanResult:
    train: Path
    validation: Path
    stats: dict[str, Any]
    report: Path


def finalize(cfg: CleanConfig, results: list[ShardResult], out: Path, metrics: Path, tracker=None,
             started: float | None = None) -> CleanResult:
    """Decide duplicates over all shards in order, split, write outputs, stats and report.
    ``started``: the ``time.perf_counter()`` the stage started at (for ``mb_per_second``)."""

    out = Path(out)
    results = sorted(results, key=lambda r: r.index)
    kept_docs = sum(len(np.load(r.signatures.with_suffix(".exact.npy"), mmap_mode="r")) for r in results)
    index = DedupIndex(minhash_config(cfg) or MinHashConfig(verify_threshold=None), expected=kept_docs)
    dedup_drops: Counter = Counter()
    identified = identifies_language(cfg)
    dedup_chars: Counter = Counter()
    counts: Counter = Counter()
    chars: Counter = Counter()
    languages: Counter = Counter()  # kept documents and characters per language
    hist_out = np.zeros(len(HIST_BINS) - 1, dtype=np.int64)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for split in ("train", "validation") + (("dropped",) if cfg.write_dropped else ()):
            (tmp / split).mkdir()
        for r in results:
            exact, bands, sigs = (np.load(r.signatures.with_suffix(f".{name}.npy"), mmap_mode="r")
                                  for name in ("exact", "bands", "signatures"))
            with contextlib.ExitStack() as stack:
                files = {s: stack.enter_context(open(tmp / s / f"{r.index:05d}.jsonl", "w", encoding="utf-8"))
                         for s in ("train", "validation")}
                dropped = stack.enter_context(open(tmp / "dropped" / f"{r.index:05d}.jsonl", "w", encoding="utf-8")
                                              if cfg.write_dropped else _Null())
                if r.dropped is not None:
                    with open(r.dropped, encoding="utf-8") as f:
                        shutil.copyfileobj(f, dropped)
                with open(r.kept, encoding="utf-8") as f:
                    for i, line in enumerate(f):
                        reason = index.add(exact[i].tobytes() if cfg.exact_dedup else None,
                                           bands[i] if bands.size else None, sigs[i] if sigs.size else None)
                        doc = json.loads(line)
                        n = len(doc["text"])
                        if reason:
                            dedup_drops[reason] += 1
                            dedup_chars[reason] += n
                            dropped.write(json.dumps({**doc, "drop_step": "dedup", "drop_reason": reason},
                                                     ensure_ascii=False) + "\n")
                            continue
                        split = split_of(doc["text"], cfg.validation_fraction, cfg.split_salt)
                        counts[split] += 1
                        chars[split] += n
                        if identified and "language" in doc:  # not a language the raw record brought
                            languages[f"docs.{doc['language']}"] += 1
                            languages[f"chars.{doc['language']}"] += n
                        hist_out[_bin(n)] += 1
                        files[split].write(line)
        docs_in = sum(r.docs_in for r in results)
        if docs_in == 0:
            raise StageError("the raw corpus is empty: no documents to clean")
        if counts["train"] == 0 or counts["validation"] == 0:
            raise StageError(
                f"after cleaning, {counts['train']} train and {counts['validation']} validation documents remain "
                f"(of {docs_in}); both splits need at least one (lower clean.min_chars or the filters' thresholds, "
                "change clean.validation_fraction or clean.split_salt, or add data)")
        stats = _stats(results, dedup_drops, dedup_chars, counts, chars, docs_in)
        stats.update({f"kept.{k}": v for k, v in sorted(languages.items())})
        hist_in = sum((r.hist_in for r in results), np.zeros(len(HIST_BINS) - 1, dtype=np.int64))
        if started is not None:
            stats["seconds"] = time.perf_counter() - started
            stats["mb_per_second"] = stats["mb_in"] / max(stats["seconds"], 1e-9)
        write_json(tmp / "stats.json", stats)
        _report(tmp / "report.png", hist_in, hist_out, stats)
    write_json(metrics, headline(stats))
    for line in (w for r in results for w in warning_lines(r.read)):
        log.warning(line)
    if tracker is not None:
        tracker.metrics({k: v for k, v in stats.items() if isinstance(v, (int, float))})
        tracker.artifact(out / "report.png", "report")
        tracker.artifact(out / "stats.json", "report")
    return CleanResult(out / "train", out / "validation", stats, out / "report.png")


def _stats(results: list[ShardResult], dedup_drops: Counter, dedup_chars: Counter, counts: Counter,
           chars: Counter, docs_in: int) -> dict[str, Any]:
    steps: dict[str, StepStats] = {}
    for r in results:
        for name, st in r.steps.items():
            steps.setdefault(name, StepStats()).merge(st)
    seconds = max((r.seconds for r in results), default=0.0)
    mb_in = sum(r.bytes_in for r in results) / 1e6
    out: dict[str, Any] = {
        "documents_in": docs_in, "chars_in": sum(r.chars_in for r in results), "mb_in": mb_in,
        "documents_kept": counts["train"] + counts["validation"],
        "train_documents": counts["train"], "validation_documents": counts["validation"],
        "train_chars": chars["train"], "validation_chars": chars["validation"],
        "shards": len(results),
    }
    for name, st in steps.items():
        out[f"{name}.docs_in"] = st.docs_in
        if st.docs_changed:
            out[f"{name}.docs_changed"] = st.docs_changed
            out[f"{name}.chars_removed"] = st.chars_removed
        for reason, n in st.dropped_docs.items():
            out[f"{name}.dropped_docs.{reason}"] = n
            out[f"{name}.dropped_chars.{reason}"] = st.dropped_chars[reason]
        for k, n in st.counts.items():
            out[f"{name}.{k}"] = n
        out[f"{name}.seconds"] = round(st.seconds, 3)
    for reason, n in dedup_drops.items():
        out[f"dedup.dropped_docs.{reason}"] = n
        out[f"dedup.dropped_chars.{reason}"] = dedup_chars[reason]
    for r in results:
        for kind, n in r.read.get("skipped", {}).items():
            out[f"read.skipped.{kind}"] = out.get(f"read.skipped.{kind}", 0) + n
    out["documents_dropped"] = docs_in - out["documents_kept"]
    out["slowest_shard_seconds"] = round(seconds, 3)
    return out


HEADLINE = ("documents_in", "documents_kept", "documents_dropped", "chars_in", "mb_in", "mb_per_second",
            "train_documents", "validation_documents", "train_chars", "validation_chars")


def headline(stats: dict[str, Any]) -> dict[str, Any]:
    """The numbers of the clean stage a user compares between experiments (its DVC metrics file):
    the totals and the documents dropped per step and reason (``<step>.dropped_docs.<reason>``).
    Per-step timings, documents seen and characters changed stay in ``data/clean/stats.json`` and
    the stage's MLflow run."""
    return {k: v for k, v in stats.items() if k in HEADLINE or ".dropped_docs." in k or k.startswith("read.skipped.")}


def language_mix(stats: dict[str, Any], prefix: str) -> dict[str, tuple[int, int]]:
    """``{language: (documents, characters)}`` from the statistics: ``prefix`` ``language_id``
    for the documents identified (after the normalisers), ``kept`` for those written."""
    mix: dict[str, tuple[int, int]] = {}
    for key, n in stats.items():
        if key.startswith(f"{prefix}.docs."):
            code = key[len(prefix) + 6:]
            mix[code] = (n, stats.get(f"{prefix}.chars.{code}", 0))
    return mix


def _report(path: Path, hist_in: np.ndarray, hist_out: np.ndarray, stats: dict[str, Any]) -> None:
    import matplotlib  # lazy: ~0.5 s to import; only the data report's PNG needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: ~0.5 s to import; only the data report's PNG needs it

    drops = {k.split(".dropped_docs.")[0] + ": " + k.split(".dropped_docs.")[1]: v
             for k, v in stats.items() if ".dropped_docs." in k}
    mix_in, mix_out = language_mix(stats, "language_id"), language_mix(stats, "kept")
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(17, 4.5))
    centers = 10 ** ((HIST_BINS[:-1] + HIST_BINS[1:]) / 2)
    a.step(centers, hist_in, where="mid", label=f"before ({int(hist_in.sum())} docs)")
    a.step(centers, hist_out, where="mid", label=f"after ({int(hist_out.sum())} docs)")
    a.set_xscale("log")
    a.set_xlabel("document length (characters)")
    a.set_ylabel("documents")
    a.set_title("Document lengths")
    a.legend()
    if drops:
        names = sorted(drops, key=drops.get)
        b.barh(names, [drops[n] for n in names])
    b.set_xlabel("documents dropped")
    b.set_title(f"Drops per step and reason (kept {stats['documents_kept']} of {stats['documents_in']})")
    top = sorted(mix_in, key=lambda k: -mix_in[k][1])[:10]
    if top:
        y = np.arange(len(top))
        c.barh(y - 0.2, [mix_in[k][1] for k in top], height=0.4, label="before filters")
        c.barh(y + 0.2, [mix_out.get(k, (0, 0))[1] for k in top], height=0.4, label="kept")
        c.set_yticks(y, [f"{k} ({mix_in[k][0]} / {mix_out.get(k, (0, 0))[0]} docs)" for k in top])
        c.invert_yaxis()
        c.legend()
    c.set_xscale("symlog")
    c.set_xlabel("characters")
    c.set_title("Language mix (documents before / kept)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------


def raw_shards(raw: Path) -> list[Path]:
    """prepare's shards: ``raw/corpus/*.jsonl`` (or ``raw/*.jsonl`` when ``raw`` is that folder)."""
    raw = Path(raw)
    folder = raw / "corpus" if (raw / "corpus").is_dir() or not raw.is_dir() else raw
    shards = sorted(folder.glob("*.jsonl"))
    if not shards:
        raise StageError(f"{folder}: raw corpus shards (*.jsonl) not found (run the stage that produces them first)")
    return shards


def work_dir(out: Path) -> Path:
    return Path(out).with_name(f".{Path(out).name}.work")


def clean(cfg: CleanConfig, raw: Path, out: Path, metrics: Path, tracking: TrackingConfig = TrackingConfig(),
          map_shards: Callable[[list[tuple]], list[ShardResult]] | None = None) -> CleanResult:
    """Clean prepare's shards under ``raw`` into ``out``.

    Shards run in ``cfg.workers`` processes, or through ``map_shards`` (given the list of
    ``(index, source, work, cfg)`` jobs, it returns their :func:`clean_shard` results in order:
    how an orchestrator spreads them over its own workers)."""


    shards = raw_shards(raw)
    work = work_dir(out)
    shutil.rmtree(work, ignore_errors=True)
    try:
        return _clean(cfg, raw, shards, work, out, metrics, tracking, map_shards)
    finally:  # the shards' scratch files, whether the stage finished or failed
        shutil.rmtree(work, ignore_errors=True)


def _clean(cfg: CleanConfig, raw: Path, shards: list[Path], work: Path, out: Path, metrics: Path,
           tracking: TrackingConfig, map_shards: Callable[[list[tuple]], list[ShardResult]] | None) -> CleanResult:
    with stage_run("clean", tracking, flatten(cfg, "clean."), inputs=[raw_shards(raw)[0].parent],
                   outputs=[out]) as tr:
        t0 = time.perf_counter()
        workers = min(cfg.workers, len(shards))
        if map_shards is not None:
            results = map_shards([(i, s, work, cfg) for i, s in enumerate(shards)])
        elif workers <= 1:
            results = [clean_shard(i, s, work, cfg) for i, s in enumerate(tqdm(shards, desc="clean", unit="shard"))]
        else:
            with cf.ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
                futures = [pool.submit(clean_shard, i, s, work, cfg) for i, s in enumerate(shards)]
                results = [f.result() for f in tqdm(futures, desc="clean", unit="shard")]
        result = finalize(cfg, results, out, metrics, tr, started=t0)
        log.info("clean: %.1f MB in %.1f s (%.2f MB/s), kept %d of %d documents", result.stats["mb_in"],
                 result.stats["seconds"],
                 result.stats["mb_per_second"], result.stats["documents_kept"], result.stats["documents_in"])
        return result
