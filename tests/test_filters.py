"""Behaviour of the document quality filters (lmcore.data.clean.filters): each rule drops a document
made to break it, with datatrove's reason, and keeps ordinary English prose; thresholds are fields;
the word splitter and the n-gram arithmetic match datatrove's definitions (re-stated here)."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter

import pytest

from lmcore.data.clean import filters as F
from lmcore.data.clean import words as W

PROSE = """The old lighthouse keeper climbed the narrow stairs every evening, carrying a lamp and a small notebook.
He wrote down the colour of the sky, the direction of the wind and the names of the ships that passed.
Over forty years the notebook grew into a shelf of volumes that nobody in the village had ever read.
When he finally retired, a young historian asked to borrow them and spent a whole winter with the pages.
She found storms that had never been recorded, and a ship that seemed to sail past on the same day each year.
The keeper only smiled when she told him, and said that the sea remembers more than people think."""

FRENCH = ("Le vieux gardien du phare montait chaque soir l'escalier étroit avec une lampe et un petit carnet. "
          "Il notait la couleur du ciel, la direction du vent et le nom des navires qui passaient au large.")
GERMAN = ("Der alte Leuchtturmwärter stieg jeden Abend die schmale Treppe hinauf, mit einer Lampe und einem "
          "kleinen Notizbuch. Er schrieb die Farbe des Himmels und die Richtung des Windes auf.")


def words(n: int, vocab: str = "alpha bravo charlie delta echo foxtrot golf hotel india juliet") -> str:
    v = vocab.split()
    return " ".join(v[i % len(v)] for i in range(n))


def all_steps():
    return [F.C4LineCleaner(), F.C4QualityFilter(), F.GopherQualityFilter(), F.GopherRepetitionFilter(),
            F.FineWebQualityFilter()]


def run(steps, text: str) -> tuple[str | None, str]:
    for step in steps:
        if isinstance(step, F.C4LineCleaner):
            text = step(text)
        elif reason := step(text):
            return f"{step.name}:{reason}", text
    return None, text


# ---------------------------------------------------------------------------------------------
# the API


def test_every_filter_is_a_documented_dataclass_with_a_name():
    for cls in (F.GopherQualityFilter, F.GopherRepetitionFilter, F.C4LineCleaner, F.C4QualityFilter,
                F.FineWebQualityFilter, F.LanguageFilter):
        assert dataclasses.is_dataclass(cls) and cls.__doc__
        assert isinstance(cls.name, str) and cls.name
        assert "name" not in {f.name for f in dataclasses.fields(cls)}  # a ClassVar, not a field
    names = [c.name for c in (F.GopherQualityFilter, F.GopherRepetitionFilter, F.C4LineCleaner,
                              F.C4QualityFilter, F.FineWebQualityFilter, F.LanguageFilter)]
    assert len(set(names)) == len(names)


def test_prose_passes_every_filter_unchanged():
    reason, text = run(all_steps(), PROSE)
    assert reason is None
    assert text == PROSE
    assert F.LanguageFilter()(PROSE) is None


# ---------------------------------------------------------------------------------------------
# word splitting: spaCy's English tokenizer, as datatrove uses it


@pytest.mark.parametrize("text, expected", [
    ("Don't stop, Mr. Smith's dog! It's 5pm (well-known).",
     ["Do", "n't", "stop", ",", "Mr.", "Smith", "'s", "dog", "!", "It", "'s", "5", "pm", "(", "well", "-", "known",
      ")", "."]),
    ("I'll see thee anon;) said he: 'Twas e.g. fine...",
     ["I", "'ll", "see", "thee", "anon", ";)", "said", "he", ":", "'", "Twas", "e.g.", "fine", "..."]),
    ("Visit https://example.com/a?b=1 or www.test.org, then email me.",
     ["Visit", "https://example.com/a?b=1", "or", "www.test.org", ",", "then", "email", "me", "."]),
])
def test_split_words_matches_spacy(text, expected):
    assert W.split_words(text) == expected


@pytest.mark.parametrize("line, n", [
    ("Hello there. General Kenobi! You are a bold one.", 3),
    ("Mr. Smith went to Washington.", 1),
    ("Wait... what? No way.", 2),
    ('He said "stop." Then left.', 2),
    ("One sentence only", 1),
])
def test_count_sentences_matches_spacy_sentencizer(line, n):
    assert W.count_sentences(line) == n


# ---------------------------------------------------------------------------------------------
# Gopher quality


@pytest.mark.parametrize("text, reason, overrides", [
    ("The cat and the dog sat.", "gopher_short_doc", {}),
    (PROSE, "gopher_long_doc", {"max_doc_words": 100}),
    (" ".join(["to be or so it is of the and he we me"] * 8), "gopher_below_avg_threshold", {}),
    (" ".join(["extraordinarily incomprehensible characteristically the and"] * 15), "gopher_above_avg_threshold",
     {}),
    (PROSE + " #news" * 25, "gopher_too_many_hashes", {}),
    (PROSE + " wait..." * 25, "gopher_too_many_ellipsis", {}),
    ("\n".join(f"- the item number {words(6)} and more" for _ in range(12)), "gopher_too_many_bullets", {}),
    ("\n".join(f"the story of {words(8)} and then..." for _ in range(12)), "gopher_too_many_end_ellipsis",
     {"max_symbol_word_ratio": None}),
    (" ".join(f"the {1000 + i} and {2000 + 7 * i} of {30000 + i} {40000 + i}" for i in range(30)),
     "gopher_below_alpha_threshold", {}),
    (words(80) + ".", "gopher_enough_stop_words", {}),
])
def test_gopher_quality_rules(text, reason, overrides):
    assert F.GopherQualityFilter(**overrides)(text) == reason
    assert F.GopherQualityFilter()(PROSE) is None


def test_gopher_quality_thresholds_are_fields():
    short = "The quick brown foxes jumped over the lazy dogs and swam to the river."
    assert F.GopherQualityFilter()(short) == "gopher_short_doc"
    assert F.GopherQualityFilter(min_doc_words=5)(short) is None
    assert F.GopherQualityFilter(min_doc_words=None, min_stop_words=3, stop_words=("zebra", "yak", "the"))(
        short) == "gopher_enough_stop_words"
    assert F.GopherQualityFilter(min_doc_words=None)("") == "gopher_short_doc"


# ---------------------------------------------------------------------------------------------
# Gopher repetition


def test_gopher_repetition_rules():
    f = F.GopherRepetitionFilter()
    assert f(PROSE) is None
    assert f("") == "empty"
    para = "This paragraph says the same thing again and again."
    assert f("\n\n".join([para] * 3 + [PROSE])) == "dup_para_frac"
    big = PROSE.replace("\n", " ")
    assert f("\n\n".join([big, "A short paragraph here.", big, "Another short one."])) == "dup_para_char_frac"
    lines = PROSE.split("\n")
    assert f("\n".join(lines + lines[:3])) == "dup_line_frac"
    assert F.GopherRepetitionFilter(dup_line_frac=None)("\n".join(lines + lines[:2])) == "dup_line_char_frac"
    assert f("\n".join(f"w{i} extraordinary circumstances v{i}." for i in range(12))) == "top_2_gram"
    story = PROSE.replace("\n", " ").split()
    assert f(" ".join(story[:40] + story[:40] + story[40:])) == "duplicated_5_n_grams"
    assert F.GopherRepetitionFilter(dup_n_grams=((5, 0.5),))(" ".join(story[:40] + story[:40] + story[40:])) is None


def reference_find_all_duplicate(ws: list[str], n: int) -> int:
    """datatrove 0.10.1 gopher_repetition_filter.find_all_duplicate, verbatim."""
    unique, repeated, idx = set(), 0, 0
    while idx < len(ws) - n + 1:
        gram = "".join(ws[idx:idx + n])
        if gram in unique:
            repeated += len(gram)
            idx += n
        else:
            unique.add(gram)
            idx += 1
    return repeated


def reference_top(ws: list[str], n: int) -> int:
    """datatrove 0.10.1 find_top_duplicate(get_n_grams(words, n)), verbatim."""
    grams = [" ".join(ws[i:i + n]) for i in range(len(ws) - n + 1)]
    gram, count = Counter(grams).most_common(1)[0]
    return len(gram) * count


def test_ngram_arithmetic_matches_datatrove_definitions():
    rng = random.Random(0)
    vocab = ["a", "ab", "b", "abc", "c", "bc", "the", "cat", ",", "."]
    for _ in range(300):
        ws = [rng.choice(vocab) for _ in range(rng.randint(5, 60))]
        text = " ".join(ws)
        d = W.analyse(text)
        assert W.split_words(text) == ws
        for n in (2, 3, 4):
            assert F._top_gram_chars(d, n) == reference_top(ws, n)
            assert F._top_gram_chars(d, n) <= F._top_gram_bound(d, n)
        for n in range(5, 11):
            assert F._repeated_gram_chars(d, n) == reference_find_all_duplicate(ws, n)


# ---------------------------------------------------------------------------------------------
# C4


def test_c4_line_cleaner_removes_the_lines_c4_removes():
    text = "\n".join([
        "The first line is a fine sentence.",
        "Please enable JavaScript to view this page properly.",
        "By using this site you agree to our Terms of Use and privacy policy.",
        "A heading without a full stop",
        "Too short.",
        "And the story trails off...",
        "The war ended in 1945 [12] after six long years.",
        "   The last line is also a fine sentence!   ",
    ])
    cleaner = F.C4LineCleaner()
    assert cleaner(text) == "\n".join([
        "The first line is a fine sentence.",
        "The war ended in 1945  after six long years.",
        "The last line is also a fine sentence!",
    ])
    assert cleaner.counts["lines"] == 8 and cleaner.counts["lines_kept"] == 3
    assert cleaner.counts["lines_javascript"] == 1 and cleaner.counts["lines_policy"] == 1
    assert cleaner.counts["lines_no_terminal_punct"] == 2 and cleaner.counts["lines_too_few_words"] == 1
    assert F.C4LineCleaner(filter_javascript=False, filter_policy=False, filter_no_terminal_punct=False,
                           min_words_per_line=-1)(text).count("\n") == 7


@pytest.mark.parametrize("extra, reason", [
    ("Lorem ipsum dolor sit amet, consectetur adipiscing elit.", "lorem_ipsum"),
    ("The function body is { return x; } in this example.", "curly_bracket"),
])
def test_c4_drops_documents_with_lorem_ipsum_or_curly_brackets(extra, reason):
    lines = PROSE.split("\n")
    text = "\n".join(lines[:2] + [extra] + lines[2:])
    assert run([F.C4LineCleaner(), F.C4QualityFilter()], text)[0] == f"c4:{reason}"
    off = {f"filter_{reason}": False}
    assert run([F.C4LineCleaner(**off), F.C4QualityFilter(**off)], text) == (None, text)  # same flags on both


def test_c4_too_few_sentences():
    two = "The first sentence is here. The second one follows it.\nA third line has no end"
    assert run([F.C4LineCleaner(), F.C4QualityFilter()], two)[0] == "c4:too_few_sentences"
    assert F.C4QualityFilter(min_num_sentences=2)(F.C4LineCleaner()(two)) is None
    assert F.C4QualityFilter(min_num_sentences=-1)("") is None
    five = "One is here. Two is here. Three is here. Four is here. Five is here."
    assert F.C4QualityFilter()(five) is None


def reference_c4(text: str) -> tuple[bool, str | None, str]:
    """datatrove 0.10.1 C4QualityFilter.filter with default arguments, re-stated (sentences
    counted with count_sentences): (kept, reason, text)."""
    num_sentences, kept = 0, []
    for line in text.splitlines():
        line = line.strip()
        ws = line.split()
        if any(len(w) > 1000 for w in ws):
            continue
        line = F._CITATION.sub("", line)
        if not line.endswith((".", "?", "!", '"', "'")) or line.endswith("..."):
            continue
        if len(ws) < 3:
            continue
        low = line.lower()
        if "lorem ipsum" in low:
            return False, "lorem_ipsum", text
        if "javascript" in low:
            continue
        if "{" in line:
            return False, "curly_bracket", text
        if any(p in low for p in F._POLICY):
            continue
        num_sentences += W.count_sentences(line)
        kept.append(line)
    if num_sentences < 5:
        return False, "too_few_sentences", text
    return True, None, "\n".join(kept).strip()


def test_c4_cleaner_then_filter_equals_datatrove_c4():
    pool = PROSE.split("\n") + [
        "Enable javascript please, it is needed.", "See our cookie policy for more.", "No end here",
        "Short one.", "Lorem Ipsum is simply dummy text.", "We use {braces} sometimes.", "Trailing dots here...",
        "A citation [3] sits here.", "Two sentences. In one line.", "  ", "Mr. Smith is here, he said.",
    ]
    rng = random.Random(1)
    for _ in range(300):
        text = "\n".join(rng.choice(pool) for _ in range(rng.randint(1, 9)))
        kept, reason, out = reference_c4(text)
        cleaned = F.C4LineCleaner()(text)
        got = F.C4QualityFilter()(cleaned)
        assert got == reason, text
        if kept:
            assert cleaned == out


# ---------------------------------------------------------------------------------------------
# FineWeb


def test_fineweb_rules():
    f = F.FineWebQualityFilter()
    assert f(PROSE) is None
    assert f("\n \n") == "empty"
    no_punct = "\n".join(f"{words(8)} and a line without an end number {i}" for i in range(10))
    assert f(no_punct) == "line_punct_ratio"
    assert F.FineWebQualityFilter(line_punct_thr=0.0)(no_punct) is None
    assert F.FineWebQualityFilter(line_punct_exclude_zero=True)(no_punct) is None
    short = "\n".join(f"Item {i} is here." for i in range(15)) + "\n" + PROSE
    assert f(short) == "short_line_ratio"
    assert F.FineWebQualityFilter(short_line_length=5)(short) is None
    dup = PROSE + "\n" + PROSE.split("\n")[0]
    assert f(dup) == "char_dup_ratio"
    assert F.FineWebQualityFilter(char_duplicates_ratio=0.5)(dup) is None
    lst = "\n".join(f"The {w} is truly great and very good indeed." for w in words(20).split())
    assert F.FineWebQualityFilter(char_duplicates_ratio=1.0)(lst) is None
    assert F.FineWebQualityFilter(char_duplicates_ratio=1.0, new_line_ratio=0.05)(lst) == "list_ratio"
    assert F.FineWebQualityFilter(stop_chars=("!",))(PROSE) == "line_punct_ratio"


# ---------------------------------------------------------------------------------------------
# language


def test_language_filter_keeps_english_and_drops_french_and_german():
    f = F.LanguageFilter()
    assert f(PROSE) is None
    lang, score = f.detect(PROSE)
    assert lang == "en" and score > 0.65
    assert f(FRENCH) == "language:fr"
    assert f(GERMAN) == "language:de"
    assert f.detect(FRENCH)[0] == "fr"
    assert F.LanguageFilter(languages=("fr", "de"))(FRENCH) is None
    assert F.LanguageFilter(languages=("fr",))(GERMAN) == "language:de"
    with pytest.raises(ValueError, match="less than or equal to 1"):  # a threshold in per cent (65) is refused
        F.LanguageFilter(threshold=65)


def test_same_results_across_vocabulary_resets_and_pickling(monkeypatch):
    import pickle

    texts = [PROSE, PROSE.replace("keeper", "warden"), "\n".join([PROSE] * 3), words(80) + "."]
    steps = [F.GopherQualityFilter(), F.GopherRepetitionFilter(), F.FineWebQualityFilter()]
    expected = [[s(t) for s in steps] for t in texts]
    monkeypatch.setattr(W.Vocab, "MAX_CHUNKS", 5)  # a fresh vocabulary for nearly every text
    assert [[s(t) for s in steps] for t in texts] == expected
    copies = pickle.loads(pickle.dumps(steps))  # as a process pool ships them
    assert [[s(t) for s in copies] for t in texts] == expected
    assert len(pickle.dumps(steps)) < 10_000  # no vocabulary or cached text inside


def test_line_marks_follow_str_splitlines():
    rng = random.Random(2)
    pieces = ["- item", "• dot", "  - indented", "text...", "more …", "plain", "", "  ", "a ... b", "x...  "]
    for _ in range(300):
        seps = ["\n"] * 6 + ["\r\n", "\r", "\u2028", "\x0b"]
        text = "".join(rng.choice(pieces) + rng.choice(seps) for _ in range(rng.randint(1, 8)))
        text = text if rng.random() < 0.5 else text.rstrip("\n")
        lines = text.splitlines()
        expected = (sum(s.lstrip().startswith(("•", "-")) for s in lines),
                    sum(s.rstrip().endswith(("...", "…")) for s in lines), len(lines))
        assert F._line_marks(text) == expected, repr(text)


def test_sentences_with_runs_of_spaces_and_quotes():
    assert W.count_sentences("It rained.  Then it stopped.") == 2
    assert W.count_sentences("(Really?) Yes.") == 2
    assert W.count_sentences("Dr. Who arrived at 5 p.m. and left.") == 1


def test_threads_splitting_words_at_once_get_the_words_of_one_thread():
    """The vocabulary and the last analysed document were shared by every thread of a process: a
    threaded task runner (Dask's workers) got other documents' words."""
    from concurrent.futures import ThreadPoolExecutor

    rng = random.Random(0)
    vocab = ["alpha", "beta,", "gamma;", "delta.", "don't", "U.S.", "e-mail", "(paren)", "x:y", "http://a.b/c"]
    docs = [" ".join(rng.choice(vocab) + str(rng.randint(0, 50)) for _ in range(200)) for _ in range(300)]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(W.split_words, docs))
    assert threaded == [W.split_words(d) for d in docs]
