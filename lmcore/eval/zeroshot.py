"""Zero-shot scores of a language model on labelled tasks, by log-likelihood, as
lm-evaluation-harness scores its ``multiple_choice`` tasks.

Each example becomes a context (the task's prompt template, lm-eval's own for the GLUE tasks) and
one continuation per choice, ``" " + choice`` (lm-eval's ``target_delimiter``). The context and the
continuation are tokenized together and split where the context's own tokens end; the model reads
the last ``max_len`` tokens before each continuation token; a choice's log-likelihood is the sum
over its tokens. ``acc``: the choice of highest log-likelihood; ``acc_norm``: of highest
log-likelihood per character of the choice (``len(choice)``, without the space). The task's own
metrics (Matthews correlation for CoLA, F1 for MRPC and QQP...) and score are computed from the
``acc`` predictions. Regression tasks (STS-B) have no zero-shot form here. Local
multiple-choice files (a context, its choices, the gold index) are scored the same way
(:func:`multiple_choice`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmcore.core.errors import StageError
from lmcore.core.io import read_jsonl_lines
from lmcore.data import glue

SST2 = ("{text_a}\nQuestion: Is this sentence positive or negative?\nAnswer:", ("negative", "positive"))


@dataclasses.dataclass(frozen=True)
class Template:
    """A prompt template (``{text_a}``, ``{text_b}``) and the choices, in label id order."""

    text: str | Callable[[dict[str, Any]], str]
    choices: tuple[str, ...]

    def context(self, example: dict[str, Any]) -> str:
        if callable(self.text):
            return self.text(example)
        return self.text.format(text_a=example.get("text_a") or "", text_b=example.get("text_b") or "")


def _mnli(example: dict[str, Any]) -> str:
    hyp = (example.get("text_b") or "").strip()
    return f"{example.get('text_a') or ''}\nQuestion: {hyp}{'' if hyp.endswith('.') else '.'} True, False or Neither?\nAnswer:"


# lm-evaluation-harness 0.4.13, lm_eval/tasks/glue/<task>/default.yaml (mnli: utils.doc_to_text);
# rotten_tomatoes (not a harness task) takes SST-2's, the same kind of movie-review polarity
TEMPLATES: dict[str, Template] = {
    "cola": Template("{text_a}\nQuestion: Does this sentence make sense?\nAnswer:", ("no", "yes")),
    "sst2": Template(*SST2),
    "rotten_tomatoes": Template(*SST2),
    "mrpc": Template("Sentence 1: {text_a}\nSentence 2: {text_b}\nQuestion: Do both sentences mean the same "
                     "thing?\nAnswer:", ("no", "yes")),
    "qqp": Template("Question 1: {text_a}\nQuestion 2: {text_b}\nQuestion: Do both questions ask the same "
                    "thing?\nAnswer:", ("no", "yes")),
    "qnli": Template("{text_a}\n{text_b}\nQuestion: Does this response answer the question?\nAnswer:", ("yes", "no")),
    "rte": Template("{text_a}\nQuestion: {text_b} True or False?\nAnswer:", ("True", "False")),
    "wnli": Template("{text_a}\nQuestion: {text_b} True or False?\nAnswer:", ("False", "True")),
    "mnli": Template(_mnli, ("True", "Neither", "False")),
}


def request(encode: Callable[[str], list[int]], context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's ``_encode_pair``: trailing spaces of the context go to the continuation; the
    pair is tokenized whole and split after the context's own tokens."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = encode(context + continuation)
    ctx = encode(context)
    return whole[: len(ctx)], whole[len(ctx) :]


@torch.no_grad()
def loglikelihoods(scorer: Any, requests: Sequence[tuple[list[int], list[int]]], prefix: int,
                   batch_size: int = 32) -> list[float]:
    """Sum of the log-probabilities of each continuation after its context (an empty context
    becomes the prefix token), the inputs left-truncated to the model's context."""
    max_len = scorer.max_len
    jobs = []
    for i, (ctx, cont) in enumerate(requests):
        if not cont:
            raise StageError("a choice with no tokens to score")
        seq = ((ctx or [prefix]) + cont)[-(max_len + 1) :][:-1]
        jobs.append((i, seq, min(len(cont), len(seq)), cont[-min(len(cont), len(seq)) :]))
    jobs.sort(key=lambda j: -len(j[1]))
    out = [0.0] * len(requests)
    device = next(scorer.model.parameters()).device
    for b in range(0, len(jobs), batch_size):
        chunk = jobs[b : b + batch_size]
        width = max(len(seq) for _, seq, _, _ in chunk)
        x = torch.zeros((len(chunk), width), dtype=torch.long)
        y = torch.full((len(chunk), width), -100, dtype=torch.long)
        for r, (_, seq, n, cont) in enumerate(chunk):
            x[r, : len(seq)] = torch.tensor(seq)
            y[r, len(seq) - n : len(seq)] = torch.tensor(cont)
        nll = scorer.nll(x.to(device), y.to(device)).cpu().tolist()
        for (i, _, _, _), v in zip(chunk, nll):
            out[i] = -v
    return out


def zero_shot(scorer: Any, encode: Callable[[str], list[int]], prefix: int, spec: glue.TaskSpec,
              splits: dict[str, list[dict[str, Any]]], template: Template | None = None,
              batch_size: int = 32) -> dict[str, Any]:
    """Zero-shot metrics of a task's validation split(s): ``acc``, ``acc_norm``, the task's own
    metrics and ``score`` (from the ``acc`` predictions), and ``examples``. A task of several
    validation splits (MNLI) also gets ``acc_<split>`` and ``acc_norm_<split>`` per split
    (``acc_matched``...: what lm-evaluation-harness reports as ``mnli`` and ``mnli_mismatch``);
    its ``acc`` is over all of its examples."""
    template = template or TEMPLATES.get(spec.name)
    if spec.is_regression:
        raise StageError(f"{spec.name}: a regression task has no multiple-choice zero-shot form")
    if template is None:
        raise StageError(f"{spec.name}: no prompt template (zero-shot templates exist for "
                         f"{', '.join(sorted(TEMPLATES))})")
    if len(template.choices) != spec.num_labels:
        raise StageError(f"{spec.name}: the template has {len(template.choices)} choices for "
                         f"{spec.num_labels} labels")
    preds, preds_norm, labels, out = {}, {}, {}, {}
    correct = correct_norm = total = 0
    for split in spec.validation_splits:
        examples = splits[split]
        reqs = [request(encode, template.context(e), " " + c) for e in examples for c in template.choices]
        ll = np.asarray(loglikelihoods(scorer, reqs, prefix, batch_size)).reshape(len(examples), -1)
        chars = np.asarray([len(c) for c in template.choices], dtype=float)
        preds[split] = ll.argmax(1).tolist()
        preds_norm[split] = (ll / chars).argmax(1).tolist()
        labels[split] = [int(e["label"]) for e in examples]
        hits = sum(p == y for p, y in zip(preds[split], labels[split]))
        hits_norm = sum(p == y for p, y in zip(preds_norm[split], labels[split]))
        if len(spec.validation_splits) > 1:
            name = split.removeprefix("validation_")
            out[f"acc_{name}"], out[f"acc_norm_{name}"] = hits / len(examples), hits_norm / len(examples)
        correct, correct_norm, total = correct + hits, correct_norm + hits_norm, total + len(examples)
    metrics = glue.evaluate_splits(spec, preds, labels)
    out = {"acc": correct / total, "acc_norm": correct_norm / total, **out, **metrics,
           "score": glue.task_score(spec, metrics), "examples": total}
    return out


def read_multiple_choice(path: str | Path, context_field: str = "context", choices_field: str = "choices",
                         gold_field: str = "gold") -> list[tuple[str, list[str], int]]:
    """``(context, choices, gold)`` of every line of a multiple-choice JSONL file; a line without
    the fields, with fewer than two string choices or a gold index outside them stops with the
    file and line."""
    items = []
    for line, obj in read_jsonl_lines(path):
        where = f"{path}:{line}"
        missing = [f for f in (context_field, choices_field, gold_field) if f not in obj]
        if missing:
            raise StageError(f"{where}: no field {', '.join(missing)} (has {', '.join(sorted(obj)) or 'none'})")
        choices, gold = obj[choices_field], obj[gold_field]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise StageError(f"{where}: {choices_field} must be a list of at least two non-empty strings")
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise StageError(f"{where}: {gold_field} = {gold!r} is not the index of one of the {len(choices)} choices")
        items.append((str(obj[context_field]), choices, gold))
    if not items:
        raise StageError(f"{path}: no examples")
    return items


def multiple_choice(scorer: Any, encode: Callable[[str], list[int]], prefix: int,
                    items: Sequence[tuple[str, Sequence[str], int]], batch_size: int = 32) -> dict[str, Any]:
    """``acc``, ``acc_norm`` and ``examples`` of ``(context, choices, gold)`` items (any number of
    choices per item), scored as the tasks are."""
    reqs = [request(encode, ctx, " " + c) for ctx, choices, _ in items for c in choices]
    ll = loglikelihoods(scorer, reqs, prefix, batch_size)
    correct = correct_norm = 0
    k = 0
    for _, choices, gold in items:
        scores = np.asarray(ll[k : k + len(choices)])
        k += len(choices)
        correct += int(scores.argmax() == gold)
        correct_norm += int((scores / np.asarray([len(c) for c in choices], dtype=float)).argmax() == gold)
    return {"acc": correct / len(items), "acc_norm": correct_norm / len(items), "examples": len(items)}
