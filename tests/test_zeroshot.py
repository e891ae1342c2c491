"""Zero-shot scoring by log-likelihood, as lm-evaluation-harness's multiple_choice tasks do."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_export import tiny_model, tokenizer_dir  # noqa: F401  (the fixture)

from lmcore.core.errors import StageError
from lmcore.core.task_specs import TASKS
from lmcore.data.tokenizer import load as load_tokenizer
from lmcore.eval.harness import DecoderScorer
from lmcore.eval.zeroshot import (TEMPLATES, Template, loglikelihoods, multiple_choice, read_multiple_choice,
                                  request, zero_shot)


def test_the_glue_prompts_are_the_harness_prompts():
    assert TEMPLATES["cola"].context({"text_a": "The cat sat."}) == \
        "The cat sat.\nQuestion: Does this sentence make sense?\nAnswer:"
    assert TEMPLATES["rte"].context({"text_a": "A man runs.", "text_b": "A person moves."}) == \
        "A man runs.\nQuestion: A person moves. True or False?\nAnswer:"
    assert TEMPLATES["mnli"].context({"text_a": "P", "text_b": " H "}) == "P\nQuestion: H. True, False or Neither?\nAnswer:"
    assert TEMPLATES["qnli"].choices == ("yes", "no") and TEMPLATES["wnli"].choices == ("False", "True")


def test_request_splits_the_pair_where_the_context_tokens_end():
    def encode(text):  # one token per character
        return [ord(c) for c in text]

    assert request(encode, "Answer:", " yes") == ([ord(c) for c in "Answer:"], [ord(c) for c in " yes"])
    # a trailing space of the context goes to the continuation
    assert request(encode, "Answer: ", "yes") == ([ord(c) for c in "Answer:"], [ord(c) for c in " yes"])


def test_loglikelihoods_sum_the_choice_tokens_after_a_left_truncated_context(tmp_path):
    model = tiny_model(tmp_path / "m", block_size=8)
    scorer = DecoderScorer(model)
    reqs = [([5, 6, 7], [8, 9]), (list(range(10, 30)), [31]), ([], [4, 4])]
    got = loglikelihoods(scorer, reqs, prefix=0, batch_size=2)
    for (ctx, cont), value in zip(reqs, got):
        full = ((ctx or [0]) + cont)[-9:]
        logits, _ = model(torch.tensor([full[:-1]]))
        logp = F.log_softmax(logits.double(), -1)[0, -len(cont):]
        assert value == pytest.approx(float(logp.gather(1, torch.tensor(cont)[:, None]).sum()), rel=1e-6)


def test_zero_shot_scores_a_task_and_refuses_what_it_cannot(tmp_path, tokenizer_dir):  # noqa: F811
    model = tiny_model(tmp_path / "m", block_size=32)
    tok = load_tokenizer(tokenizer_dir / "tokenizer.json")
    examples = [{"text_a": t, "text_b": None, "label": y} for t, y in
                [("a fine film", 1), ("a dull film", 0), ("the king is good", 1), ("bad", 0)] * 3]
    z = zero_shot(DecoderScorer(model), lambda s: tok.encode(s).ids, 0, TASKS["sst2"], {"validation": examples})
    assert z["examples"] == 12
    encode = lambda s: tok.encode(s).ids  # noqa: E731
    right = right_norm = 0
    sst2 = TEMPLATES["sst2"]
    for ex in examples:  # by hand: the harness's prompt, label i's choice is choices[i]
        ll = [loglikelihoods(DecoderScorer(model), [request(encode, sst2.context(ex), " " + c)], 0)[0]
              for c in sst2.choices]
        right += max(range(2), key=ll.__getitem__) == ex["label"]
        right_norm += max(range(2), key=lambda i: ll[i] / len(sst2.choices[i])) == ex["label"]
    assert z["acc"] == right / 12 and z["acc_norm"] == right_norm / 12
    assert sst2.choices == ("negative", "positive")  # SST-2's label 1 is positive
    assert z["score"] == z["accuracy"] == z["acc"]  # SST-2's metric is accuracy, from the acc predictions
    with pytest.raises(StageError, match="regression"):
        zero_shot(DecoderScorer(model), lambda s: tok.encode(s).ids, 0, TASKS["stsb"], {"validation": examples})
    with pytest.raises(StageError, match="3 choices for 2 labels"):
        zero_shot(DecoderScorer(model), lambda s: tok.encode(s).ids, 0, TASKS["sst2"], {"validation": examples},
                  Template("{text_a}", ("a", "b", "c")))


def test_a_local_multiple_choice_file_is_scored_like_the_tasks(tmp_path, tokenizer_dir):  # noqa: F811
    import json

    model = tiny_model(tmp_path / "m", block_size=32)
    tok = load_tokenizer(tokenizer_dir / "tokenizer.json")
    rows = [{"context": "The king said", "choices": ["yes", "no", "the queen"], "gold": 2},
            {"context": "A fair night", "choices": ["swords", "a"], "gold": 0},
            {"context": "Twelve", "choices": ["king", "queen"], "gold": 1}]
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = read_multiple_choice(path)
    encode = lambda s: tok.encode(s).ids  # noqa: E731
    got = multiple_choice(DecoderScorer(model), encode, 0, items)
    right = right_norm = 0
    for ctx, choices, gold in items:  # by hand, one choice at a time
        ll = [loglikelihoods(DecoderScorer(model), [request(encode, ctx, " " + c)], 0)[0] for c in choices]
        right += max(range(len(ll)), key=ll.__getitem__) == gold
        right_norm += max(range(len(ll)), key=lambda i: ll[i] / len(choices[i])) == gold
    assert got == {"acc": right / 3, "acc_norm": right_norm / 3, "examples": 3}


@pytest.mark.parametrize("line,message", [
    ('{"context": "a", "choices": ["x", "y"]}', "mc.jsonl:2: no field gold"),
    ('{"context": "a", "choices": ["x"], "gold": 0}', "mc.jsonl:2: choices must be a list of at least two"),
    ('{"context": "a", "choices": ["x", "y"], "gold": 2}', "mc.jsonl:2: gold = 2 is not the index"),
])
def test_a_bad_multiple_choice_line_is_named(tmp_path, line, message):
    path = tmp_path / "mc.jsonl"
    path.write_text('{"context": "ok", "choices": ["x", "y"], "gold": 1}\n' + line + "\n")
    with pytest.raises(StageError, match=message):
        read_multiple_choice(path)


def test_mnli_zero_shot_reports_each_split_as_the_harness_does(tmp_path, tokenizer_dir):  # noqa: F811
    """MNLI's acc was pooled over matched and mismatched: neither of lm-evaluation-harness's two
    numbers (mnli, mnli_mismatch)."""
    import dataclasses

    model = tiny_model(tmp_path / "m", block_size=32)
    tok = load_tokenizer(tokenizer_dir / "tokenizer.json")
    scorer, encode = DecoderScorer(model), (lambda s: tok.encode(s).ids)
    pairs = [("the king is good", "he is fine", 0), ("a dull film", "it is bad", 1), ("rain", "the sun", 2)]
    matched = [{"text_a": a, "text_b": b, "label": y} for a, b, y in pairs * 2]
    mismatched = [{"text_a": b, "text_b": a, "label": y} for a, b, y in pairs]
    splits = dict(zip(TASKS["mnli"].validation_splits, (matched, mismatched)))
    z = zero_shot(scorer, encode, 0, TASKS["mnli"], splits)
    names = [s.removeprefix("validation_") for s in TASKS["mnli"].validation_splits]
    for split, name in zip(TASKS["mnli"].validation_splits, names):
        one = dataclasses.replace(TASKS["mnli"], validation_splits=(split,))
        alone = zero_shot(scorer, encode, 0, one, {split: splits[split]})
        assert z[f"acc_{name}"] == alone["acc"] and z[f"acc_norm_{name}"] == alone["acc_norm"]
    assert z["acc"] == pytest.approx((z[f"acc_{names[0]}"] * 6 + z[f"acc_{names[1]}"] * 3) / 9)
