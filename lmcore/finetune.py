"""Stage ``finetune``: a classification or regression head on the pretrained decoder.

Inputs are ``text_a [<sep> text_b] <eot>``, right-padded; because attention is causal, the hidden
state of the last real token (the end-of-text token) sees the whole input and nothing of the
padding, so it is the pooled representation. Every task prepared under ``tasks_dir`` is trained
for ``epochs`` epochs; the epoch with the best validation score is kept. A majority-class and a
bag-of-words logistic-regression baseline are scored on the same splits.

Outputs: ``out/<task>/`` (``model.safetensors``, ``config.json``) and a metrics JSON.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmcore import glue
from lmcore.accel import make_accelerator
from lmcore.checkpoint import load_gpt, read_config, save_model
from lmcore.config import FinetuneConfig, TrackingConfig, flatten
from lmcore.io import StageError, read_json, read_jsonl, require, write_json
from lmcore.model import GPT, GPTConfig


class SequenceClassifier(nn.Module):
    """The decoder plus a linear head on the hidden state of the last real token."""

    def __init__(self, backbone: GPT, num_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.cfg.n_embd, num_labels)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        h = self.backbone.hidden_states(idx)
        pooled = h[torch.arange(idx.shape[0], device=idx.device), lengths - 1]
        return self.head(self.dropout(pooled)).float()


def encode_examples(tok, examples: list[dict[str, Any]], max_length: int) -> list[list[int]]:
    """Token ids of ``text_a [sep text_b] eot``; the longer text is cut first to fit."""
    from lmcore.tokenizer import special_ids

    ids = special_ids(tok)
    a_enc = tok.encode_batch([e["text_a"] for e in examples])
    pair = any(e.get("text_b") is not None for e in examples)
    b_enc = tok.encode_batch([e.get("text_b") or "" for e in examples]) if pair else None
    out = []
    for i, a in enumerate(a_enc):
        a_ids = a.ids
        if b_enc is None:
            out.append(a_ids[: max_length - 1] + [ids.eot])
            continue
        b_ids = b_enc[i].ids
        budget = max_length - 2
        while len(a_ids) + len(b_ids) > budget:
            if len(a_ids) >= len(b_ids):
                a_ids = a_ids[:-1]
            else:
                b_ids = b_ids[:-1]
        out.append(a_ids + [ids.sep] + b_ids + [ids.eot])
    return out


def collate(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in seqs])
    x = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        x[i, : len(s)] = torch.tensor(s)
    return x, lengths


@torch.no_grad()
def predict(model: SequenceClassifier, seqs: list[list[int]], pad_id: int, regression: bool,
            batch_size: int = 64, autocast=None) -> list[float]:
    """Class ids (or scores for regression) for encoded inputs; batches sorted by length."""
    model.eval()
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    preds: list[float] = [0.0] * len(seqs)
    device = next(model.parameters()).device
    for i in range(0, len(order), batch_size):
        chunk = order[i : i + batch_size]
        x, lengths = collate([seqs[j] for j in chunk], pad_id)
        with autocast() if autocast else torch.autocast("cpu", enabled=False):
            logits = model(x.to(device), lengths.to(device))
        out = logits[:, 0].tolist() if regression else logits.argmax(-1).tolist()
        for j, p in zip(chunk, out):
            preds[j] = p
    return preds


def bow_baseline(spec: glue.TaskSpec, train: list[dict[str, Any]], valid: list[dict[str, Any]]) -> dict[str, float]:
    """Bag-of-words (uni- and bigram TF-IDF) logistic or ridge regression, scikit-learn."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression, Ridge

    def text(e: dict[str, Any]) -> str:
        return e["text_a"] + (" [SEP] " + e["text_b"] if e.get("text_b") else "")

    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    xt = vec.fit_transform([text(e) for e in train])
    xv = vec.transform([text(e) for e in valid])
    yt = [e["label"] for e in train]
    clf = Ridge() if spec.is_regression else LogisticRegression(max_iter=2000)
    clf.fit(xt, yt)
    return glue.compute_metrics(spec, list(clf.predict(xv)), [e["label"] for e in valid])


def load_task(folder: Path) -> tuple[glue.TaskSpec, dict[str, list[dict[str, Any]]]]:
    spec = glue.TaskSpec.from_dict(read_json(Path(folder) / "task.json"))
    splits = {p.stem: list(read_jsonl(p)) for p in sorted(Path(folder).glob("*.jsonl"))}
    if not splits.get("train"):
        raise StageError(f"{folder}/train.jsonl: no training examples")
    for name in spec.validation_splits:
        if not splits.get(name):
            raise StageError(f"{folder}/{name}.jsonl: no validation examples")
    return spec, splits


def load_classifier(folder: Path) -> tuple[SequenceClassifier, glue.TaskSpec]:
    from safetensors.torch import load_model as st_load

    cfg = read_config(folder)
    spec = glue.TaskSpec.from_dict(cfg["task"])
    model = SequenceClassifier(GPT(GPTConfig(**cfg["model"])), spec.num_labels, cfg.get("dropout", 0.0))
    st_load(model, str(require(Path(folder) / "model.safetensors", "fine-tuned weights")))
    return model, spec


@dataclasses.dataclass
class FinetuneResult:
    models: dict[str, Path]
    metrics: dict[str, dict[str, float]]


def _train_task(cfg: FinetuneConfig, spec: glue.TaskSpec, splits: dict[str, list[dict[str, Any]]], tok,
                pretrained: Path, out: Path, accelerator, tr) -> dict[str, float]:
    from tqdm import tqdm

    from lmcore.tokenizer import special_ids

    pad = special_ids(tok).pad
    backbone = load_gpt(pretrained)
    max_len = min(cfg.max_length, backbone.cfg.block_size)
    torch.manual_seed(cfg.seed)
    model = SequenceClassifier(backbone, spec.num_labels, cfg.dropout)
    train = splits["train"]
    train_seqs = encode_examples(tok, train, max_len)
    labels = torch.tensor([e["label"] for e in train], dtype=torch.float if spec.is_regression else torch.long)
    vname = spec.validation_splits[0]
    valid_seqs = encode_examples(tok, splits[vname], max_len)
    valid_labels = [e["label"] for e in splits[vname]]

    steps_per_epoch = math.ceil(len(train) / (cfg.batch_size * accelerator.num_processes))
    total = steps_per_epoch * cfg.epochs
    warmup = int(cfg.warmup_fraction * total)
    head_params = list(model.head.parameters())
    head_ids = {id(p) for p in head_params}
    body = [p for p in model.parameters() if id(p) not in head_ids]
    optimizer = torch.optim.AdamW([{"params": body, "lr": cfg.lr}, {"params": head_params, "lr": cfg.head_lr}],
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / (warmup + 1) if s < warmup else max(0.0, (total - s) / max(1, total - warmup)))
    model, optimizer = accelerator.prepare(model, optimizer)  # scheduler stepped by hand, once per step
    raw = accelerator.unwrap_model(model)

    best: dict[str, Any] = {"score": -math.inf}
    step = 0
    rng = np.random.default_rng(cfg.seed)
    t0 = time.perf_counter()
    n_tokens = 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        perm = rng.permutation(len(train))
        batches = [perm[i : i + cfg.batch_size] for i in range(0, len(perm), cfg.batch_size)]
        batches = batches[accelerator.process_index :: accelerator.num_processes]
        bar = tqdm(batches, desc=f"finetune {spec.name} epoch {epoch}", disable=not accelerator.is_local_main_process,
                   mininterval=2)
        for b in bar:
            x, lengths = collate([train_seqs[i] for i in b], pad)
            x, lengths, y = x.to(accelerator.device), lengths.to(accelerator.device), labels[b].to(accelerator.device)
            logits = model(x, lengths)
            loss = F.mse_loss(logits[:, 0], y) if spec.is_regression else F.cross_entropy(logits, y)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            n_tokens += int(lengths.sum())
            if step % 20 == 0:
                tr.metrics({f"{spec.name}.train_loss": float(loss.detach()), f"{spec.name}.lr": scheduler.get_last_lr()[0]}, step=step)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        preds = predict(raw, valid_seqs, pad, spec.is_regression, autocast=accelerator.autocast)
        scores = glue.compute_metrics(spec, preds, valid_labels)
        score = glue.task_score(spec, scores)
        tr.metrics({f"{spec.name}.val_{k}": v for k, v in scores.items()} | {f"{spec.name}.val_score": score}, step=step)
        accelerator.print(f"{spec.name} epoch {epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        if score > best["score"]:
            best = {"score": score, "epoch": epoch, "metrics": scores, "state": copy.deepcopy(raw.state_dict())}
    elapsed = time.perf_counter() - t0
    raw.load_state_dict(best["state"])
    if accelerator.is_main_process:
        save_model(raw, out / spec.name, {"model": dataclasses.asdict(raw.backbone.cfg), "task": spec.to_dict(),
                                          "dropout": cfg.dropout, "max_length": max_len, "best_epoch": best["epoch"]})
    result = {**best["metrics"], "score": best["score"], "best_epoch": best["epoch"],
              "train_examples_per_second": len(train) * cfg.epochs / max(elapsed, 1e-9),
              "train_tokens_per_second": n_tokens * accelerator.num_processes / max(elapsed, 1e-9)}
    majority = glue.majority_baseline(spec, [e["label"] for e in train], valid_labels)
    result |= {f"majority_{k}": v for k, v in majority.items()}
    result |= {f"bow_{k}": v for k, v in bow_baseline(spec, train, splits[vname]).items()}
    return result


def finetune(cfg: FinetuneConfig, tasks_dir: Path, pretrained: Path, tokenizer_dir: Path, out: Path, metrics: Path,
             tracking: TrackingConfig = TrackingConfig()) -> FinetuneResult:
    """Fine-tune the pretrained model on every task folder under ``tasks_dir``."""
    from lmcore import tokenizer as tokmod
    from lmcore.tracking import stage_run

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tasks_dir, out = Path(tasks_dir), Path(out)
    folders = sorted(p.parent for p in require(tasks_dir, "tasks folder").glob("*/task.json"))
    if not folders:
        raise StageError(f"{tasks_dir}: no prepared tasks (expected <task>/task.json)")
    require(Path(pretrained) / "model.safetensors", "pretrained model")
    tok = tokmod.load(tokenizer_dir)
    accelerator = make_accelerator(cfg.mixed_precision)
    results: dict[str, dict[str, float]] = {}
    with stage_run("finetune", tracking, flatten(cfg, "finetune."), active=accelerator.is_main_process) as tr:
        for folder in folders:
            spec, splits = load_task(folder)
            results[spec.name] = _train_task(cfg, spec, splits, tok, Path(pretrained), out, accelerator, tr)
            tr.metrics({f"{spec.name}.{k}": v for k, v in results[spec.name].items()})
        if accelerator.is_main_process:
            write_json(metrics, results)
            tr.json(results, "finetune_metrics.json")
            for task in results:
                tr.artifact(out / task, f"model/{task}")
    return FinetuneResult({t: out / t for t in results}, results)
