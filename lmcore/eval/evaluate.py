"""Stage ``evaluate``: language-model and task metrics, baselines, sample generations.

- Bits per byte and perplexity of the pretrained model on the validation split, then on any
  held-out text listed in ``evaluate.texts`` (files, folders or globs of text or JSONL), all with
  the same strided sliding window (:func:`sliding_window_nll`). Documents are scored as the model
  was trained on them: each followed by the end-of-text token, the stream preceded by one
  end-of-text token as context, so every token of every document is scored. Bits per byte =
  negative log-likelihood in bits / UTF-8 bytes of exactly the documents scored (with
  ``max_tokens``, whole documents are kept): the number to compare across tokenizers, and the first
  key of ``metrics/evaluate.json`` (``lm.val_bpb``).
- The same numbers for a unigram model of the training tokens (add-one smoothed), the floor a
  language model must clearly beat.
- Task metrics of every fine-tuned task (read from ``runs/finetune/<task>/results.json``, the
  best epoch's validation metrics) beside its majority-class and bag-of-words baselines, the GLUE
  score (mean of the GLUE task scores), and ``glue_submission.zip``: the leaderboard prediction
  files of every fine-tuned GLUE task, ready to upload.
- A few sampled generations.

:func:`evaluate_texts` scores files with any model folder (``runs/pretrain/final``, or an exported
Hugging Face Llama folder such as ``runs/export``) and its tokenizer, outside the pipeline: the way
to compare two checkpoints with different tokenizers on the same text.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from lmcore.config import EvaluateConfig, TrackingConfig, flatten
from lmcore.core import readers
from lmcore.core.errors import StageError
from lmcore.core.io import atomic_path, read_json, require, sha256_file, write_text
from lmcore.data import glue
from lmcore.data import tokenizer as tokmod
from lmcore.data.encode import load_manifest, load_tokens
from lmcore.data.tokenizer import BATCH_CHARS, batched, special_ids
from lmcore.generate import GenerationConfig, generate_text
from lmcore.model.folder import check_tokenizer, load_lm
from lmcore.tracking import stage_run

log = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz")
DECODE_BATCH = 1000  # documents decoded per call when counting bytes


# ---------------------------------------------------------------------------------------------
# strided sliding window


def window_plan(n: int, block: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows ``(begin, end, first)`` scoring tokens ``1 .. n - 1`` of a stream of ``n`` tokens.

    Window ``w`` feeds ``tokens[begin : end - 1]`` (at most ``block`` tokens) and scores the
    targets ``tokens[begin + 1 + first : end]``: the tokens no earlier window scored. Windows start
    every ``stride`` tokens (Hugging Face's strided perplexity, with windows of ``block + 1``
    tokens, so a scored token sees up to ``block`` tokens: ``block - stride + 1`` at least, after
    the first window); the last window is moved left to end at the last token, so it too has a
    full context (as lm-evaluation-harness's rolling windows do)."""
    if not 1 <= stride <= block:
        raise StageError(f"evaluate.stride = {stride} must be between 1 and the block size {block}")
    jobs: list[tuple[int, int, int]] = []
    scored_until = 1  # next token index to score
    begin = 0
    while scored_until < n:
        end = min(begin + block + 1, n)
        jobs.append((begin, end, scored_until - begin - 1))
        scored_until = end
        begin = min(begin + stride, max(0, n - block - 1)) if end < n else end
    return jobs


@torch.no_grad()
def sliding_window_nll(model, tokens: Any, block: int, stride: int, batch_size: int = 16,
                       max_tokens: int | None = None, desc: str | None = None) -> tuple[float, int]:
    """Total negative log-likelihood (nats) and number of scored tokens (all but the first) of
    ``tokens[:max_tokens]`` (an array or :class:`lmcore.data.shards.TokenShards`), with windows of
    ``block`` tokens every ``stride`` tokens (:func:`window_plan`). ``desc`` names the progress bar
    and the throughput line in the log."""

    n = len(tokens) if max_tokens is None else min(len(tokens), max_tokens)
    if n < 2:
        raise StageError(f"need at least 2 tokens to score, got {n}")
    jobs = window_plan(n, block, stride)
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    t0 = time.perf_counter()
    with tqdm(total=n - 1, desc=desc or "evaluate", unit="tok", unit_scale=True, mininterval=2,
              disable=desc is None) as bar:
        for i in range(0, len(jobs), batch_size):
            chunk = jobs[i : i + batch_size]
            width = max(e - b for b, e, _ in chunk)
            x = torch.zeros((len(chunk), width - 1), dtype=torch.long)
            y = torch.full((len(chunk), width - 1), -100, dtype=torch.long)
            for r, (b, e, first) in enumerate(chunk):
                w = torch.from_numpy(np.asarray(tokens[b:e]).astype(np.int64))
                x[r, : len(w) - 1] = w[:-1]
                tgt = w[1:].clone()
                tgt[:first] = -100
                y[r, : len(w) - 1] = tgt
            _, loss = model(x.to(device), y.to(device), reduction="sum")
            scored = int((y != -100).sum())
            total += float(loss)
            count += scored
            bar.update(scored)
    if desc is not None:
        seconds = time.perf_counter() - t0
        log.info("%s: %d tokens scored in %d windows in %.1f s (%.0f tokens/s)", desc, count, len(jobs), seconds,
                 count / max(seconds, 1e-9))
    return total, count


class _AfterContext:
    """``tokens[:length]`` with one context token in front, sliced without copying ``tokens``."""

    def __init__(self, first: int, tokens: Any, length: int) -> None:
        self.first, self.tokens, self.length = first, tokens, length

    def __len__(self) -> int:
        return self.length + 1

    def __getitem__(self, key: slice) -> np.ndarray:
        start, stop, _ = key.indices(len(self))
        if start > 0:
            return np.asarray(self.tokens[start - 1 : stop - 1])
        rest = np.asarray(self.tokens[: max(stop - 1, 0)]).astype(np.int64)
        return np.concatenate([np.array([self.first], dtype=np.int64), rest])


def _bincount(tokens: Any, size: int, chunk: int = 1 << 24) -> np.ndarray:
    """Counts of every id in ``tokens`` (an array or TokenShards), at least ``size`` entries, read in
    chunks (no int64 copy of a whole split)."""
    counts = np.zeros(size, dtype=np.int64)
    parts = tokens.shards if hasattr(tokens, "shards") else [tokens]
    for part in parts:
        for i in range(0, len(part), chunk):
            c = np.bincount(np.asarray(part[i : i + chunk]), minlength=size)
            if len(c) > len(counts):
                counts = np.concatenate([counts, np.zeros(len(c) - len(counts), dtype=np.int64)])
            counts[: len(c)] += c
    return counts


def unigram_logp(train_tokens: Any, vocab_size: int) -> np.ndarray:
    """Log-probabilities of the add-one-smoothed training token frequencies."""
    counts = _bincount(train_tokens, vocab_size).astype(np.float64) + 1.0
    return np.log(counts / counts.sum())


def unigram_scored_nll(tokens: Any, logp: np.ndarray) -> float:
    """Total NLL (nats) of every token of ``tokens`` under the unigram log-probabilities ``logp``."""
    counts = _bincount(tokens, len(logp))
    if len(counts) > len(logp):
        raise StageError(f"token id {len(counts) - 1} is outside the vocabulary of {len(logp)} tokens")
    return float(-(counts * logp).sum())


def unigram_nll(train_tokens: Any, tokens: Any, vocab_size: int) -> float:
    """Total NLL (nats) of ``tokens[1:]`` under add-one-smoothed training token frequencies."""
    return unigram_scored_nll(tokens[1:], unigram_logp(train_tokens, vocab_size))


# ---------------------------------------------------------------------------------------------
# what is scored: whole documents, and their bytes


@dataclasses.dataclass
class Scored:
    """The result of scoring some documents: NLL, and exactly what was scored."""

    nll: float
    """Total negative log-likelihood, nats."""
    tokens: int
    """Tokens scored: every token of every document and its end-of-text token."""
    bytes: int
    """UTF-8 bytes of the documents scored."""
    documents: int
    """Documents scored (the last one cut when ``cut``)."""
    cut: bool = False
    """The only document was longer than ``max_tokens`` and only its beginning was scored."""
    unigram_nll: float = float("nan")
    """The same tokens' NLL under the unigram baseline, nats."""

    @property
    def loss(self) -> float:
        return self.nll / self.tokens

    @property
    def bpb(self) -> float:
        return self.nll / math.log(2) / self.bytes

    def metrics(self, prefix: str) -> dict[str, Any]:
        """``<prefix>bpb``, ``perplexity``, ``loss``, ``tokens``, ``bytes``, ``documents`` (and
        ``unigram_bpb`` when the baseline was computed)."""
        m: dict[str, Any] = {f"{prefix}bpb": self.bpb, f"{prefix}perplexity": math.exp(self.loss),
                             f"{prefix}loss": self.loss, f"{prefix}tokens": self.tokens,
                             f"{prefix}bytes": self.bytes, f"{prefix}documents": self.documents}
        if math.isfinite(self.unigram_nll):
            m[f"{prefix}unigram_bpb"] = self.unigram_nll / math.log(2) / self.bytes
        return m


def score_stream(model, tokens: Any, length: int, eot: int, stride: int | None, batch_size: int,
                 desc: str | None = None) -> float:
    """NLL (nats) of every token of ``tokens[:length]``, a stream of documents each followed by
    ``eot``, after one ``eot`` of context (as at a document start in training)."""
    block = model.cfg.block_size
    nll, count = sliding_window_nll(model, _AfterContext(eot, tokens, length), block, stride or block, batch_size,
                                    desc=desc)
    assert count == length, (count, length)
    return nll


def _decoded_bytes(tok, docs: Iterator[np.ndarray]) -> int:
    """UTF-8 bytes of the text the token lists decode to (exact for byte-level BPE, whose decode
    gives back the encoded text; for Unigram up to its Metaspace caveats)."""
    total = 0
    batch: list[list[int]] = []
    for d in docs:
        batch.append(np.asarray(d).tolist())
        if len(batch) >= DECODE_BATCH:
            total += sum(len(t.encode("utf-8")) for t in tok.decode_batch(batch, skip_special_tokens=False))
            batch = []
    if batch:
        total += sum(len(t.encode("utf-8")) for t in tok.decode_batch(batch, skip_special_tokens=False))
    return total


def split_selection(val: Any, info: dict[str, Any], max_tokens: int | None, tok) -> tuple[int, int, int, bool]:
    """What of an encoded split to score: ``(tokens, bytes, documents, cut)`` for its first whole
    documents holding at most ``max_tokens`` tokens (end-of-text tokens included). Bytes come from
    the manifest for whole shards, and from decoding the documents of a partly scored shard."""
    n_docs = val.n_documents
    if max_tokens is None or max_tokens >= len(val):
        return len(val), int(info["bytes"]), n_docs, False

    def end(k: int) -> int:  # tokens of the first k documents, end-of-text tokens included
        return 0 if k == 0 else val.document_span(k - 1)[1] + 1

    lo, hi = 0, n_docs  # the largest k with end(k) <= max_tokens
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if end(mid) <= max_tokens else (lo, mid - 1)
    k = lo
    if k == 0:  # the first document alone is longer: score its beginning
        return max_tokens, _decoded_bytes(tok, [val[:max_tokens]]), 1, True
    n_bytes, done = 0, 0
    for entry in info["shards"]:
        docs = int(entry["documents"])
        if done + docs <= k:
            n_bytes += int(entry["bytes"])
        else:
            n_bytes += _decoded_bytes(tok, (val.document(i) for i in range(done, k)))
            break
        done += docs
    return end(k), n_bytes, k, False


def expand_paths(paths: Sequence[str | Path], what: str) -> list[Path]:
    """Files named by ``paths``: files, folders (every file under them, sorted) and glob patterns
    (sorted; ``**`` matches subfolders). ``what`` names the setting in errors."""
    return readers.expand_paths(paths, what)


def read_documents(paths: Sequence[str | Path], text_field: str = "text", what: str = "texts") -> Iterator[str]:
    """The documents of the files under ``paths`` (see :func:`expand_paths`), in order: a JSONL
    file (``.jsonl``, ``.ndjson``, optionally ``.gz`` or ``.zst``) gives the ``text_field`` of each
    line, parquet that column, any other file is one document. Empty documents are skipped.
    Invalid UTF-8, bad JSON and records without the field raise :class:`StageError` naming the
    file and line (:func:`lmcore.core.readers.read_texts`)."""
    return readers.read_texts(paths, text_field, what)


def encode_documents(tok, texts: Iterator[str], max_tokens: int | None) -> tuple[np.ndarray, int, int, bool]:
    """Tokenize documents as the encode stage does (special-token strings are plain text, each
    document followed by end-of-text) up to ``max_tokens`` tokens in whole documents: the tokens,
    the UTF-8 bytes of exactly the text they hold, the documents and whether the only document was
    cut (its first ``max_tokens`` tokens, bytes up to the end of the last one)."""

    eot = special_ids(tok).eot
    parts: list[np.ndarray] = []
    n_tokens = n_bytes = n_docs = 0
    saved = tok.encode_special_tokens
    tok.encode_special_tokens = True  # "<|endoftext|>" in a document is text, as in the encode stage
    try:
        for batch in batched(texts, 256, max_chars=BATCH_CHARS):
            for text, enc in zip(batch, tok.encode_batch_fast(batch)):
                n = len(enc.ids) + 1
                if max_tokens is not None and n_tokens + n > max_tokens:
                    if n_docs:
                        return np.concatenate(parts), n_bytes, n_docs, False
                    cut = tok.encode(text)  # with character offsets
                    end = cut.offsets[max_tokens - 1][1]
                    return np.array(cut.ids[:max_tokens], dtype=np.uint32), len(text[:end].encode("utf-8")), 1, True
                parts.append(np.array([*enc.ids, eot], dtype=np.uint32))
                n_tokens += n
                n_bytes += len(text.encode("utf-8"))
                n_docs += 1
    finally:
        tok.encode_special_tokens = saved
    return (np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)), n_bytes, n_docs, False


def score_texts(model, tok, texts: Iterator[str], stride: int | None = None, batch_size: int = 16,
                max_tokens: int | None = None, logp: np.ndarray | None = None, desc: str | None = None,
                what: str = "texts") -> Scored:
    """Score documents with a loaded model and tokenizer (see :func:`evaluate_texts`); ``logp``:
    unigram log-probabilities for the baseline."""

    eot = special_ids(tok).eot
    ids, n_bytes, n_docs, cut = encode_documents(tok, texts, max_tokens)
    if not n_docs:
        raise StageError(f"{what}: no text to score (every document is empty)")
    if n_bytes == 0:
        raise StageError(f"{what}: the {len(ids)} tokens scored hold no text (0 bytes)")
    nll = score_stream(model, ids, len(ids), eot, stride, batch_size, desc)
    uni = float("nan") if logp is None else unigram_scored_nll(ids, logp)
    return Scored(nll, len(ids), n_bytes, n_docs, cut, uni)


def evaluate_texts(model_dir: str | Path, paths: Sequence[str | Path], tokenizer_dir: str | Path | None = None,
                   stride: int | None = None, max_tokens: int | None = None, text_field: str = "text",
                   batch_size: int = 16) -> dict[str, Any]:
    """Bits per byte and perplexity of a model on text files, outside the pipeline.

    ``model_dir``: an lmcore model folder (``runs/pretrain/final``) or an exported Llama folder
    (``runs/export``); ``tokenizer_dir``: the folder (or file) of its ``tokenizer.json`` (default:
    ``model_dir``, which holds it for an export); ``paths``: files, folders or globs of text or
    JSONL (``text_field``), read as by ``evaluate.texts``. Returns ``bpb``, ``perplexity``,
    ``loss`` (nats per token), ``tokens``, ``bytes``, ``documents``, ``cut``. Bits per byte
    divide by the same bytes whatever the tokenizer, so two models with different tokenizers
    compare on the same files::

        from lmcore.eval.evaluate import evaluate_texts
        a = evaluate_texts("runs/pretrain/final", ["heldout/*.txt"], "data/tokenizer", stride=128)
        b = evaluate_texts("other/runs/export", ["heldout/*.txt"], stride=128)
        print(a["bpb"], b["bpb"])
    """

    model_dir = Path(model_dir)
    tok_path = Path(tokenizer_dir if tokenizer_dir is not None else model_dir)
    tok_file = tok_path / "tokenizer.json" if tok_path.is_dir() else tok_path
    model, model_cfg = load_lm(model_dir)
    tok = tokmod.load(tok_file)
    check_tokenizer(model, model_cfg, tok, tok_file, model_dir)
    block = model.cfg.block_size
    if stride is not None and not 1 <= stride <= block:
        raise StageError(f"stride = {stride} must be between 1 and the model's context {block}")
    what = ", ".join(map(str, paths))
    s = score_texts(model, tok, read_documents(paths, text_field, what), stride, batch_size, max_tokens,
                    desc=f"evaluate {model_dir}", what=what)
    return {**s.metrics(""), "cut": s.cut}


# ---------------------------------------------------------------------------------------------
# the stage


@dataclasses.dataclass
class EvaluateResult:
    metrics: dict[str, Any]
    report: Path


def task_results(finetuned: Path, tasks: Sequence[str]) -> tuple[dict[str, Any], list[tuple], list[Path]]:
    """Metrics of the fine-tuned ``tasks`` (``runs/finetune/<task>/results.json``) as
    ``<task>.<metric>``, ``<task>.majority_<metric>``, ``<task>.bow_<metric>`` and ``<task>.score``,
    plus ``glue.score`` (mean of the GLUE task scores) and ``glue.tasks``; report rows; and the
    leaderboard prediction files of the GLUE tasks."""

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
    """Evaluate the language model (validation split, then ``cfg.texts``) and collect the
    fine-tuned ``tasks`` (names, in order)."""

    out = Path(out)
    manifest = load_manifest(tokens_dir)
    model, model_cfg = load_lm(pretrained)
    tok_file = require(Path(tokenizer_dir) / "tokenizer.json", "tokenizer")
    tok = tokmod.load(tok_file)
    check_tokenizer(model, model_cfg, tok, tok_file, Path(pretrained))
    block = model.cfg.block_size
    stride = cfg.stride or block
    if stride > block:
        raise StageError(f"evaluate.stride = {stride} is larger than the context of the model in {pretrained} "
                         f"({block})")
    val = load_tokens(tokens_dir, "validation")
    train = load_tokens(tokens_dir, "train")
    info = manifest["splits"]["validation"]
    eot = int(manifest["eot_id"])
    for text in cfg.texts:  # a missing file stops the stage before anything runs
        expand_paths(text.paths, f"evaluate.texts ({text.name})")
    params = flatten(cfg, "evaluate.")
    params["evaluate.texts"] = json.dumps([t.model_dump() for t in cfg.texts])
    params |= describe_model(model, model_cfg, tok, tok_file)

    with stage_run("evaluate", tracking, params) as tr:
        # the validation split first: lm.val_bpb is the first key of the metrics file
        n_tok, n_bytes, n_docs, cut = split_selection(val, info, cfg.max_tokens, tok)
        if cut:
            log.warning("evaluate: the first validation document is longer than evaluate.max_tokens = %d: "
                        "scoring its beginning only", cfg.max_tokens)
        nll = score_stream(model, val, n_tok, eot, stride, cfg.batch_size, desc="evaluate: validation")
        logp = unigram_logp(train, manifest["vocab_size"])
        uni = unigram_scored_nll(val if n_tok == len(val) else val[:n_tok], logp)
        scored = Scored(nll, n_tok, n_bytes, n_docs, cut, uni)
        m: dict[str, Any] = scored.metrics("lm.val_")
        del m["lm.val_unigram_bpb"]
        m["lm.unigram_val_bpb"] = uni / math.log(2) / n_bytes
        m["lm.unigram_val_perplexity"] = math.exp(uni / n_tok)
        rows = [("language model", "validation bits per byte", m["lm.val_bpb"], m["lm.unigram_val_bpb"], "unigram")]
        log.info("evaluate: validation %.4f bits per byte, perplexity %.2f (%d tokens, %d bytes, %d documents)",
                 scored.bpb, math.exp(scored.loss), n_tok, n_bytes, n_docs)

        for text in cfg.texts:  # held-out text, in the order listed
            what = f"evaluate.texts ({text.name})"
            s = score_texts(model, tok, read_documents(text.paths, text.text_field, what), stride, cfg.batch_size,
                            text.max_tokens or cfg.max_tokens, logp, desc=f"evaluate: {text.name}", what=what)
            if s.cut:
                log.warning("%s: the first document is longer than max_tokens: scoring its beginning only", what)
            tm = s.metrics(f"lm.{text.name}.")
            m |= tm
            rows.append(("language model", f"{text.name} bits per byte", s.bpb, tm[f"lm.{text.name}.unigram_bpb"],
                         "unigram"))
            log.info("evaluate: %s %.4f bits per byte, perplexity %.2f (%d tokens, %d bytes, %d documents)",
                     text.name, s.bpb, math.exp(s.loss), s.tokens, s.bytes, s.documents)

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
        # flat keys in this order (not sorted): `dvc metrics show/diff` and readers see lm.val_bpb first
        write_text(metrics, json.dumps(m, indent=2) + "\n")
        tr.metrics({k: v for k, v in m.items() if isinstance(v, (int, float))})
        tr.artifact(out / "report.md")
        tr.artifact(out / "samples.md")
        if submission:
            tr.artifact(out / "glue_submission.zip")
        return EvaluateResult(m, out / "report.md")


def describe_model(model, model_cfg: dict[str, Any], tok, tok_file: Path) -> dict[str, Any]:
    """What was evaluated, logged as MLflow params of the evaluate run (``lmcore compare`` reads
    them when the pretrain stage did not run in the same pipeline execution)."""
    c = model.cfg
    return {"model.n_layer": c.n_layer, "model.n_head": c.n_head, "model.n_kv_heads": c.kv_heads,
            "model.n_embd": c.n_embd, "model.block_size": c.block_size, "model.vocab_size": c.vocab_size,
            "model.n_params": model.num_params(), "model.steps": model_cfg.get("steps"),
            "tokenizer.vocab_size": tok.get_vocab_size(), "tokenizer.sha256": sha256_file(tok_file)}


def _samples(model, tok, cfg: EvaluateConfig) -> str:
    """Every prompt's sample (one batch, KV cache, ``cfg``'s sampling settings and seed)."""

    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                           top_p=cfg.top_p, repetition_penalty=cfg.repetition_penalty, seed=cfg.seed)
    texts = generate_text(model, tok, cfg.prompts, gen)
    return "\n".join(f"### Prompt: {prompt!r}\n\n```\n{text}\n```\n" for prompt, text in zip(cfg.prompts, texts))
