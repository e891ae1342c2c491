"""Stage ``evaluate``: language-model and task metrics, baselines, sample generations.

- Validation perplexity and bits per byte of the pretrained model with a sliding window
  (``stride`` tokens per step; each token is scored once, with up to ``block_size - 1`` tokens of
  context). Bits per byte = total negative log-likelihood in bits / UTF-8 bytes of the scored
  text: the number to compare across tokenizers.
- The same numbers for a unigram model of the training tokens (add-one smoothed), the floor a
  language model must clearly beat.
- Task metrics of every fine-tuned task (read from ``runs/finetune/<task>/results.json``, the
  best epoch's validation metrics) beside its majority-class and bag-of-words baselines, the GLUE
  score (mean of the GLUE task scores), and ``glue_submission.zip``: the leaderboard prediction
  files of every fine-tuned GLUE task, ready to upload.
- A few sampled generations.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmcore.config import EvaluateConfig, TrackingConfig, flatten
from lmcore.io import StageError, atomic_path, write_json


@torch.no_grad()
def sliding_window_nll(model, tokens: np.ndarray, block: int, stride: int, batch_size: int = 16,
                       max_tokens: int | None = None) -> tuple[float, int]:
    """Total negative log-likelihood (nats) and number of scored tokens (all but the first)."""
    n = len(tokens) if max_tokens is None else min(len(tokens), max_tokens)
    if n < 2:
        raise StageError(f"need at least 2 tokens to score, got {n}")
    if not 1 <= stride <= block:
        raise StageError(f"evaluate.stride = {stride} must be between 1 and the block size {block}")
    # window w covers tokens[begin : begin + block + 1] and scores its targets from `first` on
    jobs: list[tuple[int, int, int]] = []  # (begin, end, first scored target index within window)
    scored_until = 1  # next token index to score
    begin = 0
    while scored_until < n:
        end = min(begin + block + 1, n)
        jobs.append((begin, end, scored_until - begin - 1))
        scored_until = end
        begin = min(begin + stride, max(0, n - block - 1)) if end < n else end
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i : i + batch_size]
        width = max(e - b for b, e, _ in chunk)
        x = torch.zeros((len(chunk), width - 1), dtype=torch.long)
        y = torch.full((len(chunk), width - 1), -100, dtype=torch.long)
        for r, (b, e, first) in enumerate(chunk):
            w = torch.from_numpy(tokens[b:e].astype(np.int64))
            x[r, : len(w) - 1] = w[:-1]
            tgt = w[1:].clone()
            tgt[:first] = -100
            y[r, : len(w) - 1] = tgt
        _, loss = model(x, y, reduction="sum")
        total += float(loss)
        count += int((y != -100).sum())
    return total, count


def unigram_nll(train_tokens: np.ndarray, tokens: np.ndarray, vocab_size: int) -> float:
    """Total NLL (nats) of ``tokens[1:]`` under add-one-smoothed training token frequencies."""
    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[np.asarray(tokens[1:], dtype=np.int64)].sum())


@dataclasses.dataclass
class EvaluateResult:
    metrics: dict[str, Any]
    report: Path


def task_results(finetuned: Path, tasks: Sequence[str]) -> tuple[dict[str, Any], list[tuple], list[Path]]:
    """Metrics of the fine-tuned ``tasks`` (``runs/finetune/<task>/results.json``) as
    ``<task>.<metric>``, ``<task>.majority_<metric>``, ``<task>.bow_<metric>`` and ``<task>.score``,
    plus ``glue.score`` (mean of the GLUE task scores) and ``glue.tasks``; report rows; and the
    leaderboard prediction files of the GLUE tasks."""
    from lmcore import glue
    from lmcore.io import read_json

    m: dict[str, Any] = {}
    rows: list[tuple] = []
    files: list[Path] = []
    scores: dict[str, float] = {}
    for task in tasks:
        folder = Path(finetuned) / task
        res = read_json(folder / "results.json")
        spec = glue.TaskSpec.from_dict(read_json(folder / "config.json")["task"])
        r = res["metrics"]
        for k in glue.metric_keys(spec):
            m[f"{task}.{k}"] = r[k]
            m[f"{task}.majority_{k}"] = r[f"majority_{k}"]
            m[f"{task}.bow_{k}"] = r[f"bow_{k}"]
            rows.append((task, k, r[k], r[f"majority_{k}"], "majority class"))
            rows.append((task, k, r[k], r[f"bow_{k}"], "TF-IDF logistic regression" if spec.labels else "TF-IDF ridge"))
        m[f"{task}.score"] = scores[task] = r["score"]
        if spec.is_glue:
            files += [folder / f for f in res.get("submissions", {}).values()]
    glue_score = glue.glue_score(scores)
    if glue_score is not None:
        n = sum(t in glue.GLUE_TASKS for t in scores)
        m["glue.score"], m["glue.tasks"] = glue_score, n
        rows.append(("GLUE", f"score ({n} of 9 tasks)", glue_score, float("nan"), ""))
    return m, rows, files


def evaluate(cfg: EvaluateConfig, tokens_dir: Path, pretrained: Path, finetuned: Path, tokenizer_dir: Path,
             tasks: Sequence[str], out: Path, metrics: Path,
             tracking: TrackingConfig = TrackingConfig()) -> EvaluateResult:
    """Evaluate the language model and collect the fine-tuned ``tasks`` (names, in order)."""
    from lmcore import glue
    from lmcore import tokenizer as tokmod
    from lmcore.checkpoint import load_gpt
    from lmcore.encode import load_manifest, load_tokens
    from lmcore.tracking import stage_run

    out = Path(out)
    manifest = load_manifest(tokens_dir)
    model = load_gpt(pretrained)
    tok = tokmod.load(tokenizer_dir)
    block = model.cfg.block_size
    stride = cfg.stride or block
    val = load_tokens(tokens_dir, "validation")
    train = load_tokens(tokens_dir, "train")
    info = manifest["splits"]["validation"]

    with stage_run("evaluate", tracking, flatten(cfg, "evaluate.")) as tr:
        nll, count = sliding_window_nll(model, val, block, stride, cfg.batch_size, cfg.max_tokens)
        scored = count + 1
        n_bytes = info["bytes"] * scored / info["tokens"]  # exact when the whole split is scored
        uni = unigram_nll(train, val[:scored], manifest["vocab_size"])
        m: dict[str, Any] = {
            "lm.val_loss": nll / count,
            "lm.val_perplexity": math.exp(nll / count),
            "lm.val_bpb": nll / math.log(2) / n_bytes,
            "lm.unigram_val_bpb": uni / math.log(2) / n_bytes,
            "lm.unigram_val_perplexity": math.exp(uni / count),
            "lm.scored_tokens": count,
        }
        rows = [("language model", "validation bits per byte", m["lm.val_bpb"], m["lm.unigram_val_bpb"], "unigram")]

        task_m, task_rows, submission = task_results(finetuned, tasks)
        m |= task_m
        rows += task_rows

        samples = _samples(model, tok, cfg)
        report = ["| what | metric | model | baseline | baseline kind |", "|---|---|---|---|---|"]
        report += [f"| {a} | {b} | {c:.4f} | {'' if math.isnan(d) else f'{d:.4f}'} | {e} |" for a, b, c, d, e in rows]
        with atomic_path(out) as tmp:
            tmp.mkdir()
            (tmp / "report.md").write_text("\n".join(report) + "\n")
            (tmp / "samples.md").write_text(samples)
            if submission:  # the leaderboard upload: CoLA.tsv, ..., AX.tsv of the GLUE tasks fine-tuned
                m["glue.submission_files"] = len(glue.write_submission_zip(submission, tmp / "glue_submission.zip"))
        write_json(metrics, m)
        tr.metrics({k: v for k, v in m.items() if isinstance(v, (int, float))})
        tr.artifact(out / "report.md")
        tr.artifact(out / "samples.md")
        if submission:
            tr.artifact(out / "glue_submission.zip")
        return EvaluateResult(m, out / "report.md")


def _samples(model, tok, cfg: EvaluateConfig) -> str:
    from lmcore.tokenizer import special_ids

    eot = special_ids(tok).eot
    gen = torch.Generator().manual_seed(cfg.seed)
    parts = []
    for prompt in cfg.prompts:
        ids = torch.tensor([tok.encode(prompt).ids or [eot]])
        outp = model.generate(ids, cfg.max_new_tokens, cfg.temperature, cfg.top_k, eot, gen)
        text = tok.decode(outp[0].tolist(), skip_special_tokens=True)
        parts.append(f"### Prompt: {prompt!r}\n\n```\n{text}\n```\n")
    return "\n".join(parts)
