"""Word splitting per language and script, for every step that counts words or builds shingles.

A *splitter* turns a whitespace-free chunk of text into its words (tokens that concatenate back
to the chunk). Which one a document gets follows from its identified language and script
(:func:`splitter_for`):

``words``
    Scripts that put spaces between words (Latin, Cyrillic, Greek, Arabic, Devanagari, Hangul...):
    spaCy's rule-based tokenizer as datatrove uses it (:mod:`lmcore.data.clean.words`), which
    splits punctuation off words.
``jieba``
    Chinese (``zh``, and ``wuu``/``yue``, written in Han characters; or Han text whose language was
    not identified, which without kana is Chinese): jieba's dictionary and HMM
    segmenter (``jieba.cut(chunk, cut_all=False)``), what spaCy's Chinese tokenizer calls and so
    what datatrove's ``load_word_tokenizer("zh")`` gives.
``chars``
    Any other script written without spaces (Japanese, Thai, Lao, Khmer, Myanmar, Tibetan, or
    Han text of another language): one word per character, punctuation and symbols included.
    Word-based rules have no sound definition on such "words": the filters skip them for these
    documents (and count it); MinHash uses character n-grams.

Segmenters are loaded on first use, once per process (jieba: ~0.6 s for its dictionary).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from lmcore.data.clean.langid import UNDETERMINED, Language

__all__ = ["CHINESE", "NO_SPACE_SCRIPTS", "SPLITTERS", "chunk_splitter", "splitter_for"]

SPLITTERS = ("words", "jieba", "chars")
CHINESE = frozenset({"zh", "wuu", "yue"})
"""py3langid's Chinese codes (Mandarin, Wu, Cantonese)."""
NO_SPACE_SCRIPTS = frozenset({"Han", "Japanese", "Thai", "Lao", "Khmer", "Myanmar", "Tibetan"})
"""Scripts written without spaces between words (:func:`lmcore.data.clean.langid.dominant_script`)."""

_LOADED: dict[str, Callable[[str], list[str]]] = {}


def splitter_for(lang: Language | None) -> str:
    """The splitter of a document: by its script first (a text in Thai letters is split as Thai
    whatever py3langid guessed), then by its language (Chinese: ``jieba``); ``words`` when nothing
    is known."""
    if lang is None or lang.script not in NO_SPACE_SCRIPTS:
        return "words"
    if lang.script == "Han" and (lang.code in CHINESE or lang.code == UNDETERMINED):
        return "jieba"  # Han letters without kana: Chinese, also when only the script is known
    return "chars"


def _jieba() -> Callable[[str], list[str]]:
    import jieba  # lazy: 0.6 s and a 5 MB dictionary; only Chinese documents need it

    jieba.setLogLevel(logging.WARNING)
    tok = jieba.Tokenizer()
    tok.initialize()

    def split(chunk: str) -> list[str]:
        return [w for w in tok.cut(chunk, cut_all=False, HMM=True) if w and not w.isspace()]

    return split


def _chars(chunk: str) -> list[str]:
    return list(chunk)


def chunk_splitter(name: str) -> Callable[[str], list[str]]:
    """The function that splits a whitespace-free chunk into words, for splitter ``name``
    (``jieba`` or ``chars``; ``words`` is :mod:`lmcore.data.clean.words`' own tokenizer)."""
    fn = _LOADED.get(name)
    if fn is None:
        if name == "jieba":
            fn = _jieba()
        elif name == "chars":
            fn = _chars
        else:
            raise ValueError(f"unknown splitter {name!r}: expected one of {', '.join(SPLITTERS[1:])}")
        _LOADED[name] = fn
    return fn
