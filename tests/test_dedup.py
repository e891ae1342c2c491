"""Exact and near-duplicate detection (lmcore.data.clean.dedup) on real text that ships with Python.

The documents are docstrings of standard-library modules, classes and functions (read with ``ast``
from the ``.py`` files, nothing is imported) and the Python reference topics of ``pydoc_data``,
each of at least 100 words. "Distinct" documents are those whose true Jaccard similarity (5-word
shingle sets, computed exactly) to every earlier distinct document is below 0.2. The measured
recall and false-positive rates are printed in the test output.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import multiprocessing
import pickle
import random
import re
import sysconfig
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from lmcore.data.clean.dedup import (
    EMPTY,
    DedupIndex,
    MinHashConfig,
    MinHasher,
    exact_key,
    normalize_words,
    p_candidate,
)

PACKAGES = ["email", "json", "asyncio", "logging", "unittest", "importlib", "concurrent", "http",
            "urllib", "xml", "collections", "sqlite3", "zoneinfo"]


def report(request: pytest.FixtureRequest, line: str) -> None:
    """Show a measured number in the test output, also under ``-q``."""
    print(line)
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    capman = request.config.pluginmanager.get_plugin("capturemanager")
    if tr is not None and capman is not None:
        with capman.global_and_fixture_disabled():
            tr.write_line(f"[dedup] {line}")


def stdlib_documents(min_words: int = 100) -> list[str]:
    try:  # the language reference topics behind help("..."): real prose, cut into ~150-word pieces
        from pydoc_data.topics import topics
    except ImportError:  # some distributions package it apart: read more docstrings instead
        topics = {}
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    for pkg in PACKAGES if not topics else ():
        files += sorted(p for p in (root / pkg).rglob("*.py") if "test" not in p.parent.name)
    docs = []
    for f in files:
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                d = ast.get_docstring(node)
                if d and len(d.split()) >= min_words:
                    docs.append(d)
    for name in sorted(topics):
        buf: list[str] = []
        for para in re.split(r"\n\s*\n", topics[name]):
            buf.append(para)
            if sum(len(p.split()) for p in buf) >= 150:
                docs.append("\n\n".join(buf))
                buf = []
        if sum(len(p.split()) for p in buf) >= min_words:
            docs.append("\n\n".join(buf))
    return list(dict.fromkeys(docs))  # first occurrence of each exact text


def shingle_set(text: str, k: int = 5) -> set[tuple[str, ...]]:
    w = normalize_words(text)
    return {tuple(w[i:i + k]) for i in range(max(1, len(w) - k + 1))}


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


def distinct_subset(docs: list[str], below: float = 0.2) -> list[str]:
    """Greedy: a document joins if its exact Jaccard similarity to every member is < ``below``."""
    sets = [shingle_set(d) for d in docs]
    postings: dict[tuple[str, ...], list[int]] = defaultdict(list)
    chosen = []
    for i, s in enumerate(sets):
        shared: dict[int, int] = defaultdict(int)
        for sh in s:
            for j in postings.get(sh, ()):
                shared[j] += 1
        if all(c / (len(s) + len(sets[j]) - c) < below for j, c in shared.items()):
            chosen.append(i)
            for sh in s:
                postings[sh].append(i)
    return [docs[i] for i in chosen]


def edit(text: str, rate: float, rng: random.Random, vocab: list[str]) -> str:
    """A copy with round(rate * words) edits, each a replacement, insertion or deletion."""
    words = text.split()
    for _ in range(max(1, round(rate * len(words)))):
        op, i = rng.choice("rid"), rng.randrange(len(words))
        if op == "r":
            words[i] = rng.choice(vocab)
        elif op == "i":
            words.insert(i, rng.choice(vocab))
        elif len(words) > 1:
            del words[i]
    return " ".join(words)


@pytest.fixture(scope="module")
def distinct() -> list[str]:
    docs = distinct_subset(stdlib_documents())
    assert len(docs) >= 300, len(docs)
    assert min(len(d.split()) for d in docs) >= 100
    return docs


@pytest.fixture(scope="module")
def vocab(distinct: list[str]) -> list[str]:
    return sorted({w for d in distinct for w in d.split()})


def decide(cfg: MinHashConfig, texts: list[str]) -> list[str | None]:
    mh, index = MinHasher(cfg), DedupIndex(cfg)
    return [index.add(*mh.fingerprint(t)) for t in texts]


# ---------------------------------------------------------------------------------------------
# (a), (b): planted near duplicates and distinct documents


def test_planted_near_duplicates_are_found(distinct, vocab, request):
    rng = random.Random(1)
    cfg = MinHashConfig()
    sample = rng.sample(range(len(distinct)), 300)
    copies = [(i, edit(distinct[i], rng.uniform(0.03, 0.05), rng, vocab)) for i in sample]
    js = [jaccard(shingle_set(distinct[i]), shingle_set(c)) for i, c in copies]
    # global order: every original, each planted copy at a random later position
    order = [("orig", i) for i in range(len(distinct))]
    for k, (i, _) in enumerate(copies):
        order.insert(rng.randint(order.index(("orig", i)) + 1, len(order)), ("copy", k))
    texts = [distinct[x] if kind == "orig" else copies[x][1] for kind, x in order]
    got = decide(cfg, texts)
    orig_dropped = sum(r is not None for (kind, _), r in zip(order, got) if kind == "orig")
    found = sum(r == "near_duplicate" for (kind, _), r in zip(order, got) if kind == "copy")
    recall = found / len(copies)
    report(request, f"(a) planted copies with 3-5 % of words edited (true Jaccard {min(js):.2f}-{max(js):.2f}, "
                    f"mean {np.mean(js):.2f}): recall {recall:.3f} ({found}/{len(copies)}), "
                    f"originals dropped {orig_dropped}/{len(distinct)}")
    assert orig_dropped == 0
    assert recall >= 0.95
    datatrove = decide(MinHashConfig(bands=14, rows=8, verify_threshold=None), texts)
    found = sum(r == "near_duplicate" for (kind, _), r in zip(order, datatrove) if kind == "copy")
    report(request, f"    the same with datatrove's 14 bands x 8 rows: recall {found / len(copies):.3f}")


def test_distinct_documents_are_kept(distinct, request):
    for cfg in (MinHashConfig(), MinHashConfig(verify_threshold=None)):
        got = decide(cfg, distinct)
        fp = sum(r is not None for r in got) / len(got)
        report(request, f"(b) {len(distinct)} distinct documents, bands {cfg.bands}x{cfg.rows}, "
                        f"verify_threshold {cfg.verify_threshold}: false-positive rate {fp:.4f}")
        assert fp < 0.01


def test_verification_cuts_distant_candidates(distinct, vocab, request):
    """12-15 % of words edited (true Jaccard ~0.35-0.4, below the 0.5 verification threshold):
    the bands alone (threshold 0.43) make many of them candidates, verification keeps most."""
    rng = random.Random(2)
    pairs = [(d, edit(d, rng.uniform(0.12, 0.15), rng, vocab)) for d in distinct[:200]]
    rates = {}
    for verify in (None, 0.5):
        cfg = MinHashConfig(verify_threshold=verify)
        mh, index = MinHasher(cfg), DedupIndex(cfg)
        for d, _ in pairs:
            assert index.add(*mh.fingerprint(d)) is None
        rates[verify] = np.mean([index.add(*mh.fingerprint(c)) == "near_duplicate" for _, c in pairs])
        if verify:
            assert index.candidates_rejected > 0
    js = [jaccard(shingle_set(d), shingle_set(c)) for d, c in pairs]
    report(request, f"copies with 12-15 % edited (true Jaccard mean {np.mean(js):.2f}) dropped: "
                    f"{rates[None]:.3f} unverified, {rates[0.5]:.3f} with verify_threshold 0.5")
    assert rates[0.5] < rates[None] / 2


# ---------------------------------------------------------------------------------------------
# (c) exact duplicates


def test_exact_duplicates(distinct):
    texts = distinct[:50]
    order = texts + ["  " + texts[3] + "\n"] + [texts[7]] + [texts[7]]
    got = decide(MinHashConfig(), order)
    assert got[:50] == [None] * 50
    assert got[50:] == ["exact_duplicate"] * 3
    # case and punctuation are not exact duplicates but have the same signature: near
    got = decide(MinHashConfig(), [texts[0], texts[0].upper(), texts[0].replace(".", " ; ")])
    assert got == [None, "near_duplicate", "near_duplicate"]
    # exact de-duplication alone (no band keys), and MinHash alone (no exact key)
    index = DedupIndex()
    assert [index.add(exact_key(t), None) for t in ["a b", "a b ", "a c"]] == [None, "exact_duplicate", None]
    mh, index = MinHasher(), DedupIndex(MinHashConfig(verify_threshold=None))
    assert [index.add(None, mh.band_keys(mh.signature(t))) for t in texts[:3] + texts[:1]] == [None] * 3 + ["near_duplicate"]
    assert index.counts == {"kept": 3, "near_duplicate": 1}
    assert len(exact_key("x")) == 16 and exact_key(" x\n") == exact_key("x") != exact_key("X")


def test_dropped_copy_is_not_a_reference():
    """Only kept documents enter the band index; a repeat of a dropped one is an exact duplicate."""
    a = " ".join(f"w{i}" for i in range(300))
    b = a.replace("w150", "zz")
    index, mh = DedupIndex(), MinHasher()
    assert [index.add(*mh.fingerprint(t)) for t in (a, b, b)] == [None, "near_duplicate", "exact_duplicate"]


# ---------------------------------------------------------------------------------------------
# (d) the same decisions whatever the processes


def shard_fingerprints(args: tuple[str, dict]) -> tuple[str, list[tuple[bytes, bytes, bytes]]]:
    path, overrides = args
    mh = MinHasher(MinHashConfig(**overrides))
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            fp = mh.fingerprint(json.loads(line)["text"])
            out.append((fp.exact_key, fp.band_keys.tobytes(), fp.signature.tobytes()))
    return path, out


def test_same_decisions_in_parallel(distinct, vocab, tmp_path):
    rng = random.Random(3)
    texts = distinct[:120] + [edit(d, 0.04, rng, vocab) for d in distinct[:40]] + distinct[10:20]
    rng.shuffle(texts)
    shards = []
    for s in range(5):  # shards of unequal sizes, written like the pipeline's JSONL shards
        path = tmp_path / f"{s:05d}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[s * 37:(s + 1) * 37]))
        shards.append(str(path))
    overrides = {"seed": 7}
    serial = dict(map(shard_fingerprints, [(p, overrides) for p in shards]))
    # spawned workers: fresh interpreters with their own str-hash salt; shards handed out in reverse
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        parallel = dict(pool.imap_unordered(shard_fingerprints, [(p, overrides) for p in reversed(shards)]))
    assert parallel == serial

    cfg = MinHashConfig(**overrides)

    def decisions(fps):
        index = DedupIndex(cfg)
        return [index.add(e, np.frombuffer(b, np.uint64), np.frombuffer(s, np.uint8))
                for p in shards for e, b, s in fps[p]]

    got = decisions(parallel)
    assert got == decisions(serial)
    assert got.count("exact_duplicate") == 10 and got.count("near_duplicate") >= 38


# ---------------------------------------------------------------------------------------------
# (e) configuration; signatures


def test_config_validation():
    cfg = MinHashConfig()
    assert (cfg.shingle_size, cfg.num_perm, cfg.bands, cfg.rows, cfg.seed) == (5, 112, 28, 4, 1)
    assert cfg.threshold == pytest.approx((1 / 28) ** (1 / 4))
    with pytest.raises(ValueError, match="num_perm"):
        MinHashConfig(num_perm=100)
    for bad in ({"shingle_size": 0}, {"bands": -1, "num_perm": -4}, {"rows": 2.0, "num_perm": 56},
                {"seed": -1}, {"seed": True}, {"verify_threshold": 0.0}, {"verify_threshold": 1.5},
                {"verify_threshold": "0.5"}):
        with pytest.raises(ValueError):
            MinHashConfig(**bad)
    assert MinHashConfig(num_perm=64, bands=16, rows=4, verify_threshold=None).num_perm == 64
    with pytest.raises(ValueError, match="unknown field.*buckets"):
        MinHashConfig.from_dict({"buckets": 14})
    assert MinHashConfig.from_dict({"bands": 14, "rows": 8}) == MinHashConfig(bands=14, rows=8)
    assert MinHashConfig.from_dict(None) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.bands = 3
    assert p_candidate(0.8, 14, 8) == pytest.approx(1 - (1 - 0.8**8) ** 14)
    with pytest.raises(ValueError, match="shape"):
        MinHasher().band_keys(np.zeros(10, np.uint32))
    fp = MinHasher().fingerprint("some words to hash here and there")
    with pytest.raises(ValueError, match="band keys"):
        DedupIndex().add(fp.exact_key, fp.band_keys[:14], fp.signature)
    with pytest.raises(ValueError, match="signature"):
        DedupIndex().add(fp.exact_key, fp.band_keys, None)
    with pytest.raises(ValueError, match="16 bytes"):
        DedupIndex().add(b"short", None)


def test_signature_is_exact_minhash(distinct):
    """The numpy code equals min over shingles of (a*h + b) mod (2**61 - 1), in Python integers."""
    mh = MinHasher()
    text = distinct[0]
    sh = [int(h) for h in mh.shingle_hashes(text)]
    assert len(sh) == len(normalize_words(text)) - 4 and max(sh) < 2**32
    a = ((mh._a_hi << np.uint64(32)) | mh._a_lo).tolist()
    p = 2**61 - 1
    want = [min((ai * h + bi) % p for h in sh) & 0xFFFFFFFF for ai, bi in zip(a, mh._b.tolist())]
    sig = mh.signature(text)
    assert sig.dtype == np.uint32 and sig.shape == (112,)
    assert sig.tolist() == want
    long = " ".join(distinct[:8])  # several blocks of shingles
    assert np.array_equal(mh.signature(long), mh.minhash(mh.shingle_hashes(long)))
    assert mh.band_keys(sig).shape == (28,) and len(set(mh.band_keys(sig).tolist())) == 28


def test_signatures_are_deterministic(distinct):
    a, b = MinHasher(), pickle.loads(pickle.dumps(MinHasher()))
    for t in distinct[:20]:
        assert np.array_equal(a.signature(t), b.signature(t))
    assert not np.array_equal(a.signature(distinct[0]), MinHasher(MinHashConfig(seed=2)).signature(distinct[0]))
    # pinned values: a change of any hashing step shows up here
    sig = MinHasher().signature("The quick brown fox jumps over the lazy dog, again and again.")
    assert sig[:4].tolist() == PINNED_SIGNATURE_PREFIX


PINNED_SIGNATURE_PREFIX = [4142514803, 101615480, 2042281899, 603539420]


def test_normalisation_and_short_texts():
    mh = MinHasher()
    assert normalize_words("Don't  STOP!\n–  naïve_x 42") == ["don", "t", "stop", "naïve_x", "42"]
    base = "It was the best of times, it was the worst of times."
    for variant in (base.upper(), base.replace(",", ""), "  it was   the best of times it WAS the worst of times "):
        assert np.array_equal(mh.signature(variant), mh.signature(base))
    short = mh.signature("three short words")  # fewer words than a shingle: one shingle of them all
    assert short.shape == (112,) and not (short == EMPTY).all()
    assert not np.array_equal(short, mh.signature("three short word"))
    assert len(mh.band_keys(short)) == 28
    for empty in ("", "   ", "!!! ... ---"):
        sig = mh.signature(empty)
        assert (sig == EMPTY).all()
        assert mh.band_keys(sig).shape == (28,) and not mh.band_keys(sig).any()
    # texts without words are never near duplicates, only exact ones
    index = DedupIndex()
    got = [index.add(*mh.fingerprint(t)) for t in ("!!!", "...", "!!!", "three short words", "Three short words!")]
    assert got == [None, None, "exact_duplicate", None, "near_duplicate"]


def test_index_memory(request):
    """Bytes per document at 10,000 distinct documents (random keys, all kept)."""
    rng = np.random.default_rng(0)
    n = 10_000
    for verify, limit in ((None, 600), (0.5, 1000)):
        cfg = MinHashConfig(verify_threshold=verify)
        index = DedupIndex(cfg)
        keys = rng.integers(0, 2**64, size=(n, cfg.bands), dtype=np.uint64)
        sigs = rng.integers(0, 2**32, size=(n, cfg.num_perm), dtype=np.uint32)
        for i in range(n):
            assert index.add(rng.bytes(16), keys[i], sigs[i]) is None
        # every key is still found
        assert index.add(None, keys[n // 2], sigs[n // 2]) == "near_duplicate"
        report(request, f"index, verify_threshold {verify}: {index.nbytes / n:.0f} bytes/document at {n:,}")
        assert index.nbytes / n < limit


def test_a_document_kept_with_only_known_band_keys_still_catches_its_copies():
    """B shares its bands with three kept documents but is close to none (verification rejects
    them all), so it is kept; it stored no signature, and its exact-signature copy B' (another
    exact key: a case or punctuation variant) was kept too."""
    cfg = MinHashConfig()
    rng = np.random.default_rng(0)
    docs = [(rng.integers(1, 2**63, cfg.bands, dtype=np.uint64), rng.integers(0, 256, cfg.num_perm).astype(np.uint8))
            for _ in range(3)]
    rows = cfg.num_perm // cfg.bands
    cuts = [(0, 10), (10, 19), (19, cfg.bands)]
    keys = np.concatenate([docs[k][0][a:b] for k, (a, b) in enumerate(cuts)])
    sig = np.concatenate([docs[k][1][rows * a : rows * b] for k, (a, b) in enumerate(cuts)])
    index = DedupIndex(cfg)
    assert [index.add(bytes([k]) * 16, *docs[k]) for k in range(3)] == [None, None, None]
    assert index.add(b"B" * 16, keys, sig) is None and index.candidates_rejected == 1
    assert index.add(b"b" * 16, keys, sig) == "near_duplicate"
    assert index.counts == {"kept": 4, "near_duplicate": 1}


def test_words_keep_their_combining_marks():
    """\\w leaves out vowel signs and tone marks: Hindi words fell apart into consonants, and
    words differing only in their vowels hashed the same."""
    assert normalize_words("\u0939\u093f\u0928\u094d\u0926\u0940 \u092d\u093e\u0937\u093e") == [
        "\u0939\u093f\u0928\u094d\u0926\u0940", "\u092d\u093e\u0937\u093e"]  # Hindi, Bhasha
    assert normalize_words("\u0915\u093f\u0924\u093e\u092c") != normalize_words(
        "\u0915\u094b\u0924\u0942\u092c\u0940")  # two words of the same consonants
    assert normalize_words("\u0e17\u0e35\u0e48\u0e19\u0e35\u0e48", "chars") == [
        "\u0e17\u0e35\u0e48", "\u0e19\u0e35\u0e48"]  # Thai: each letter with its vowel and tone marks
    assert normalize_words("Don't  STOP!") == ["don", "t", "stop"]
