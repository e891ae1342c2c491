"""Document-level scoring as lm-evaluation-harness defines it: its rolling windows, its word
and byte counts, and the same numbers from lmcore's decoder and from transformers on the export."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import make_text
from test_export import VOCAB, tiny_model, tokenizer_dir  # noqa: F401  (the fixture)

from lmcore.config import ExportConfig, TrackingConfig
from lmcore.eval.evaluate import score_model_documents
from lmcore.eval.harness import DecoderScorer, count_words, rolling_windows, score_documents
from lmcore.export import export


def test_rolling_windows_are_the_harness_windows():
    # lm-eval 0.4.13 utils.get_rolling_token_windows(list(range(10)), -1, 4, 1) + make_disjoint_window
    assert rolling_windows(list(range(10)), -1, 4) == [([-1], [0, 1, 2, 3]), ([3], [4, 5, 6, 7]),
                                                       ([5, 6, 7], [8, 9])]
    assert rolling_windows([7, 8], 0, 4) == [([0], [7, 8])]
    assert rolling_windows([], 0, 4) == []


@pytest.mark.parametrize("n,max_len", [(1, 1), (5, 1), (9, 3), (32, 8), (33, 8), (100, 7)])
def test_every_token_is_predicted_once_with_at_most_max_len_inputs(n, max_len):
    tokens = list(range(100, 100 + n))
    windows = rolling_windows(tokens, -1, max_len)
    assert [t for _, cont in windows for t in cont] == tokens
    for ctx, cont in windows:
        seq = (ctx + cont)[:-1]
        assert len(seq) <= max_len and len(cont) >= 1
    for ctx, cont in windows[1:]:  # each later window reads the tokens right before its continuation
        start = tokens.index(cont[0])
        assert ctx == tokens[start - len(ctx) : start]


def test_word_and_byte_counts_follow_the_harness():
    assert count_words("The quick brown fox. " * 2) == 9  # the trailing space counts one more, as in lm-eval
    assert count_words("one two") == 2


def test_a_document_is_scored_from_its_prefix_token_with_full_context(tmp_path):
    model = tiny_model(tmp_path / "m", block_size=16)
    scorer = DecoderScorer(model)
    rng = random.Random(1)
    docs = [[rng.randrange(1, VOCAB) for _ in range(n)] for n in (5, 16, 40)]
    texts = ["a b", "c", "dé f g"]
    got = score_documents(scorer, docs, texts, prefix=0, batch_size=2)
    # by hand: the first window from the prefix, each later one with the 16 tokens before it
    for d, toks in enumerate(docs):
        ll = 0.0
        for ctx, cont in rolling_windows(toks, 0, 16):
            seq = torch.tensor([(ctx + cont)[:-1]])
            with torch.no_grad():
                logits, _ = model(seq)
            logp = F.log_softmax(logits.double(), -1)[0, -len(cont):]
            ll += float(logp.gather(1, torch.tensor(cont)[:, None]).sum())
        assert got.loglikelihoods[d] == pytest.approx(ll, rel=1e-6)
    assert got.bytes == [3, 1, 7] and got.words == [2, 1, 3]
    assert got.bits_per_byte == pytest.approx(-sum(got.loglikelihoods) / (11 * math.log(2)))
    assert got.word_perplexity == pytest.approx(math.exp(-sum(got.loglikelihoods) / 6))


def test_lmcore_and_transformers_give_the_same_numbers_on_the_export(tmp_path, tokenizer_dir):  # noqa: F811
    tiny_model(tmp_path / "final", block_size=32)
    export(ExportConfig(), tmp_path / "final", tokenizer_dir, tmp_path / "export", tmp_path / "export.json",
           TrackingConfig(enabled=False))
    rng = random.Random(2)
    texts = [make_text(rng, n) for n in (3, 30, 90)]
    ours, b1 = score_model_documents(tmp_path / "final", texts, tokenizer_dir)
    hf, b2 = score_model_documents(tmp_path / "export", texts)
    assert (b1, b2) == ("lmcore", "transformers")
    assert hf.tokens == ours.tokens and max(ours.tokens) > 32  # several windows
    for a, b in zip(ours.loglikelihoods, hf.loglikelihoods):
        assert a == pytest.approx(b, rel=1e-5)
    assert ours.bits_per_byte == pytest.approx(hf.bits_per_byte, rel=1e-6)


@pytest.mark.parametrize("flag, value", [("--batch-size", "-1"), ("--batch-size", "0"), ("--limit", "0")])
def test_score_refuses_counts_below_one(flag, value, capsys):
    """A batch size of -1 used to score nothing and report a perfect 0 bits per byte."""
    from lmcore.cli import main

    with pytest.raises(SystemExit) as e:
        main(["score", "runs/pretrain/final", flag, value])
    assert e.value.code == 2 and f"argument {flag}: '{value}' is not a whole number >= 1" in capsys.readouterr().err


def test_text_without_spaces_reports_an_infinite_word_perplexity_not_a_crash():
    """A Japanese paragraph is one whitespace "word": its NLL passes the 709 nats where exp
    overflowed, after the whole scoring had run."""
    from lmcore.eval.harness import DocumentScores

    text = "吾輩は猫である。名前はまだ無い。" * 20
    s = DocumentScores([-900.0], [len(text.encode("utf-8"))], [count_words(text)], [300])
    m = s.metrics("lm.")
    assert m["lm.word_perplexity"] == math.inf and math.isfinite(m["lm.byte_perplexity"])
    assert m["lm.doc_bpb"] == pytest.approx(900 / (len(text.encode("utf-8")) * math.log(2)))


def test_documents_without_text_are_refused_by_name(tmp_path):
    from lmcore.core.errors import StageError

    model = tiny_model(tmp_path / "m")
    with pytest.raises(StageError, match="no text among them"):
        score_documents(DecoderScorer(model), [[], []], ["", ""], prefix=0)


def test_score_json_is_strict_json_and_task_scoring_refuses_text_options(tmp_path, tokenizer_dir, capsys):  # noqa: F811
    """--json printed `Infinity` for the word perplexity of text without spaces (not JSON); --limit,
    --texts and --text-field were silently ignored with --task / --multiple-choice (a quick
    --limit 50 ran the whole task)."""
    import json

    from lmcore.cli import main

    tiny_model(tmp_path / "final", block_size=32)
    (tmp_path / "cjk.txt").write_text("吾輩は猫である。名前はまだ無い。" * 40, encoding="utf-8")
    code = main(["score", str(tmp_path / "final"), "--tokenizer", str(tokenizer_dir), "--texts",
                 str(tmp_path / "cjk.txt"), "--json"])
    out = capsys.readouterr().out

    def refuse(constant: str):
        raise ValueError(f"not JSON: {constant}")

    got = json.loads(out, parse_constant=refuse)
    assert code == 0 and got["word_perplexity"] is None and got["bits_per_byte"] > 0
    (tmp_path / "mc.jsonl").write_text(json.dumps({"context": "a", "choices": ["b", "c"], "gold": 0}) + "\n")
    code = main(["score", str(tmp_path / "final"), "--tokenizer", str(tokenizer_dir), "--multiple-choice",
                 str(tmp_path / "mc.jsonl"), "--limit", "1"])
    assert code == 2 and "--limit: for text scoring, not with --multiple-choice" in capsys.readouterr().err
    code = main(["score", str(tmp_path / "final"), "--task", "sst2", "--multiple-choice", str(tmp_path / "mc.jsonl")])
    assert code == 2 and "give one" in capsys.readouterr().err
    code = main(["score", str(tmp_path / "final"), "--backend", "transformers", "--tokenizer", str(tokenizer_dir)])
    assert code == 2 and "--tokenizer is for lmcore model folders" in capsys.readouterr().err
