"""Exact and near-duplicate detection for the ``clean`` stage, in two phases.

*Phase 1* runs in worker processes, one shard each: for every document, :func:`exact_key` (16 bytes)
and a :class:`MinHasher` signature reduced to one 64-bit key per LSH band
(:meth:`MinHasher.fingerprint` gives all three). *Phase 2* runs in one process: a
:class:`DedupIndex` takes the fingerprints in a fixed global order (shard index, then position in
the shard) and returns ``None`` (keep) or a drop reason. Decisions therefore depend only on the
texts and that order, never on the number of workers; phase 2 holds fingerprints, never texts.
Nothing here uses Python's per-process salted ``hash()``.

MinHash in brief
----------------
A document is the set of its *shingles*, the ``shingle_size``-word windows of its normalised text
(see :func:`normalize_words`). Each of ``num_perm`` seeded hash "permutations" maps every shingle to
a 61-bit value; the signature keeps the minimum per permutation. Two documents agree on one
permutation's minimum with probability equal to the Jaccard similarity ``s`` of their shingle sets.

LSH banding cuts the signature into ``bands`` bands of ``rows`` values; two documents become
*candidates* when all rows of at least one band agree, so::

    P(candidate | s) = 1 - (1 - s**rows) ** bands        (an S-curve)
    effective threshold ~ (1 / bands) ** (1 / rows)     (where the curve is steepest)

How Jaccard relates to edits: replacing a random fraction ``p`` of the words breaks every shingle
that contains a replaced word, so a fraction ``q = (1 - p) ** shingle_size`` of the shingles
survives and ``s = q / (2 - q)``. With 5-word shingles: p = 1 % -> s = 0.91, 2 % -> 0.83,
3 % -> 0.75, 4 % -> 0.69, 5 % -> 0.63, 8 % -> 0.49, 10 % -> 0.42. In other words a Jaccard
threshold of 0.8 on 5-word shingles means "about 2 % of the words changed", not "a few per cent".

Defaults (see :class:`lmcore.config.MinHashConfig`): 5-word shingles, 112 permutations in 28 bands of 4 rows
(effective threshold 0.43: edited copies become candidates even at s ~ 0.5), and candidates
confirmed by the Jaccard similarity estimated from the two signatures, >= 0.5. So "near
duplicate" here means s >= ~0.5, i.e. up to ~7 % of the words edited. Measured share of copies
dropped, by the fraction of words replaced, inserted or deleted (543 distinct real documents of
>= 100 words, docstrings and reference topics of the Python standard library; mean true s)::

    edited        1 %   3 %   4 %   5 %   6 %   8 %  10 %  12 %  15 %  20 %
    true s       0.91  0.77  0.71  0.66  0.61  0.53  0.46  0.41  0.34  0.26
    28x4, >=0.5  1.00  1.00  1.00  0.98  0.95  0.63  0.25  0.08  0.01  0.00   (defaults)
    28x4, none   1.00  1.00  1.00  0.99  0.98  0.88  0.69  0.51  0.30  0.13   (verify_threshold None)
    14x8, none   1.00  0.80  0.60  0.44  0.25  0.10  0.03  0.02  0.00  0.00   (datatrove's bands)

Verification turns the wide S-curve of 28 x 4 into a step near s = 0.5. datatrove's 14 x 8
(threshold 0.72) suits "s >= 0.8" (~2 % edited) and misses most copies with 4-5 % edited. Distinct
documents (true s < 0.2 to all others) were never dropped (0 of 543), with or without
verification; ``tests/test_dedup.py`` prints these rates.

Scripts without spaces
----------------------
Chinese, Japanese or Thai text has few or no spaces, so its ``\\w`` runs are whole clauses and
word shingles of them never match after an edit. Each document's words follow its splitter
(:mod:`lmcore.data.clean.segment`: jieba's words for Chinese, characters for the other scripts
without spaces), and with ``shingles: auto`` (the default) such documents get *character*
n-grams of ``char_shingle_size`` characters instead. Replacing a fraction ``p`` of the characters
keeps ``q = (1 - p) ** char_shingle_size`` of the character shingles: with 4-character shingles,
p = 3 % -> s = 0.79, 5 % -> 0.69, 8 % -> 0.56, 10 % -> 0.49. Measured on real Chinese (224
distinct documents of 1.3-3k characters from one novel, each copied 2-3 times with characters
replaced by others of the corpus), share of copies dropped with the default 28 x 4 bands and
verification at 0.5::

    characters replaced            3 %    4 %    5 %    (highest s between distinct documents)
    chars, 2-grams                1.000  1.000  1.000   0.16
    chars, 3-grams                1.000  1.000  1.000   0.06
    chars, 4-grams (default)      1.000  1.000  0.999   0.05
    chars, 5-grams                1.000  0.988  0.927   0.03
    jieba words, 3-grams          1.000    -    0.752
    jieba words, 5-grams          0.819    -    0.027   (datatrove's choice for Chinese)
    \\w runs, 5-grams             0.000    -    0.000   (English rules on Chinese)

A replaced character breaks its word and often the segmentation around it, so word shingles
lose more than characters do. On Japanese (21 Wikinews documents) character 4-grams dropped every
copy at 3-5 %. ``tests/test_multilingual.py`` checks these rates through the clean stage.
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
from collections import Counter
from typing import Any, NamedTuple

import numpy as np
import xxhash

from lmcore.config import MinHashConfig
from lmcore.data.clean.segment import chunk_splitter

__all__ = [
    "DedupIndex",
    "Fingerprint",
    "MinHashConfig",
    "MinHasher",
    "exact_key",
    "normalize_words",
    "p_candidate",
]

MERSENNE_61 = (1 << 61) - 1
EMPTY = np.uint32(0xFFFFFFFF)
"""Every value of the signature of a document without words (the minimum over an empty set)."""

_U64 = np.uint64
_P = _U64(MERSENNE_61)
_MUL = _U64(0x9E3779B97F4A7C15)  # odd multiplier of the shingle polynomial (2**64 / golden ratio)
_CHUNK = 512  # shingles per block of the (shingles x permutations) products: 3 x 0.46 MB
_M29 = _U64((1 << 29) - 1)


# ---------------------------------------------------------------------------------------------
# configuration: MinHashConfig (``clean.minhash``) is defined with the other settings in lmcore.config


def p_candidate(s: float | np.ndarray, bands: int, rows: int) -> float | np.ndarray:
    """P(two documents of Jaccard similarity ``s`` share at least one band) = 1-(1-s^r)^b."""
    return 1.0 - (1.0 - np.asarray(s, dtype=float) ** rows) ** bands


# ---------------------------------------------------------------------------------------------
# phase 1: keys of one document


def exact_key(text: str) -> bytes:
    """16-byte BLAKE2b digest of ``text`` with leading and trailing whitespace removed.

    Meant for the text the pipeline writes (after the normalisers), so "exact duplicate" means
    "the same output document". Copies that differ in case, punctuation or inner whitespace
    have equal MinHash signatures instead and are dropped as near duplicates.
    """
    return hashlib.blake2b(text.strip().encode("utf-8", "surrogatepass"), digest_size=16).digest()


@functools.cache
def _patterns() -> tuple[re.Pattern, re.Pattern]:
    """``(word run, character)``: a run of word characters and combining marks (``\\w`` alone
    leaves out the vowel signs of Devanagari, Arabic vowel marks, Thai tone marks... cutting words
    into letters), and one character with the marks that follow it."""
    ranges: list[list[int]] = []
    for cp in range(0x30000):
        if unicodedata.category(chr(cp))[0] == "M":
            if ranges and ranges[-1][1] == cp - 1:
                ranges[-1][1] = cp
            else:
                ranges.append([cp, cp])
    marks = "".join(chr(a) if a == b else f"{chr(a)}-{chr(b)}" for a, b in ranges)
    return re.compile(f"[\\w{marks}]+"), re.compile(f"[^{marks}][{marks}]*|[{marks}]+")


def normalize_words(text: str, splitter: str = "words") -> list[str]:
    """The words MinHash sees, by the document's splitter (:mod:`lmcore.data.clean.segment`).

    ``words``: the maximal runs of Unicode word characters (``\\w``: letters, digits,
    underscore) and combining marks of ``text.lower()``. Punctuation, symbols and whitespace only
    separate words, so case, punctuation and spacing never matter: ``"Don't  STOP!"`` ->
    ``["don", "t", "stop"]``. ``jieba``: those runs segmented into Chinese words. ``chars``: every
    word character on its own, with its marks (shingles become character n-grams). The words are
    hashed as UTF-8."""
    word, char = _patterns()
    runs = word.findall(text.lower())
    if splitter == "words":
        return runs
    if splitter == "chars":
        return char.findall("".join(runs))
    split = chunk_splitter(splitter)
    return [w for run in runs for w in split(run)]


class Fingerprint(NamedTuple):
    """What phase 1 sends to phase 2 for one document: ``DedupIndex.add(*fingerprint)``."""

    exact_key: bytes
    """:func:`exact_key` of the text."""
    band_keys: np.ndarray
    """uint64, one per band (:meth:`MinHasher.band_keys`); all zero for a text without words."""
    signature: np.ndarray | None
    """uint8, the low byte of each signature value, when verification is on; else None."""


def _fmix64(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser, in place (uint64, wrapping)."""
    x ^= x >> _U64(33)
    x *= _U64(0xFF51AFD7ED558CCD)
    x ^= x >> _U64(33)
    x *= _U64(0xC4CEB9FE1A85EC53)
    x ^= x >> _U64(33)
    return x


def _seeded_u64(seed: int, label: str, i: int) -> int:
    d = hashlib.blake2b(f"lmcore.minhash/{seed}/{label}/{i}".encode(), digest_size=8).digest()
    return int.from_bytes(d, "little")


class MinHasher:
    """Computes MinHash signatures and LSH band keys. Picklable, deterministic across processes
    and machines; not thread-safe (it reuses scratch buffers: one hasher per thread or process).

    Each word is hashed once (xxh3-64 of its UTF-8 bytes); a shingle's 32-bit hash ``h`` is a
    polynomial of its word hashes, mixed. Permutation ``i`` maps ``h`` to
    ``(a_i * h + b_i) mod (2**61 - 1)`` with ``a_i`` in [1, 2**61 - 1) and ``b_i`` in
    [0, 2**61 - 1), both derived from ``seed`` with BLAKE2b (not numpy's generators, whose streams
    may change between versions). The 93-bit product is formed exactly from two 64-bit halves and
    reduced with Mersenne folds ``(x & p) + (x >> 61)``; the last fold leaves values in
    [0, p + 3], taken to [0, p) after the minimum: exact except when a shingle lands on residue
    0..3 (probability 2**-59 each), which merely ranks it last. All of it is numpy over blocks
    of (shingles x permutations), no Python loop over permutations. The signature keeps the low
    32 bits of each minimum (uint32), which changes an equality only with probability 2**-32.
    """

    def __init__(self, config: MinHashConfig = MinHashConfig()) -> None:
        self.config = config
        n = config.num_perm
        a = np.array([_seeded_u64(config.seed, "a", i) % (MERSENNE_61 - 1) + 1 for i in range(n)], _U64)
        self._a_lo = a & _U64(0xFFFFFFFF)
        self._a_hi = a >> _U64(32)
        self._b = np.array([_seeded_u64(config.seed, "b", i) % MERSENNE_61 for i in range(n)], _U64)
        self._band_seeds = [_seeded_u64(config.seed, "band", i) for i in range(config.bands)]
        self._scratch: tuple[np.ndarray, ...] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_scratch": None}

    def shingle_hashes(self, text: str, splitter: str = "words") -> np.ndarray:
        """32-bit hashes (in uint64) of the shingles of ``text``, in order, repeats included."""
        cfg = self.config
        chars = cfg.shingles == "chars" or (cfg.shingles == "auto" and splitter != "words")
        words = normalize_words(text, "chars" if chars else splitter)
        n, k = len(words), cfg.char_shingle_size if chars else cfg.shingle_size
        if n == 0:
            return np.empty(0, _U64)
        h = np.fromiter(map(xxhash.xxh3_64_intdigest, map(str.encode, words)), _U64, n)
        k = min(k, n)
        m = n - k + 1
        acc = h[:m].copy()
        for j in range(1, k):
            acc *= _MUL
            acc += h[j:j + m]
        acc += _U64(k)  # length tag: a short document's one shingle is not a full one's prefix sum
        return _fmix64(acc) >> _U64(32)

    def signature(self, text: str, splitter: str = "words") -> np.ndarray:
        """MinHash signature: uint32 array of shape ``(num_perm,)``. A text without any word gets
        all values :data:`EMPTY`; its :meth:`band_keys` are all zero, so it is never a
        near-duplicate candidate, nor a reference for others (only exact de-duplication applies
        to it: two texts of punctuation only are kept unless identical)."""
        return self.minhash(self.shingle_hashes(text, splitter))

    def minhash(self, sh: np.ndarray) -> np.ndarray:
        """The signature of a document given its :meth:`shingle_hashes` (uint64 values < 2**32)."""
        if sh.size == 0:
            return np.full(self.config.num_perm, EMPTY, np.uint32)
        if self._scratch is None:
            # reused between calls: fresh 0.5 MB temporaries per document cost page faults
            # (glibc hands such blocks back to the OS on free), 3-4x the arithmetic itself
            shape = (_CHUNK, self.config.num_perm)
            self._scratch = (np.empty(shape, _U64), np.empty(shape, _U64), np.empty(shape, _U64))
        x_buf, t_buf, y_buf = self._scratch
        a_lo, a_hi, b = self._a_lo, self._a_hi, self._b
        best = np.full(self.config.num_perm, np.iinfo(np.uint64).max, _U64)
        for start in range(0, sh.size, _CHUNK):
            h = sh[start:start + _CHUNK, None]  # < 2**32
            x, t, y = x_buf[: len(h)], t_buf[: len(h)], y_buf[: len(h)]
            np.multiply(h, a_lo, out=x)  # < 2**64
            np.multiply(h, a_hi, out=t)  # < 2**61; a*h = x + t * 2**32
            np.right_shift(x, _U64(61), out=y)
            np.bitwise_and(x, _P, out=x)
            np.add(x, y, out=x)  # x mod p, folded: < 2**61 + 8
            np.right_shift(t, _U64(29), out=y)  # t * 2**32 = (t >> 29) * 2**61 + (t & (2**29-1)) * 2**32
            np.add(x, y, out=x)  # ... and 2**61 = 1 (mod p)
            np.bitwise_and(t, _M29, out=t)
            np.left_shift(t, _U64(32), out=t)
            np.add(x, t, out=x)
            np.add(x, b, out=x)  # < 3 * 2**61 + 2**33
            np.right_shift(x, _U64(61), out=y)
            np.bitwise_and(x, _P, out=x)
            np.add(x, y, out=x)  # (a*h + b) mod p, in [0, p + 3]
            np.minimum(best, np.minimum.reduce(x, axis=0), out=best)
        best = np.where(best >= _P, best - _P, best)
        return (best & _U64(0xFFFFFFFF)).astype(np.uint32)

    def band_keys(self, sig: np.ndarray) -> np.ndarray:
        """One uint64 key per band, shape ``(bands,)``: xxh3-64 of the band's values
        (little-endian bytes), seeded per band so that equal values in different bands give
        different keys. All zeros for the signature of a text without words, which
        :class:`DedupIndex` reads as "no band keys" (a real all-zero row has probability
        2**(-64 * bands)); the fixed shape lets shards store fingerprints as 2-D arrays."""
        cfg = self.config
        sig = np.asarray(sig)
        if sig.shape != (cfg.num_perm,):
            raise ValueError(f"signature must have shape ({cfg.num_perm},), got {sig.shape}")
        if (sig == EMPTY).all():
            return np.zeros(cfg.bands, _U64)
        raw = sig.astype("<u4", copy=False).tobytes()
        w = 4 * cfg.rows
        f = xxhash.xxh3_64_intdigest
        return np.array([f(raw[i * w:(i + 1) * w], s) for i, s in enumerate(self._band_seeds)], _U64)

    def fingerprint(self, text: str, splitter: str = "words") -> Fingerprint:
        """Exact key, band keys and, when ``verify_threshold`` is set, the low byte of each
        signature value (all that verification uses): 16 + 8 * bands (+ num_perm) bytes."""
        sig = self.signature(text, splitter)
        low = sig.astype(np.uint8) if self.config.verify_threshold is not None else None
        return Fingerprint(exact_key(text), self.band_keys(sig), low)


# ---------------------------------------------------------------------------------------------
# phase 2: the global index


class _KeyTable:
    """Hash set of 64-bit keys (optionally with a second 64-bit word and an int32 value per key)
    in flat numpy arrays, open addressing with linear probing. Lookups run in plain Python on
    memoryviews of the arrays (~1 us per key, no numpy call overhead); growth (x1.5 when the
    load passes 0.75, so the load stays in 0.5-0.75) re-places all keys with numpy. That is
    10.7-16 bytes per 8-byte key, 21-32 with a second word. Keys should be uniform (the index
    multiplies them by an odd constant first, a bijection); the home slot is the key's high 32
    bits scaled to the capacity. 0 marks an empty slot: callers map a key of 0 to 1."""

    MAX_LOAD = 0.75
    GROWTH = 1.5

    def __init__(self, wide: bool, with_values: bool, capacity: int = 1024) -> None:
        self.wide = wide
        self.with_values = with_values
        self.n = 0
        self._alloc(capacity)

    def _alloc(self, capacity: int) -> None:
        self.capacity = capacity
        self.k0 = np.zeros(capacity, _U64)
        self.k1 = np.zeros(capacity, _U64) if self.wide else None
        self.vals = np.zeros(capacity, np.int32) if self.with_values else None
        self._m0 = memoryview(self.k0)
        self._m1 = memoryview(self.k1) if self.wide else None
        self._mv = memoryview(self.vals) if self.with_values else None

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._arrays().values())

    def home(self, k0: np.ndarray) -> list[int]:
        """Home slots of keys (uint64 array) as Python ints."""
        return (((k0 >> _U64(32)) * _U64(self.capacity)) >> _U64(32)).tolist()

    def reserve(self, extra: int) -> None:
        """Make room for ``extra`` more keys now, so that slots found before inserting them stay
        valid (growth moves every key)."""
        if self.n + extra <= self.MAX_LOAD * self.capacity:
            return
        used = self.k0 != 0
        old = {name: a[used] for name, a in self._arrays().items()}
        capacity = self.capacity
        while self.n + extra > self.MAX_LOAD * capacity:
            capacity = int(capacity * self.GROWTH)
        self._alloc(capacity)
        new = self._arrays()
        slot = np.array(self.home(old["k0"]), np.int64)
        todo = np.arange(len(slot))
        while todo.size:  # vectorised linear probing; the first claimant of a free slot wins
            s = slot[todo]
            free = self.k0[s] == 0
            won, first = np.unique(s[free], return_index=True)
            winners = todo[free][first]
            for name, a in old.items():
                new[name][won] = a[winners]
            placed = np.zeros(len(todo), bool)
            placed[np.flatnonzero(free)[first]] = True
            todo = todo[~placed]
            slot[todo] = (slot[todo] + 1) % capacity

    def _arrays(self) -> dict[str, np.ndarray]:
        return {name: a for name, a in (("k0", self.k0), ("k1", self.k1), ("vals", self.vals)) if a is not None}

    def find(self, home: int, k0: int, k1: int = 0) -> int:
        """The key's slot if present, else ``~slot`` of the empty slot that ends its probe."""
        m0, m1, cap = self._m0, self._m1, self.capacity
        i = home
        while True:
            t = m0[i]
            if t == k0 and (m1 is None or m1[i] == k1):
                return i
            if t == 0:
                return ~i
            i += 1
            if i == cap:
                i = 0

    def put(self, empty: int, k0: int, k1: int = 0, val: int = 0) -> None:
        """Insert an absent key at ``empty`` (from :meth:`find`) or, if a key inserted since has
        taken it, at the next empty slot; :meth:`reserve` must have made room."""
        m0, cap = self._m0, self.capacity
        i = empty
        while m0[i] != 0:
            i += 1
            if i == cap:
                i = 0
        m0[i] = k0
        if self._m1 is not None:
            self._m1[i] = k1
        if self._mv is not None:
            self._mv[i] = val
        self.n += 1


_KEY_MUL = _U64(0xD6E8FEB86659FD93)  # odd: multiplying by it permutes the 64-bit keys


class DedupIndex:
    """Phase 2: decides keep/drop for fingerprints added in a fixed global order.

    :meth:`add` returns ``None`` for a document to keep (the first occurrence always is) or
    ``"exact_duplicate"`` (its exact key was seen before, whether that document was kept or
    dropped) or ``"near_duplicate"`` (one of its band keys equals a band key of a *kept*
    document and, with ``verify_threshold`` set, the Jaccard similarity estimated from the
    two signatures reaches it). Only kept documents enter the band index, so a chain of
    small edits A -> B -> C drops B (close to A) but keeps C unless C is close to A itself.
    With verification a band key points at a chain of the kept documents that had it (newest
    first, the first :attr:`MAX_CHAIN` compared): a document kept although all its band keys
    were known (every candidate failed verification) is a candidate for later ones too.

    Memory (:attr:`nbytes`): 21-32 bytes per document for its exact key, and per kept document
    10.7-16 bytes per band key (16-21 with verification's chain head) plus, with verification,
    ``num_perm`` bytes (the low byte of each signature value) and 8 bytes per chain node (one per
    band key of each kept document). With the defaults
    that is ~0.7-1.0 KB per kept document (~0.3-0.5 KB without verification).
    """

    def __init__(self, config: MinHashConfig = MinHashConfig(), expected: int = 0) -> None:
        """``expected``: the number of documents that will be added, if known. The tables are
        then allocated once at their final size instead of growing, which keeps the peak memory
        at the steady size (growth briefly holds the old and the new tables)."""
        self.config = config
        self.verify = config.verify_threshold is not None
        room = lambda keys: max(1024, int(keys / 0.6) + 1)  # noqa: E731 - load ~0.6 when full
        self._exact = _KeyTable(wide=True, with_values=False, capacity=room(expected))
        self._bands = _KeyTable(wide=False, with_values=self.verify, capacity=room(expected * config.bands))
        self._sigs = np.zeros((max(1024, expected) if self.verify else 0, config.num_perm), np.uint8)
        self.n_kept_sigs = 0
        # with verification a band key's value is a node of a chain: (kept document, next node or -1)
        self._node_doc = np.zeros(max(1024, expected * config.bands) if self.verify else 0, np.int32)
        self._node_next = np.zeros_like(self._node_doc)
        self._nd, self._nn = memoryview(self._node_doc), memoryview(self._node_next)  # plain-Python speed
        self.n_nodes = 0
        self.counts: Counter[str] = Counter()
        """Documents added, per outcome: ``kept``, ``exact_duplicate``, ``near_duplicate``."""
        self.candidates_rejected = 0
        """Near-duplicate candidates that verification kept (false candidates of the bands)."""

    def __len__(self) -> int:
        return sum(self.counts.values())

    @property
    def nbytes(self) -> int:
        """Bytes held by the index's arrays (the whole state of phase 2)."""
        return self._exact.nbytes + self._bands.nbytes + self._sigs.nbytes + self._node_doc.nbytes * 2

    def add(self, exact_key: bytes | None, band_keys: Any = None, signature: np.ndarray | None = None) -> str | None:
        """Decide on the next document. ``exact_key`` (16 bytes) None skips exact de-duplication,
        ``band_keys`` None, empty or all zero (a text without words) skips near-duplicate
        detection; ``signature`` (uint32 or its
        low bytes, uint8) is required when verification is on and band keys are given."""
        ex = None
        if exact_key is not None:
            if len(exact_key) != 16:
                raise ValueError(f"exact_key must be 16 bytes, got {len(exact_key)}")
            w = np.frombuffer(exact_key, "<u8") * _KEY_MUL
            e0, e1 = int(w[0]) or 1, int(w[1])
            table = self._exact
            table.reserve(1)
            at = table.find(table.home(w[:1])[0], e0, e1)
            if at >= 0:
                self.counts["exact_duplicate"] += 1
                return "exact_duplicate"
            ex = (at, e0, e1)
        reason = None
        new: list[tuple[int, int]] = []  # (empty slot, key) of band keys not in the index
        hits: list[int] = []  # slots of band keys in the index
        keys = None if band_keys is None else np.asarray(band_keys, _U64).reshape(-1)
        if keys is not None and keys.any():
            if len(keys) != self.config.bands:
                raise ValueError(f"expected {self.config.bands} band keys, got {len(keys)}")
            keys = keys * _KEY_MUL
            table = self._bands
            table.reserve(len(keys))
            for home, k in zip(table.home(keys), keys.tolist()):
                at = table.find(home, k or 1)
                if at >= 0:
                    hits.append(at)
                else:
                    new.append((at, k or 1))
            if hits:
                if not self.verify:
                    reason = "near_duplicate"
                else:
                    if signature is None or np.shape(signature) != (self.config.num_perm,):
                        raise ValueError(f"verify_threshold is set: add() needs the signature "
                                         f"({self.config.num_perm} values), got {signature!r:.60}")
                    cands = np.unique(self._chain_docs(table.vals[hits].tolist()))
                    match = (self._sigs[cands] == np.asarray(signature).astype(np.uint8)).mean(axis=1)
                    # b-bit MinHash (b = 8): unequal values still agree with probability 1/256
                    est = (match - 1 / 256) / (1 - 1 / 256)
                    if est.max() >= self.config.verify_threshold:
                        reason = "near_duplicate"
                    else:
                        self.candidates_rejected += 1
        if ex is not None:
            self._exact.put(~ex[0], ex[1], ex[2])
        if reason:
            self.counts[reason] += 1
            return reason
        if self.verify and (new or hits):
            ordinal = self._add_signature(signature)
            vals = self._bands._mv
            for at in hits:  # known keys: this document joins their chains
                vals[at] = self._node(ordinal, vals[at])
            for at, k in new:
                self._bands.put(~at, k, val=self._node(ordinal, -1))
        elif new:
            for at, k in new:
                self._bands.put(~at, k)
        self.counts["kept"] += 1
        return None

    MAX_CHAIN = 32
    """Kept documents compared per band key (its newest): bounds the work on boilerplate bands."""

    def _node(self, doc: int, nxt: int) -> int:
        n = self.n_nodes
        if n == len(self._node_doc):
            size = max(1024, int(n * 1.5))
            self._node_doc = np.resize(self._node_doc, size)
            self._node_next = np.resize(self._node_next, size)
            self._nd, self._nn = memoryview(self._node_doc), memoryview(self._node_next)
        self._nd[n], self._nn[n] = doc, nxt
        self.n_nodes = n + 1
        return n

    def _chain_docs(self, heads: list[int]) -> list[int]:
        docs, nd, nn = [], self._nd, self._nn
        for node in heads:
            for _ in range(self.MAX_CHAIN):
                if node < 0:
                    break
                docs.append(nd[node])
                node = nn[node]
        return docs

    def _add_signature(self, signature: np.ndarray | None) -> int:
        if signature is None or np.shape(signature) != (self.config.num_perm,):
            raise ValueError(f"verify_threshold is set: add() needs the signature "
                             f"({self.config.num_perm} values), got {signature!r:.60}")
        if self.n_kept_sigs == len(self._sigs):
            grown = np.zeros((int(len(self._sigs) * 1.5), self.config.num_perm), np.uint8)
            grown[: self.n_kept_sigs] = self._sigs
            self._sigs = grown
        self._sigs[self.n_kept_sigs] = np.asarray(signature).astype(np.uint8)
        self.n_kept_sigs += 1
        return self.n_kept_sigs - 1
