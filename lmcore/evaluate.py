"""Stage ``evaluate``: language-model and task metrics, baselines, sample generations.

- Validation perplexity and bits per byte of the pretrained model with a sliding window
  (``stride`` tokens per step; each token is scored once, with up to ``block_size - 1`` tokens of
  context). Bits per byte = total negative log-likelihood in bits / UTF-8 bytes of the scored
  text: the number to compare across tokenizers.
- The same numbers for a unigram model of the training tokens (add-one smoothed), the floor a
  language model must clearly beat.
- Task metrics of every fine-tuned model on its validation split(s), beside the majority class.
- A few sampled generations.
"""

from __future__ import annotations

import dataclasses
import math
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


def evaluate(cfg: EvaluateConfig, tokens_dir: Path, pretrained: Path, finetuned: Path, tokenizer_dir: Path,
             tasks_dir: Path, out: Path, metrics: Path, tracking: TrackingConfig = TrackingConfig()) -> EvaluateResult:
    from lmcore import glue
    from lmcore import tokenizer as tokmod
    from lmcore.checkpoint import load_gpt, read_config
    from lmcore.encode import load_manifest, load_tokens
    from lmcore.finetune import encode_examples, load_classifier, load_task, predict
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

        for folder in sorted(Path(finetuned).glob("*/model.safetensors")):
            clf, spec = load_classifier(folder.parent)
            max_len = read_config(folder.parent).get("max_length", clf.backbone.cfg.block_size)
            task_folder = Path(tasks_dir) / spec.name
            _, splits = load_task(task_folder)
            pad = tokmod.special_ids(tok).pad
            train_labels = [e["label"] for e in splits["train"]]
            for vname in spec.validation_splits:
                seqs = encode_examples(tok, splits[vname], max_len)
                labels = [e["label"] for e in splits[vname]]
                scores = glue.compute_metrics(spec, predict(clf, seqs, pad, spec.is_regression), labels)
                base = glue.majority_baseline(spec, train_labels, labels)
                prefix = spec.name if vname == "validation" else f"{spec.name}.{vname}"
                for k, v in scores.items():
                    m[f"{prefix}.{k}"] = v
                    m[f"{prefix}.majority_{k}"] = base[k]
                    rows.append((prefix, k, v, base[k], "majority class"))
                m[f"{prefix}.score"] = glue.task_score(spec, scores)

        samples = _samples(model, tok, cfg)
        report = ["| what | metric | model | baseline | baseline kind |", "|---|---|---|---|---|"]
        report += [f"| {a} | {b} | {c:.4f} | {d:.4f} | {e} |" for a, b, c, d, e in rows]
        with atomic_path(out) as tmp:
            tmp.mkdir()
            (tmp / "report.md").write_text("\n".join(report) + "\n")
            (tmp / "samples.md").write_text(samples)
        write_json(metrics, m)
        tr.metrics({k: v for k, v in m.items() if isinstance(v, (int, float))})
        tr.artifact(out / "report.md")
        tr.artifact(out / "samples.md")
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
