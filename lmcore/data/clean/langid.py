"""Which language and script a document is in: identified once per document, read by every step.

The clean stage identifies each document right after the normalisers (:func:`identify`) and
hands the result (:class:`Language`) to every filter, to MinHash and to the output record
(``language``, ``language_score``), so the word splitting, the per-language thresholds and the
language mix of the report all agree on one decision per document.

Language
    py3langid (a naive Bayes model over byte n-grams, 142 classes incl. ``wuu``, ``yue``, shipped
    in its PyPI package, so it runs offline) scores every language on the first ``max_chars``
    characters. Its codes are ISO 639-1 where one exists (``zh``, ``ja``, ``th``, ``fr``), else
    ISO 639-3 (``wuu``, ``yue``, ``arz``).

Script
    :func:`dominant_script` counts letters per script (Unicode blocks; a kana character makes
    ``Japanese``, Han alone ``Han``), which decides how words are split when the language is one
    without a splitter of its own (:mod:`lmcore.data.clean.segment`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["Language", "LanguageIdentifier", "UNDETERMINED", "dominant_script", "identify", "language_scores"]

UNDETERMINED = "und"
"""ISO 639's code for "undetermined": a text without letters, or one no language scores on."""

_MODEL: dict[str, object] = {}

# script -> character class; the order breaks ties. Kana before Han: Japanese mixes both.
_SCRIPTS: dict[str, str] = {
    "Japanese": "\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f",  # hiragana, katakana (Han counted below)
    "Han": "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f",
    "Hangul": "\u1100-\u11ff\u3130-\u318f\ua960-\ua97f\uac00-\ud7af\ud7b0-\ud7ff",
    "Thai": "\u0e00-\u0e7f",
    "Lao": "\u0e80-\u0eff",
    "Khmer": "\u1780-\u17ff\u19e0-\u19ff",
    "Myanmar": "\u1000-\u109f\uaa60-\uaa7f",
    "Tibetan": "\u0f00-\u0fff",
    "Arabic": "\u0600-\u06ff\u0750-\u077f\u08a0-\u08ff\ufb50-\ufdff\ufe70-\ufeff",
    "Hebrew": "\u0590-\u05ff",
    "Devanagari": "\u0900-\u097f",
    "Bengali": "\u0980-\u09ff",
    "Cyrillic": "\u0400-\u052f\u2de0-\u2dff\ua640-\ua69f",
    "Greek": "\u0370-\u03ff\u1f00-\u1fff",
    "Latin": "A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\u1e00-\u1eff",
}
_SCRIPT_RE = {name: re.compile(f"[{chars}]") for name, chars in _SCRIPTS.items()}


@dataclass(frozen=True)
class Language:
    """One document's identification."""

    code: str
    """The most likely language (py3langid's code), or ``und``."""
    score: float
    """Its probability."""
    script: str
    """The script most of its letters are written in (:func:`dominant_script`), or ``none``."""
    scores: Mapping[str, float] = field(default_factory=dict, repr=False, compare=False)
    """Every language's probability (the language filter keeps a document if any allowed one
    scores above its threshold, not only the top one)."""


def _identifier():
    """py3langid's identifier (its model ships inside the package), loaded once per process."""
    ident = _MODEL.get("identifier")
    if ident is None:
        # lazy: loads its model (~1 s); a stage that never identifies a language does not pay it
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        ident = _MODEL["identifier"] = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    return ident


def language_scores(text: str, max_chars: int | None = 2000) -> dict[str, float]:
    """Probability of every language for the first ``max_chars`` characters of ``text``."""
    if max_chars is not None:
        text = text[:max_chars]
    return {lang: float(p) for lang, p in _identifier().rank(text.replace("\n", " "))}


def dominant_script(text: str, max_chars: int | None = 2000) -> str:
    """The script with the most letters among the first ``max_chars`` characters (``Japanese``
    once kana make a tenth of the Han and kana letters), or ``none`` without letters of a known
    script."""
    if max_chars is not None:
        text = text[:max_chars]
    if text.isascii():  # the common case in one C pass: only Latin letters can be there
        return "Latin" if _SCRIPT_RE["Latin"].search(text) else "none"
    counts = {name: len(rx.findall(text)) for name, rx in _SCRIPT_RE.items()}
    if counts["Japanese"] and counts["Japanese"] * 10 >= counts["Japanese"] + counts["Han"]:
        counts["Japanese"] += counts.pop("Han")
    best = max(counts, key=counts.__getitem__)
    return best if counts[best] else "none"


def identify(text: str, max_chars: int | None = 2000) -> Language:
    """Language and script of ``text`` (its first ``max_chars`` characters)."""
    script = dominant_script(text, max_chars)
    if script == "none" and not any(c.isalpha() for c in text[:max_chars]):
        return Language(UNDETERMINED, 0.0, script, {})
    scores = language_scores(text, max_chars)
    code = max(scores, key=scores.__getitem__) if scores else UNDETERMINED
    return Language(code, scores.get(code, 0.0), script, scores)


@dataclass
class LanguageIdentifier:
    """The clean stage's identification step (right after the normalisers): ``step(text)`` gives
    the document's :class:`Language`; ``counts`` tallies documents and characters per language.
    With ``languages`` false (no configured step needs the language) only the script is found
    (a regex count, ~50x cheaper than py3langid) and the language is ``und``."""

    max_chars: int | None = 2000
    languages: bool = True
    name = "language_id"

    def __post_init__(self) -> None:
        self.counts: Counter = Counter()

    def __call__(self, text: str) -> Language:
        if self.languages:
            lang = identify(text, self.max_chars)
        else:
            lang = Language(UNDETERMINED, 0.0, dominant_script(text, self.max_chars), {})
        self.counts[f"docs.{lang.code}"] += 1
        self.counts[f"chars.{lang.code}"] += len(text)
        return lang
