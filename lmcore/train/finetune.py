"""Stage ``finetune``: a classification or regression head on the pretrained decoder, one task
per run (DVC runs one stage ``finetune@<task>`` per task in ``prepare.tasks.tasks``).

Inputs are ``text_a [<sep> text_b] <eot>``, right-padded; because attention is causal, the hidden
state of the last real token (the end-of-text token) sees the whole input and nothing of the
padding, so it is the pooled representation. The task is trained for ``epochs`` epochs with its
hyperparameters (``finetune.defaults`` with ``finetune.tasks.<task>`` overrides); ``select_epoch``
says which epoch is kept: by default the best on examples held out of the training split (the
task score: the mean of its metrics), so the reported validation numbers (over MNLI's matched and
mismatched splits) chose nothing. A majority-class and a bag-of-words (TF-IDF) logistic-regression
baseline, trained on the same examples, are scored on the same splits and logged beside the
model's numbers.

Outputs (``out`` = ``runs/finetune/<task>/``, written atomically as one folder):
``model.safetensors`` and ``config.json`` (the best epoch's classifier), ``results.json`` (metrics,
baselines, per-epoch history, hyperparameters) and ``submission/<name>.tsv``: predictions on
each test split in the GLUE leaderboard format (``CoLA.tsv``; ``MNLI-m.tsv``, ``MNLI-mm.tsv`` and
``AX.tsv`` from the MNLI model). The evaluate stage zips the GLUE files of all tasks. Also a
metrics JSON (``metrics/finetune/<task>.json``) and one MLflow run per task.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_model as st_save
from tqdm import tqdm

from lmcore.config import FinetuneConfig, FinetuneHyper, TrackingConfig, flatten
from lmcore.core.errors import StageError
from lmcore.core.io import atomic_path, require, write_json
from lmcore.core.machine import tune_malloc
from lmcore.data import glue
from lmcore.data import tokenizer as tokmod
from lmcore.data.tokenizer import special_ids
from lmcore.model.decoder import Decoder, DecoderConfig
from lmcore.model.folder import check_tokenizer, decoder_config, load_decoder, load_weights, read_config
from lmcore.tracking import stage_run
from lmcore.train.accel import decide_attention, loss_scale_restarter, make_accelerator
from lmcore.train.optim import finetune_optimizer
from lmcore.train.sampler import epoch_batches, process_share, step_groups
from lmcore.train.schedule import linear_warmup_decay, schedulers
from lmcore.train.step import TrainState, to_device, train_step


class SequenceClassifier(nn.Module):
    """The decoder plus a linear head on the hidden state of the last real token."""

    def __init__(self, backbone: Decoder, num_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.backbone = backbone
        if not backbone.cfg.tie_embeddings:
            # the classifier never reads the language-model head: trained, it would get no gradient
            # (and DDP, which expects one for every trainable parameter, would stop at the second step)
            backbone.lm_head.requires_grad_(False)
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
        with autocast() if autocast else torch.autocast(device.type, enabled=False):
            logits = model(to_device(x, device), to_device(lengths, device))
        out = logits[:, 0].tolist() if regression else logits.argmax(-1).tolist()
        for j, p in zip(chunk, out):
            preds[j] = p
    return preds


def bow_baseline(spec: glue.TaskSpec, train: list[dict[str, Any]],
                 evals: dict[str, list[dict[str, Any]]]) -> dict[str, list[float]]:
    """Predictions of a bag-of-words model (uni- and bigram TF-IDF; logistic regression, or ridge
    regression for a regression task; scikit-learn) trained on ``train``, per split of ``evals``."""
    # lazy: scikit-learn takes ~1.5 s to import; only the bag-of-words baseline needs it
    from sklearn.feature_extraction.text import TfidfVectorizer

    # lazy: scikit-learn takes ~1.5 s to import; only the bag-of-words baseline needs it
    from sklearn.linear_model import LogisticRegression, Ridge

    def text(e: dict[str, Any]) -> str:
        return e["text_a"] + (" [SEP] " + e["text_b"] if e.get("text_b") else "")

    yt = [e["label"] for e in train]
    if not spec.is_regression and len(set(yt)) < 2:  # one class: nothing to learn but the majority
        return {k: [yt[0]] * len(v) for k, v in evals.items()}
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2 if len(train) >= 1000 else 1, sublinear_tf=True)
    xt = vec.fit_transform([text(e) for e in train])
    clf = Ridge() if spec.is_regression else LogisticRegression(max_iter=2000)
    clf.fit(xt, yt)
    return {k: [float(p) if spec.is_regression else int(p) for p in clf.predict(vec.transform([text(e) for e in v]))]
            for k, v in evals.items()}


def load_classifier(folder: Path) -> tuple[SequenceClassifier, glue.TaskSpec]:

    cfg = read_config(folder)
    spec = glue.TaskSpec.from_dict(cfg.get("task"), f"{Path(folder) / 'config.json'}: task")
    model = SequenceClassifier(Decoder(DecoderConfig(**cfg["model"])), spec.num_labels, cfg.get("dropout", 0.0))
    load_weights(model, require(Path(folder) / "model.safetensors", "fine-tuned weights"))
    return model, spec


@dataclasses.dataclass
class FinetuneResult:
    task: str
    model: Path
    score: float
    metrics: dict[str, float]


def _evaluate(model, seqs: dict[str, list[list[int]]], pad: int, spec: glue.TaskSpec,
              labels: dict[str, list[Any]], autocast) -> tuple[dict[str, float], float]:
    preds = {s: predict(model, seqs[s], pad, spec.is_regression, autocast=autocast) for s in spec.validation_splits}
    metrics = glue.evaluate_splits(spec, preds, labels)
    return metrics, glue.task_score(spec, metrics)


def baselines(spec: glue.TaskSpec, splits: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    """The majority-class and bag-of-words baselines on the validation split(s), with their task
    scores: ``majority_<metric>``, ``majority_score``, ``bow_<metric>``, ``bow_score``."""
    train_labels = [e["label"] for e in splits["train"]]
    labels = {s: [e["label"] for e in splits[s]] for s in spec.validation_splits}
    majority = {}
    for s in spec.validation_splits:
        majority |= {f"{k}{glue.split_suffix(spec, s)}": v
                     for k, v in glue.majority_baseline(spec, train_labels, labels[s]).items()}
    bow_preds = bow_baseline(spec, splits["train"], {s: splits[s] for s in spec.validation_splits})
    bow = glue.evaluate_splits(spec, bow_preds, labels)
    out = {f"majority_{k}": v for k, v in majority.items()} | {"majority_score": glue.task_score(spec, majority)}
    return out | {f"bow_{k}": v for k, v in bow.items()} | {"bow_score": glue.task_score(spec, bow)}


class ExampleLoss:
    """A fine-tuning micro-batch ``(inputs, lengths, labels)``: the mean cross-entropy (or squared
    error, for regression) over its examples, which are the targets of the step."""

    reduction = "mean"

    def __init__(self, regression: bool) -> None:
        self.regression = regression

    def targets(self, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> int:
        return len(batch[2])

    def loss(self, model, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor], accelerator) -> torch.Tensor:
        x, lengths, y = (to_device(t, accelerator.device) for t in batch)
        logits = model(x, lengths)
        return F.mse_loss(logits[:, 0], y) if self.regression else F.cross_entropy(logits, y)


SPEED_KEYS = ("train_examples", "train_examples_per_second", "train_tokens_per_second")
PREDICTIONS = "validation_predictions.json"  # {task: spec, splits: {split: {labels, predictions}}}, kept model

NONFINITE_HINT = ("lower finetune.lr or finetune.head_lr, raise finetune.warmup_fraction or use "
                  "finetune.mixed_precision: 'no'")


def _train(hp: FinetuneHyper, spec: glue.TaskSpec, splits: dict[str, list[dict[str, Any]]], tok, pretrained: Path,
           accelerator, tr, from_scratch: bool = False, seed: int | None = None, attention: str = "sdpa",
           held: list[dict[str, Any]] | None = None) -> tuple[SequenceClassifier, dict[str, Any], int]:
    """Train, keep the weights of the epoch ``hp.select_epoch`` chooses (the best on ``held``,
    examples kept out of ``splits["train"]``, the last, or the best on the validation split);
    return the model, that epoch's record (its validation metrics), and the history of every
    epoch. A step takes ``grad_accum`` batches of ``batch_size`` examples per
    process (the step of :mod:`lmcore.train.step`: the loss normalised by the examples of the
    whole step, clipping at ``grad_clip``, non-finite steps skipped). ``from_scratch``: the
    pretrained model's architecture with freshly initialised weights (its metrics are logged
    as ``scratch_*``). ``seed``: this seed instead of ``hp.seed`` (a seed after the first logs its
    curves as ``seed<seed>_*``). ``attention``: the attention kernel, decided once per stage
    (:func:`lmcore.train.accel.decide_attention`)."""
    pad = special_ids(tok).pad
    backbone = load_decoder(pretrained)
    max_len = min(hp.max_length, backbone.cfg.block_size)
    first = seed is None or seed == hp.seed
    seed = hp.seed if seed is None else seed
    torch.manual_seed(seed)
    if from_scratch:
        backbone = Decoder(backbone.cfg)  # the initialisation pretraining starts from
    prefix = ("scratch_" if from_scratch else "") + ("" if first else f"seed{seed}_")
    model = SequenceClassifier(backbone, spec.num_labels, hp.dropout)
    if accelerator.num_processes > 1:  # the same initial head everywhere, then dropout masks of each its own
        torch.manual_seed(seed * 1_000_003 + accelerator.process_index)  # seed s's rank 1 is not seed s+1's rank 0
    backbone.use_attention(attention)
    train = splits["train"]
    train_seqs = encode_examples(tok, train, max_len)
    train_lengths = [len(s) for s in train_seqs]
    labels = torch.tensor([e["label"] for e in train], dtype=torch.float if spec.is_regression else torch.long)
    valid_seqs = {s: encode_examples(tok, splits[s], max_len) for s in spec.validation_splits}
    valid_labels = {s: [e["label"] for e in splits[s]] for s in spec.validation_splits}
    held_seqs = encode_examples(tok, held, max_len) if held else []
    held_labels = [e["label"] for e in held or []]

    batches_per_epoch = math.ceil(len(train) / (hp.batch_size * accelerator.num_processes))
    total = math.ceil(batches_per_epoch / hp.grad_accum) * hp.epochs
    warmup = int(hp.warmup_fraction * total)
    optimizer = finetune_optimizer(model, model.head, hp, accelerator.device)
    (scheduler,) = schedulers([optimizer], lambda s: linear_warmup_decay(s, warmup, total))
    model, optimizer = accelerator.prepare(model, optimizer)  # scheduler stepped by hand, once per step
    raw = accelerator.unwrap_model(model)
    objective = ExampleLoss(spec.is_regression)

    best: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    state = TrainState()
    rng = np.random.default_rng(seed)
    train_seconds = 0.0  # the training steps only (not each epoch's validation and held-out predictions)
    n_tokens = 0
    for epoch in range(1, hp.epochs + 1):
        model.train()
        batches = epoch_batches(train_lengths, hp.batch_size, rng, hp.group_by_length)
        batches = process_share(batches, accelerator.process_index, accelerator.num_processes)
        bar = tqdm(step_groups(batches, hp.grad_accum),
                   desc=f"finetune {spec.name}{' from scratch' if from_scratch else ''}"
                        f"{'' if first else f' seed {seed}'} epoch {epoch}",
                   disable=not accelerator.is_local_main_process, mininterval=2)
        t0 = time.perf_counter()
        for group in bar:
            micro = [(*collate([train_seqs[i] for i in b], pad), labels[b]) for b in group]
            res = train_step(model, [optimizer], micro, accelerator, state, grad_clip=hp.grad_clip,
                             max_nonfinite=hp.max_nonfinite, hint=NONFINITE_HINT, objective=objective)
            lr = scheduler.get_last_lr()[0]  # the rate this step used
            scheduler.step()
            n_tokens += sum(int(lengths.sum()) for _, lengths, _ in micro)
            if state.step % 20 == 0:
                tr.metrics({f"{prefix}train_loss": res.loss, f"{prefix}lr": lr}, step=state.step)
                bar.set_postfix(loss=f"{res.loss:.3f}")
        train_seconds += time.perf_counter() - t0
        scores, score = _evaluate(raw, valid_seqs, pad, spec, valid_labels, accelerator.autocast)
        record = {"epoch": epoch, "step": state.step, "score": score, **scores}
        if held:
            preds = predict(raw, held_seqs, pad, spec.is_regression, autocast=accelerator.autocast)
            record["holdout_score"] = glue.task_score(spec, glue.compute_metrics(spec, preds, held_labels))
        history.append(record)
        tr.metrics({f"{prefix}val_{k}": v for k, v in scores.items()} | {f"{prefix}val_score": score}
                   | ({f"{prefix}holdout_score": record["holdout_score"]} if held else {}), step=state.step)
        accelerator.print(f"{spec.name}{' from scratch' if from_scratch else ''}{'' if first else f' seed {seed}'} "
                          f"epoch {epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
                          + (f" (held-out score {record['holdout_score']:.4f})" if held else ""))
        chooser = "holdout_score" if held else "score"
        if hp.select_epoch == "last" or "state" not in best or _better(record[chooser], best["chosen_by"]):
            # the last epoch's weights are the model's own (and "last" keeps no other): no copy
            copied = epoch < hp.epochs and hp.select_epoch != "last"
            best = {"score": score, "epoch": epoch, "metrics": scores, "chosen_by": record[chooser],
                    "state": copy.deepcopy(raw.state_dict()) if copied else None}
    # every process's own tokens (the padding batches that even out the processes' shares included)
    n_tokens = int(accelerator.reduce(torch.tensor([n_tokens], device=accelerator.device), "sum").item())
    state_dict = best.pop("state")
    best.pop("chosen_by")
    if state_dict is not None:
        raw.load_state_dict(state_dict)
    best["speed"] = {"train_examples": len(train),
                     "train_examples_per_second": len(train) * hp.epochs / max(train_seconds, 1e-9),
                     "train_tokens_per_second": n_tokens / max(train_seconds, 1e-9)}
    best["history"] = history
    # each seed and the from-scratch twin prepare a model and an optimizer of their own: without
    # this, the accelerator kept every one of them (and its optimizer state) until the stage ended
    accelerator.free_memory()
    return raw, best, max_len


def _better(score: float, best: float) -> bool:
    """An epoch's score beats the best so far (a NaN score, from predictions that are all NaN or
    all equal, never does; the first epoch is kept whatever its score)."""
    return not math.isnan(score) and (math.isnan(best) or score > best)


def over_seeds(bests: list[dict[str, Any]], seeds: list[int]) -> dict[str, float]:
    """The best-epoch metrics of one fine-tuning per seed as one record: each metric and the
    score averaged over seeds; with several seeds also ``<metric>_std`` and ``score_std`` (sample
    standard deviation) and each seed's ``score_seed_<seed>``."""
    keys = list(bests[0]["metrics"]) + ["score"]
    values = {k: [float(b["metrics"][k] if k != "score" else b["score"]) for b in bests] for k in keys}
    out = {k: float(np.mean(v)) for k, v in values.items()}
    if len(bests) > 1:
        out |= {f"{k}_std": float(np.std(v, ddof=1)) for k, v in values.items()}
        out |= {f"score_seed_{s}": float(b["score"]) for s, b in zip(seeds, bests)}
    return out


def finetune(cfg: FinetuneConfig, task_dir: Path, pretrained: Path, tokenizer_dir: Path, out: Path, metrics: Path,
             tracking: TrackingConfig = TrackingConfig()) -> FinetuneResult:
    """Fine-tune the pretrained model on one prepared task (``task_dir`` =
    ``data/raw/tasks/<task>``); write ``out`` (``runs/finetune/<task>``) and ``metrics``."""

    malloc = tune_malloc()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    task_dir, out = Path(task_dir), Path(out)
    require(task_dir / "task.json", f"prepared task {task_dir.name}")
    require(Path(pretrained) / "model.safetensors", "pretrained model")
    spec, splits = glue.load_task(task_dir)
    hp = cfg.for_task(spec.name)
    held: list[dict[str, Any]] = []
    if hp.select_epoch == "holdout" and hp.epochs > 1:
        n_held = min(hp.holdout, len(splits["train"]) // 10)
        if n_held == 0:
            raise StageError(f"task {spec.name}: {len(splits['train'])} training examples, too few to hold a tenth "
                             f"out to choose the epoch on (select_epoch 'holdout', finetune.defaults or "
                             f"finetune.tasks.{spec.name}): use 'last' or 'validation' for so small a task")
        kept, held = glue.selection_split(splits["train"], n_held)
        splits = {**splits, "train": kept}
    tok = tokmod.load(tokenizer_dir)
    accelerator = make_accelerator(cfg.mixed_precision)
    shape, model_cfg = decoder_config(pretrained)  # a language model's folder, checked before anything starts
    check_tokenizer(model_cfg, shape.vocab_size, tok, Path(tokenizer_dir) / "tokenizer.json", Path(pretrained))
    attention = decide_attention(shape, accelerator, hp.batch_size, min(hp.max_length, shape.block_size), cfg.attention)
    params = {"task": spec.name, **flatten(hp, "finetune."), "finetune.mixed_precision": cfg.mixed_precision,
              "finetune.attention": cfg.attention, "attention_kernel": attention, "allocator": malloc,
              "num_processes": accelerator.num_processes, "holdout_examples": len(held)}
    with stage_run("finetune", tracking, params, active=accelerator.is_main_process, run_name=f"finetune {spec.name}",
                   tags={"lmcore.task": spec.name},
                   inputs=[task_dir, tokenizer_dir, pretrained], outputs=[out], system_metrics=True) as tr:
        seeds = [hp.seed + i for i in range(hp.seeds)]
        restart_loss_scale = loss_scale_restarter(accelerator)

        def train(**kw: Any) -> tuple[SequenceClassifier, dict[str, Any], int]:
            restart_loss_scale()
            return _train(hp, spec, splits, tok, Path(pretrained), accelerator, tr, attention=attention, held=held, **kw)

        model, best, max_len = train()
        bests = [best] + [train(seed=s)[1] for s in seeds[1:]]
        result: dict[str, Any] = {**over_seeds(bests, seeds), "best_epoch": best["epoch"], **best["speed"]}
        result |= baselines(spec, splits)
        if hp.scratch_baseline:  # the same fine-tuning from random weights: what pretraining bought
            scratch = [train(from_scratch=True, seed=s)[1] for s in seeds]
            result |= {f"scratch_{k}": v for k, v in over_seeds(scratch, seeds).items()}
            result["scratch_best_epoch"] = scratch[0]["epoch"]

        pad = tokmod.special_ids(tok).pad
        # the kept model's validation predictions: the units lmcore compare resamples
        predictions: dict[str, Any] = {"task": spec.to_dict(), "splits": {}}
        for split in spec.validation_splits:
            seqs = encode_examples(tok, splits[split], max_len)
            predictions["splits"][split] = {"labels": [e["label"] for e in splits[split]],
                                            "predictions": predict(model, seqs, pad, spec.is_regression,
                                                                   autocast=accelerator.autocast)}
        files: dict[str, str] = {}
        tables: dict[str, str] = {}
        for split, stem in spec.submissions:
            if splits.get(split):
                seqs = encode_examples(tok, splits[split], max_len)
                preds = predict(model, seqs, pad, spec.is_regression, autocast=accelerator.autocast)
                try:
                    tables[f"{stem}.tsv"] = glue.submission_tsv(spec, [e["idx"] for e in splits[split]], preds)
                except StageError as e:  # a diverged model's NaN: no file the leaderboard would reject
                    accelerator.print(f"{spec.name}: no submission file for {split}: {e}")
                    continue
                files[split] = f"submission/{stem}.tsv"
                result[f"{split}_predictions"] = len(preds)

        if accelerator.is_main_process:

            config = {"model": model.backbone.cfg.model_dump(), "task": spec.to_dict(), "dropout": hp.dropout,
                      "max_length": max_len, "best_epoch": best["epoch"]}
            summary = {"task": spec.name, "glue": spec.is_glue, "metrics": result, "history": best["history"],
                       "select_epoch": hp.select_epoch, "holdout_examples": len(held),
                       "hyperparameters": hp.model_dump(), "submissions": files,
                       "seeds": [{"seed": sd, "score": b["score"], "best_epoch": b["epoch"], "metrics": b["metrics"]}
                                 for sd, b in zip(seeds, bests)]}
            with atomic_path(out) as tmp:
                tmp.mkdir()
                st_save(model, str(tmp / "model.safetensors"))
                (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
                (tmp / "results.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
                (tmp / PREDICTIONS).write_text(json.dumps(predictions) + "\n")
                if tables:
                    (tmp / "submission").mkdir()
                    for name, text in tables.items():
                        (tmp / "submission" / name).write_text(text, encoding="utf-8")
            # DVC's metrics: the numbers compared across experiments (speed and counts stay in
            # results.json and the MLflow run)
            write_json(metrics, {k: v for k, v in result.items() if k not in SPEED_KEYS and not k.endswith("_predictions")})
            tr.artifact(out / "results.json")
            tr.artifact(out / PREDICTIONS)
            if tables:
                tr.artifact(out / "submission", "submission")
            reg = tracking.registry
            tr.model(out, f"{reg.prefix}-{spec.name}", result, reg.task_metric, "maximize")
        scratch_note = f", from scratch {result['scratch_score']:.4f}" if "scratch_score" in result else ""
        spread = f" (mean of {len(seeds)} seeds, std {result['score_std']:.4f})" if len(seeds) > 1 else ""
        accelerator.print(f"{spec.name}: score {result['score']:.4f}{spread} (epoch {best['epoch']}); majority "
                          f"{result['majority_score']:.4f}, bag of words {result['bow_score']:.4f}{scratch_note}")
    return FinetuneResult(spec.name, out, result["score"], result)
