"""Document quality filters of the ``clean`` stage: Gopher, C4, FineWeb and language identification.

Each rule is one small (pydantic) dataclass whose fields are its thresholds (defaults: the published
values, as in datatrove 0.10.1; see "Settings" below). A *filter* is called on a document's text and returns ``None`` to keep
it or a short drop reason (datatrove's reason names); a *normaliser* (:class:`C4LineCleaner`)
returns the text with some lines removed. Every class has a ``name`` (its key in the stage's
statistics).

Same decisions as datatrove
    The definitions, defaults, order of checks, reason names and arithmetic (which length is
    divided by which) follow datatrove 0.10.1's ``GopherQualityFilter``,
    ``GopherRepetitionFilter``, ``C4QualityFilter`` and ``FineWebQualityFilter``. Datatrove's
    ``C4QualityFilter`` both removes lines and drops documents; here :class:`C4LineCleaner`
    removes the lines and :class:`C4QualityFilter`, applied right after it (same flags), drops
    the document: the pair makes datatrove's decision and leaves datatrove's text.

Words
    The Gopher, C4 and FineWeb rules count words and sentences as datatrove does, with spaCy's
    English tokenizer: :mod:`lmcore.data.clean.words` re-implements it (:func:`split_words`,
    :func:`count_sentences`) and analyses each text once for all the word-based filters.

Settings
    The fields of each filter (its thresholds), their defaults and their documentation are those of
    its settings section in :mod:`lmcore.config` (``clean.filters.<name>`` in ``params.yaml``): each
    filter class *is* that pydantic dataclass with a ``name`` and ``__call__`` added, so
    ``GopherQualityFilter(min_doc_words=20)`` validates like ``params.yaml`` does.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from typing import Any, ClassVar

import numpy as np
from pydantic.dataclasses import dataclass as pydantic_dataclass

from lmcore.config import (
    SETTINGS,
    C4Settings,
    FineWebSettings,
    GopherQualitySettings,
    GopherRepetitionSettings,
    LanguageSettings,
)
from lmcore.core.languages import ANY
from lmcore.data.clean import fineweb2
from lmcore.data.clean.langid import Language, language_scores
from lmcore.data.clean.segment import splitter_for
from lmcore.data.clean.words import TERMINAL_PUNCTUATION, Doc, analyse, count_sentences, split_words

__all__ = [
    "C4LineCleaner",
    "C4QualityFilter",
    "FineWebQualityFilter",
    "GopherQualityFilter",
    "GopherRepetitionFilter",
    "LanguageFilter",
    "count_sentences",
    "split_words",
]


# ---------------------------------------------------------------------------------------------
# per-language rules


class PerLanguage:
    """What the word-based filters (Gopher, FineWeb, C4) share: which rule applies to a document
    in a given language (:meth:`for_language`), following the settings' ``thresholds`` and
    ``by_language`` fields (:class:`lmcore.config.PerLanguageSettings`). Variants are built once
    per language and process."""

    name: ClassVar[str]

    def for_language(self, lang: Language | None) -> tuple[Any, str] | None:
        """``(rule, splitter)`` for a document identified as ``lang``, or None when the filter has
        no sound definition for it (skipped: the stage counts it as ``skipped.<code>``).

        - ``thresholds: english``, no language known, or English / undetermined: this rule
          (with ``by_language``'s overrides for the code, if any), English word rules.
        - another language: FineWeb-2's values for it (``lmcore.data.clean.fineweb2``) under
          ``by_language``'s overrides, its words split as :func:`splitter_for` says; None when
          FineWeb-2 has no values for it, or its script has no word splitter (``chars``), unless
          ``by_language`` names the language.
        """
        if self.thresholds == "english" or lang is None:
            return self, "words"
        splitter = splitter_for(lang)
        key = (lang.code, splitter)
        variants = self.__dict__.setdefault("_variants", {})
        if key not in variants:
            variants[key] = self._variant(lang.code, splitter)
        return variants[key]

    def _variant(self, code: str, splitter: str) -> tuple[Any, str] | None:
        own = self.by_language.get(code)
        if code in ("en", "und"):
            return (dataclasses.replace(self, by_language={}, **own) if own else self), splitter
        published = fineweb2.values(self.name_in_table, code)
        if own is None and (published is None or splitter == "chars"):
            return None
        return dataclasses.replace(self, by_language={}, **{**(published or {}), **(own or {})}), splitter

    @property
    def name_in_table(self) -> str:
        return self.name


def _find_duplicates(items: list[str]) -> tuple[int, int]:
    """datatrove's ``find_duplicates``: (number of items equal to an earlier one, their characters)."""
    unique = set(items)
    if len(unique) == len(items):
        return 0, 0
    return len(items) - len(unique), sum(map(len, items)) - sum(map(len, unique))


# ---------------------------------------------------------------------------------------------
# Gopher


@pydantic_dataclass(config=SETTINGS)
class GopherQualityFilter(PerLanguage, GopherQualitySettings):
    """Gopher's quality heuristics (Rae et al. 2021, "Scaling Language Models", appendix A,
    https://arxiv.org/abs/2112.11446), as datatrove's ``GopherQualityFilter``: word count, mean
    word length, hash and ellipsis ratios, bullet and trailing-ellipsis lines, words with a letter,
    stop words. Words come from :func:`split_words`; "symbol" words (only punctuation) are not
    counted as words for the count and mean length. A threshold set to ``None`` (or 0) is off.
    A text without any word is dropped as ``gopher_short_doc``."""

    name: ClassVar[str] = "gopher_quality"

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "_stop", None)  # (vocabulary generation, stop word ids)

    def __call__(self, text: str, lang: Language | None = None) -> str | None:
        rule = self.for_language(lang)
        return None if rule is None else rule[0].check(text, rule[1])

    def check(self, text: str, splitter: str = "words") -> str | None:
        """The rules of this filter's own values on ``text`` split by ``splitter``."""
        d = analyse(text, splitter)
        ids = d.ids
        v = d.vocab
        n_words = len(ids)
        if n_words == 0:
            return "gopher_short_doc"
        symbol = v.symbol[ids]
        n_symbol = int(np.count_nonzero(symbol))
        n_real = n_words - n_symbol
        if self.min_doc_words and n_real < self.min_doc_words:
            return "gopher_short_doc"
        if self.max_doc_words and n_real > self.max_doc_words:
            return "gopher_long_doc"
        if self.min_avg_word_length or self.max_avg_word_length:
            lengths = v.length[ids]
            avg = (int(lengths.sum()) - int(lengths[symbol].sum())) / n_real if n_real else math.nan
            if self.min_avg_word_length and avg < self.min_avg_word_length:
                return "gopher_below_avg_threshold"
            if self.max_avg_word_length and avg > self.max_avg_word_length:
                return "gopher_above_avg_threshold"
        if self.max_symbol_word_ratio:
            if text.count("#") / n_words > self.max_symbol_word_ratio:
                return "gopher_too_many_hashes"
            if (text.count("...") + text.count("…")) / n_words > self.max_symbol_word_ratio:
                return "gopher_too_many_ellipsis"
        if self.max_bullet_lines_ratio or self.max_ellipsis_lines_ratio:
            bullets, ellipses, n_lines = _line_marks(text)
            if self.max_bullet_lines_ratio and bullets / n_lines > self.max_bullet_lines_ratio:
                return "gopher_too_many_bullets"
            if self.max_ellipsis_lines_ratio and ellipses / n_lines > self.max_ellipsis_lines_ratio:
                return "gopher_too_many_end_ellipsis"
        if self.max_non_alpha_words_ratio and \
                int(np.count_nonzero(v.alpha[ids])) / n_words < self.max_non_alpha_words_ratio:
            return "gopher_below_alpha_threshold"
        if self.min_stop_words:
            if self._stop is None or self._stop[0] != v.generation:
                stop_ids = np.array(sorted({v.id(w) for w in self.stop_words}), dtype=np.int64)
                object.__setattr__(self, "_stop", (v.generation, stop_ids))
            stop = self._stop[1]
            found = np.unique(ids[np.isin(ids, stop)]).size if len(stop) else 0
            if found < self.min_stop_words:
                return "gopher_enough_stop_words"
        return None


_OTHER_LINE_BREAKS = re.compile("[\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
_BULLET_LINE = re.compile(r"^[^\S\n]*[•-]", re.MULTILINE)
_ELLIPSIS_LINE = re.compile(r"(?:\.\.\.|…)[^\S\n]*$", re.MULTILINE)


def _line_marks(text: str) -> tuple[int, int, int]:
    """(lines starting with a bullet, lines ending with an ellipsis, lines) over ``str.splitlines``."""
    if _OTHER_LINE_BREAKS.search(text):
        lines = text.splitlines()
        return (sum(1 for s in lines if s.lstrip().startswith(("•", "-"))),
                sum(1 for s in lines if s.rstrip().endswith(("...", "…"))), len(lines))
    n_lines = text.count("\n") + (0 if text.endswith("\n") else 1) if text else 0
    return len(_BULLET_LINE.findall(text)), len(_ELLIPSIS_LINE.findall(text)), n_lines


_PARAGRAPHS = re.compile(r"\n{2,}")
_LINES = re.compile("\n+")


@pydantic_dataclass(config=SETTINGS)
class GopherRepetitionFilter(PerLanguage, GopherRepetitionSettings):
    """Gopher's repetition heuristics (Rae et al. 2021, table A1), as datatrove's
    ``GopherRepetitionFilter``: duplicated paragraphs and lines (share of them and of their
    characters), the most frequent 2-4-gram's characters, and the characters covered by repeated
    5-10-grams, each as a fraction of the text's characters. A threshold of ``None`` (or 0) is off."""

    name: ClassVar[str] = "gopher_repetition"

    def __call__(self, text: str, lang: Language | None = None) -> str | None:
        rule = self.for_language(lang)
        return None if rule is None else rule[0].check(text, rule[1])

    def check(self, text: str, splitter: str = "words") -> str | None:
        """The rules of this filter's own values on ``text`` split by ``splitter``."""
        if not text:
            return "empty"
        paragraphs = _PARAGRAPHS.split(text.strip())
        n_dup, dup_chars = _find_duplicates(paragraphs)
        if self.dup_para_frac and n_dup / len(paragraphs) > self.dup_para_frac:
            return "dup_para_frac"
        if self.dup_para_char_frac and dup_chars / len(text) > self.dup_para_char_frac:
            return "dup_para_char_frac"
        lines = _LINES.split(text)
        n_dup, dup_chars = _find_duplicates(lines)
        if self.dup_line_frac and n_dup / len(lines) > self.dup_line_frac:
            return "dup_line_frac"
        if self.dup_line_char_frac and dup_chars / len(text) > self.dup_line_char_frac:
            return "dup_line_char_frac"
        d = analyse(text, splitter)
        n_words = len(d.ids)
        for n, frac in self.top_n_grams:
            if n_words < n or _top_gram_bound(d, n) / len(text) <= frac:
                continue
            if _top_gram_chars(d, n) / len(text) > frac:
                return f"top_{n}_gram"
        sizes = tuple(n for n, _ in self.dup_n_grams)
        for n, frac in self.dup_n_grams:
            if _repeated_gram_chars(d, n, sizes) / len(text) > frac:
                return f"duplicated_{n}_n_grams"
        return None


def _top_gram_chars(d: Doc, n: int) -> int:
    """datatrove's ``find_top_duplicate(get_n_grams(words, n))``: characters of the most frequent
    n-gram (the first seen among equally frequent ones) times its count."""
    local, v = d.local_ids()
    if v ** n < 2**63:  # the n-gram packed in one integer: one sort
        m = len(local) - n + 1
        key = local[:m].astype(np.int64)
        for k in range(1, n):
            key = key * v + local[k:k + m]
        _, first, counts = np.unique(key, return_index=True, return_counts=True)
        top = int(counts.max())
        pos = int(first[counts == top].min())
    else:
        g = d.gram_ids(n)
        counts = np.bincount(g)
        top = int(counts.max())
        pos = int(np.argmax(counts[g] == top))
    return (int(d.vocab.length[d.ids[pos:pos + n]].sum()) + n - 1) * top


def _top_gram_bound(d: Doc, n: int) -> int:
    """An upper bound of :func:`_top_gram_chars` from word counts alone. If the top n-gram is
    seen c >= 2 times, each of its words is seen at least c times, so it has at most
    n * L(c) + n - 1 characters, L(c) the longest word seen at least c times; if every n-gram is
    seen once, the top one is the first."""
    _, counts, lengths = d.unigrams()
    first = int(d.vocab.length[d.ids[:n]].sum()) + n - 1
    twice = counts >= 2
    if not twice.any():
        return first
    return max(first, int((counts[twice] * (n * lengths[twice] + n - 1)).max()))


def _repeated_gram_chars(d: Doc, n: int, sizes: tuple[int, ...] | None = None) -> int:
    """datatrove's ``find_all_duplicate(words, n)``: walk the n-grams (words joined without
    separator); an n-gram seen before adds its characters and the walk jumps n words, else it is
    remembered and the walk moves one word. Only n-grams whose hash occurs twice can be repeats,
    so the walk visits those alone and compares the strings themselves."""
    cand = d.repeat_candidates(sizes or (n,))[n]
    if not len(cand):
        return 0
    s, offsets, _, _ = d.joined()
    off = offsets.tolist()
    seen: set[str] = set()
    repeated, idx = 0, 0
    for p in cand.tolist():
        if p < idx:
            continue
        gram = s[off[p]:off[p + n]]
        if gram in seen:
            repeated += len(gram)
            idx = p + n
        else:
            seen.add(gram)
            idx = p + 1
    return repeated


# ---------------------------------------------------------------------------------------------
# C4

_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
_END_PUNCTUATION = (".", "?", "!", '"', "'")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")


@pydantic_dataclass(config=SETTINGS)
class C4LineCleaner(PerLanguage, C4Settings):
    """C4's line removal (Raffel et al. 2020, https://jmlr.org/papers/v21/20-074.html, and TFDS's
    ``c4_utils``), as the line loop of datatrove's ``C4QualityFilter``: each line is stripped,
    Wikipedia citation marks are removed, and the line is dropped if it has a word longer than
    ``max_word_length``, does not end in terminal punctuation (or ends in ``...``), has fewer than
    ``min_words_per_line`` words, mentions javascript or a cookie/terms policy. The kept lines are
    joined with ``\\n``. A line that makes datatrove drop the whole document (lorem ipsum, ``{``)
    is kept, and the lines after it are left out, so that :class:`C4QualityFilter`, applied next
    with the same flags, drops the document. ``counts`` tallies the lines by fate (for the stage's
    statistics). Lines are split as ``str.splitlines`` does (datatrove's ``split_paragraph=True``,
    C4's way; its sentence-splitting variant is not provided)."""

    name: ClassVar[str] = "c4_lines"

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "counts", Counter())  # lines seen, kept and removed per reason, summed over calls

    @property
    def name_in_table(self) -> str:
        return "c4"

    def __call__(self, text: str, lang: Language | None = None) -> str:
        rule = self.for_language(lang)
        return text if rule is None else rule[0].clean(text, self.counts)

    def clean(self, text: str, counts: Counter) -> str:
        """The kept lines of ``text`` under this cleaner's own values; tallies them in ``counts``."""
        kept: list[str] = []
        keep = kept.append
        max_len, min_words = self.max_word_length, self.min_words_per_line
        punct, cite = self.filter_no_terminal_punct, self.remove_citations and "[" in text
        flat = _CITATION.sub("", text) if cite else text
        low = flat.lower()
        words_hit = ((self.filter_lorem_ipsum and "lorem ipsum" in low) or (self.filter_javascript and "javascript" in low)
                     or (self.filter_policy and any(p in low for p in _POLICY)))
        curly_hit = self.filter_curly_bracket and "{" in flat
        n_long = n_punct = n_few = n_js = n_policy = 0
        lines = text.splitlines()
        stripped = list(map(str.strip, lines))
        if not (cite or words_hit or curly_hit or
                (max_len != -1 and stripped and max(map(len, stripped)) > max_len)):
            # the common case, same result: only the punctuation and word-count rules can apply
            kept = stripped
            if punct:
                kept = [line for line in kept if line.endswith(_END_PUNCTUATION) and not line.endswith("...")]
                n_punct = len(stripped) - len(kept)
            if min_words > 0:
                n = len(kept)
                kept = [line for line in kept if len(line.split()) >= min_words]
                n_few = n - len(kept)
            stripped = ()
        for line in stripped:
            if max_len != -1 and len(line) > max_len and any(len(w) > max_len for w in line.split()):
                n_long += 1
                continue
            words_line = line
            if cite and "[" in line:
                line = _CITATION.sub("", line)
            if punct and (not line.endswith(_END_PUNCTUATION) or line.endswith("...")):
                n_punct += 1
                continue
            if min_words > 0 and len(words_line.split()) < min_words:
                n_few += 1
                continue
            if words_hit or curly_hit:
                low = line.lower()
                if self.filter_lorem_ipsum and "lorem ipsum" in low:
                    keep(line)  # the document goes: C4QualityFilter drops it
                    break
                if self.filter_javascript and "javascript" in low:
                    n_js += 1
                    continue
                if self.filter_curly_bracket and "{" in line:
                    keep(line)
                    break
                if self.filter_policy and any(p in low for p in _POLICY):
                    n_policy += 1
                    continue
            keep(line)
        c = counts
        c["lines"] += len(lines)
        c["lines_kept"] += len(kept)
        for key, n in (("lines_too_long_word", n_long), ("lines_no_terminal_punct", n_punct),
                       ("lines_too_few_words", n_few), ("lines_javascript", n_js), ("lines_policy", n_policy)):
            if n:
                c[key] += n
        return "\n".join(kept).strip()


@pydantic_dataclass(config=SETTINGS)
class C4QualityFilter(PerLanguage, C4Settings):
    """C4's document rules (Raffel et al. 2020) on the text :class:`C4LineCleaner` left: drop it if
    a line contains "lorem ipsum" (``lorem_ipsum``) or ``{`` (``curly_bracket``), the first such line
    deciding, or if it has fewer than ``min_num_sentences`` sentences (``too_few_sentences``), counted
    per line with spaCy's sentencizer rule as datatrove does (see :func:`count_sentences`). Run it
    right after :class:`C4LineCleaner` with the same flags: together they decide what datatrove's
    ``C4QualityFilter`` decides (and leave its text)."""

    name: ClassVar[str] = "c4"

    def __call__(self, text: str, lang: Language | None = None) -> str | None:
        rule = self.for_language(lang)
        return None if rule is None else rule[0].check(text)

    def check(self, text: str) -> str | None:
        """The document rules of this filter's own values on ``text``."""
        lines = text.splitlines()
        lorem = self.filter_lorem_ipsum and "lorem ipsum" in text.lower()
        curly = self.filter_curly_bracket and "{" in text
        if lorem or curly:
            for line in lines:
                if lorem and "lorem ipsum" in line.lower():
                    return "lorem_ipsum"
                if curly and "{" in line:
                    return "curly_bracket"
        if self.min_num_sentences != -1 and len(lines) < self.min_num_sentences and \
                sum(count_sentences(line) for line in lines) < self.min_num_sentences:
            return "too_few_sentences"
        return None


# ---------------------------------------------------------------------------------------------
# FineWeb


@pydantic_dataclass(config=SETTINGS)
class FineWebQualityFilter(PerLanguage, FineWebSettings):
    """FineWeb's own heuristics (Penedo et al. 2024, https://arxiv.org/abs/2406.17557), as
    datatrove's ``FineWebQualityFilter``: share of lines ending in terminal punctuation, share of
    short lines, characters in duplicated lines, and newlines per word."""

    name: ClassVar[str] = "fineweb"

    def __post_init__(self) -> None:
        super().__post_init__()
        chars = TERMINAL_PUNCTUATION if self.stop_chars is None else self.stop_chars
        object.__setattr__(self, "_single", frozenset(chars) if all(len(c) == 1 for c in chars) else None)
        object.__setattr__(self, "_tuple", tuple(chars))

    def __call__(self, text: str, lang: Language | None = None) -> str | None:
        rule = self.for_language(lang)
        return None if rule is None else rule[0].check(text, rule[1])

    def check(self, text: str, splitter: str = "words") -> str | None:
        """The rules of this filter's own values on ``text`` split by ``splitter``."""
        lines = list(filter(str.strip, text.split("\n")))
        if not lines:
            return "empty"
        if self._single is not None:
            ending = sum(map(self._single.__contains__, [line[-1] for line in lines]))
        else:
            ending = sum(1 for line in lines if line.endswith(self._tuple))
        ratio = ending / len(lines)
        if ratio < self.line_punct_thr and not (ratio == 0 and self.line_punct_exclude_zero):
            return "line_punct_ratio"
        limit = self.short_line_length
        if sum(1 for line in lines if len(line) <= limit) / len(lines) > self.short_line_thr:
            return "short_line_ratio"
        if _find_duplicates(lines)[1] / (len(text) - text.count("\n")) > self.char_duplicates_ratio:
            return "char_dup_ratio"
        n_words = len(analyse(text, splitter).ids)
        if text.count("\n") / n_words > self.new_line_ratio:
            return "list_ratio"
        return None


# ---------------------------------------------------------------------------------------------
# language identification


@pydantic_dataclass(config=SETTINGS)
class LanguageFilter(LanguageSettings):
    """Keep documents in ``languages``: py3langid (a naive Bayes model over byte n-grams, 140
    languages, shipped in its PyPI package: offline; :mod:`lmcore.data.clean.langid`) gives each
    language a probability; the document is kept if one of ``languages`` scores above
    ``threshold`` (datatrove's ``LanguageFilter`` rule, with py3langid instead of fastText's
    lid.176, which would have to be downloaded), or, with ``languages: any``, if its most likely
    language does. Dropped as ``language:<code>`` when another language is the most likely, else
    ``language_score``. The stage identifies each document once and passes the result."""

    name: ClassVar[str] = "language"

    def scores(self, text: str) -> dict[str, float]:
        """Probability of every language for ``text``."""
        return language_scores(text, self.max_chars)

    def detect(self, text: str) -> tuple[str, float]:
        """The most likely language and its probability."""
        lang, p = max(self.scores(text).items(), key=lambda kv: kv[1])
        return lang, float(p)

    def __call__(self, text: str, lang: Language | None = None) -> str | None:
        scores = lang.scores if lang is not None else self.scores(text)
        if not scores:
            return "language_score"
        top = max(scores, key=scores.__getitem__)
        if self.languages == (ANY,):
            return None if scores[top] > self.threshold else "language_score"
        if any(scores.get(code, 0.0) > self.threshold for code in self.languages):
            return None
        return "language_score" if top in self.languages else f"language:{top}"
