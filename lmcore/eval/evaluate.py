"""Stage ``evaluate``: language-model and task metrics, baselines, sample generations.

- Bits per byte and perplexity of the pretrained model on the validation split, then on any
  held-out text listed in ``evaluate.texts`` (files, folders or globs of text or JSONL), all with
  the same strided sliding window (:mod:`lmcore.eval.windows`). Documents are scored as the model
  was trained on them: each followed by the end-of-text token, the stream preceded by one
  end-of-text token as context, so every token of every document is scored; held-out text is
  tokenized by the encode stage's own rules. Bits per byte = negative log-likelihood in bits /
  UTF-8 bytes of exactly the documents scored (with ``max_tokens``, whole documents are kept;
  :mod:`lmcore.eval.scored`): the number to compare across tokenizers, and the first key of
  ``metrics/evaluate.json`` (``lm.val_bpb``).
- The same numbers for a unigram model of the training tokens (add-one smoothed), the floor a
  language model must clearly beat (:mod:`lmcore.eval.unigram`).
- Task metrics of every fine-tuned task (read from ``runs/finetune/<task>/results.json``, the
  kept epoch's validation metrics) beside its majority-class and bag-of-words baselines, the GLUE
  score (mean of the GLUE task scores), and ``glue_submission.zip``: the leaderboard prediction
  files of every fine-tuned GLUE task, ready to upload (:mod:`lmcore.eval.tasks`).
- A few sampled generations, and ``report.md`` (:mod:`lmcore.eval.report`).

This module reads the text files and runs the stage (:func:`evaluate`).
:func:`evaluate_texts` scores files with any model folder (``runs/pretrain/final``, or an exported
Hugging Face Llama folder such as ``runs/export``) and its tokenizer, outside the pipeline: the way
to compare two checkpoints with different tokenizers on the same text.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from lmcore.config import EvaluateConfig, TrackingConfig, flatten
from lmcore.core import readers
from lmcore.core.errors import StageError
from lmcore.core.io import atomic_path, iter_field, require, split_shards, write_text
from lmcore.core.layout import Layout
from lmcore.core.machine import tune_malloc
from lmcore.data import glue
from lmcore.data import tokenizer as tokmod
from lmcore.data.tokenizer import special_ids, specials_as_text
from lmcore.data.encode import load_manifest, load_tokens
from lmcore.eval.harness import DecoderScorer, DocumentScores, Loaded, load_hf, score_documents
from lmcore.eval.report import describe_model, report_table, samples
from lmcore.eval.scored import score_split, score_texts
from lmcore.eval.tasks import SUBMISSION, task_results, write_submission
from lmcore.eval.unigram import unigram_logp
from lmcore.eval.zeroshot import TEMPLATES, multiple_choice, read_multiple_choice, zero_shot
from lmcore.model.folder import check_tokenizer, load_lm, read_config
from lmcore.tracking import stage_run

log = logging.getLogger(__name__)

WINDOWS = "windows.json"  # per-window NLL and bytes of the document-level pass (lmcore compare A B)



# ---------------------------------------------------------------------------------------------
# text files, and scoring them outside the pipeline


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
    check_tokenizer(model_cfg, model.cfg.vocab_size, tok, tok_file, model_dir)
    block = model.cfg.block_size
    if stride is not None and not 1 <= stride <= block:
        raise StageError(f"stride = {stride} must be between 1 and the model's context {block}")
    what = ", ".join(map(str, paths))
    s = score_texts(model, tok, read_documents(paths, text_field, what), stride, batch_size, max_tokens,
                    desc=f"evaluate {model_dir}", what=what)
    return {**s.metrics(""), "cut": s.cut}


def score_clean_documents(model, tok, clean_dir: Path, eot: int, batch_size: int,
                          max_tokens: int | None) -> DocumentScores:
    """The clean validation documents scored one by one as lm-evaluation-harness does
    (:mod:`lmcore.eval.harness`), the first whole documents within ``max_tokens``."""
    shards = split_shards(clean_dir, "validation")
    if not shards:
        raise StageError(f"{clean_dir}: no validation shards to score (validation/*.jsonl)")
    texts, ids, total = [], [], 0
    with specials_as_text(tok):
        for text in iter_field(shards):
            enc = tok.encode(text)
            toks = enc.ids
            # each document's end-of-text token counts, as in the split's selection (scored.split_selection)
            if max_tokens is not None and total + len(toks) + 1 > max_tokens:
                if texts:
                    break
                # the first document alone is longer: its beginning, and the text those tokens hold
                toks, text = toks[:max_tokens], text[: enc.offsets[max_tokens - 1][1]]
            texts.append(text)
            ids.append(toks)
            total += len(toks) + 1
    return score_documents(DecoderScorer(model), ids, texts, eot, batch_size, desc="evaluate: per document")


def text_encoder(tok) -> Callable[[str], list[int]]:
    """``encode(text) -> ids`` with ``tok``, special-token strings in the text read as plain text
    (as the encode stage reads documents), for scoring prompts and documents."""

    def encode(text: str) -> list[int]:
        with specials_as_text(tok):
            return tok.encode(text).ids

    return encode


def load_scorer(model_dir: str | Path, tokenizer_dir: str | Path | None = None,
                backend: str = "auto") -> Loaded:
    """The scorer, encoder, prefix token and backend (:class:`lmcore.eval.harness.Loaded`) of any model folder: lmcore's own
    (``runs/pretrain/final``, with ``tokenizer_dir``) or a Hugging Face causal LM folder
    (``runs/export`` or any other: through ``transformers``; ``backend="lmcore"`` reads an lmcore
    export without it)."""
    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    if backend == "auto":
        backend = "lmcore" if "model" in cfg else "transformers"
    if backend == "transformers":
        return load_hf(model_dir)
    if backend != "lmcore":
        raise StageError(f"backend {backend!r}: expected auto, lmcore or transformers")
    tok_path = Path(tokenizer_dir if tokenizer_dir is not None else model_dir)
    tok_file = tok_path / "tokenizer.json" if tok_path.is_dir() else tok_path
    model, model_cfg = load_lm(model_dir)
    tok = tokmod.load(require(tok_file, "tokenizer"))
    check_tokenizer(model_cfg, model.cfg.vocab_size, tok, tok_file, model_dir)
    return Loaded(DecoderScorer(model), text_encoder(tok), special_ids(tok, model_cfg).eot, backend)


def score_model_documents(model_dir: str | Path, texts: Sequence[str], tokenizer_dir: str | Path | None = None,
                          backend: str = "auto", batch_size: int = 8) -> tuple[DocumentScores, str]:
    """Score ``texts`` one document at a time as lm-evaluation-harness does, with any model
    folder (:func:`load_scorer`). Returns the scores and the backend used."""
    lm = load_scorer(model_dir, tokenizer_dir, backend)
    ids = [lm.encode(t) for t in texts]
    return score_documents(lm.scorer, ids, texts, lm.prefix, batch_size, desc=f"score {model_dir}"), lm.backend


def zero_shot_model(model_dir: str | Path, task_dir: str | Path, tokenizer_dir: str | Path | None = None,
                    backend: str = "auto", batch_size: int = 32) -> tuple[dict[str, Any], str]:
    """Zero-shot metrics (:func:`lmcore.eval.zeroshot.zero_shot`) of any model folder on a
    prepared task (``data/raw/tasks/<task>``)."""
    lm = load_scorer(model_dir, tokenizer_dir, backend)
    spec, splits = glue.load_task(Path(task_dir))
    return zero_shot(lm.scorer, lm.encode, lm.prefix, spec, splits, batch_size=batch_size), lm.backend


def multiple_choice_model(model_dir: str | Path, path: str | Path, tokenizer_dir: str | Path | None = None,
                          backend: str = "auto") -> tuple[dict[str, Any], str]:
    """Zero-shot ``acc``/``acc_norm`` of any model folder on a local multiple-choice JSONL file
    (``context``, ``choices``, ``gold``: :func:`lmcore.eval.zeroshot.read_multiple_choice`)."""
    lm = load_scorer(model_dir, tokenizer_dir, backend)
    return multiple_choice(lm.scorer, lm.encode, lm.prefix, read_multiple_choice(path)), lm.backend


def zero_shot_results(model, tok, tasks_dir: Path, tasks: Sequence[str], eot: int,
                      finetuned: dict[str, Any]) -> tuple[dict[str, Any], list[tuple]]:
    """The pretrained model's zero-shot metrics of every task with a template
    (:mod:`lmcore.eval.zeroshot`): ``<task>.zeroshot_<metric>`` and a report row beside the
    fine-tuned score (``finetuned``: :func:`task_results`'s metrics)."""
    m: dict[str, Any] = {}
    rows: list[tuple] = []
    encode = text_encoder(tok)
    for task in tasks:
        spec, splits = glue.load_task(Path(tasks_dir) / task)
        if spec.is_regression or spec.name not in TEMPLATES:
            log.info("evaluate: %s: no zero-shot score (%s)", task,
                     "a regression task" if spec.is_regression else "no prompt template for this task")
            continue
        z = zero_shot(DecoderScorer(model), encode, eot, spec, splits)
        m |= {f"{task}.zeroshot_{k}": v for k, v in z.items() if k in ("acc", "score") or k.startswith("acc_")}
        rows.append((task, "score", finetuned.get(f"{task}.score", float("nan")), z["score"],
                     "zero-shot, pretrained model, lm-eval prompt"))
        log.info("evaluate: %s zero-shot: acc %.4f, acc_norm %.4f, score %.4f (%d examples)", task, z["acc"],
                 z["acc_norm"], z["score"], z["examples"])
    return m, rows


# ---------------------------------------------------------------------------------------------
# the stage


@dataclasses.dataclass
class EvaluateResult:
    metrics: dict[str, Any]
    report: Path


def evaluate(cfg: EvaluateConfig, tokens_dir: Path, pretrained: Path, finetuned: Path, tokenizer_dir: Path,
             tasks: Sequence[str], out: Path, metrics: Path,
             tracking: TrackingConfig = TrackingConfig(), clean_dir: Path | None = None,
             tasks_dir: Path | None = None, root: Path = Path(".")) -> EvaluateResult:
    """Evaluate the language model (validation split, then ``cfg.texts``) and collect the
    fine-tuned ``tasks`` (names, in order); ``clean_dir``: the clean stage's folder, whose
    validation documents ``cfg.document_level`` scores one by one (None: not scored);
    ``tasks_dir``: the prepared tasks (``data/raw/tasks``), scored zero-shot with
    ``cfg.zero_shot`` (None: not scored). The files of ``cfg.texts`` and
    ``cfg.multiple_choice`` are relative to the project folder ``root`` (``lmcore --root``), as
    ``params.yaml`` means them; the parameters are logged as written."""

    out, given, cfg = Path(out), cfg, cfg.rooted(Layout(Path(root)))
    malloc = tune_malloc()  # batches of B x T x vocab logits: reuse the blocks (see pretrain)
    manifest = load_manifest(tokens_dir)
    model, model_cfg = load_lm(pretrained)
    tok_file = require(Path(tokenizer_dir) / "tokenizer.json", "tokenizer")
    tok = tokmod.load(tok_file)
    check_tokenizer(model_cfg, model.cfg.vocab_size, tok, tok_file, Path(pretrained))
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
    for mc in cfg.multiple_choice:
        read_multiple_choice(mc.path, mc.context_field, mc.choices_field, mc.gold_field)
    # read (and checked) before the scoring: a damaged results file stops the stage at once
    task_m, task_rows, submission = task_results(finetuned, tasks)
    params = flatten(given, "evaluate.")
    params["evaluate.texts"] = json.dumps([t.model_dump() for t in given.texts])
    params["evaluate.multiple_choice"] = json.dumps([c.model_dump() for c in given.multiple_choice])
    params |= describe_model(model, model_cfg, tok, tok_file)
    params["allocator"] = malloc

    document_level = cfg.document_level and clean_dir is not None
    zero_shot = cfg.zero_shot and tasks_dir is not None
    read = [*([clean_dir] if document_level else []), *([Path(tasks_dir) / t for t in tasks] if zero_shot else []),
            tokens_dir, tokenizer_dir, pretrained, *(Path(finetuned) / t for t in tasks)]
    with stage_run("evaluate", tracking, params, inputs=read,
                   outputs=[out]) as tr:
        # the validation split first: lm.val_bpb is the first key of the metrics file
        logp = unigram_logp(train, manifest["vocab_size"])
        scored = score_split(model, tok, val, info, eot, stride, cfg.batch_size, cfg.max_tokens, logp,
                             desc="evaluate: validation")
        if scored.cut:
            log.warning("evaluate: the first validation document is longer than evaluate.max_tokens = %d: "
                        "scoring its beginning only", cfg.max_tokens)
        m: dict[str, Any] = scored.metrics("lm.val_")
        del m["lm.val_unigram_bpb"]
        m["lm.unigram_val_bpb"] = scored.unigram_nll / math.log(2) / scored.bytes
        m["lm.unigram_val_perplexity"] = math.exp(scored.unigram_nll / scored.tokens)
        rows = [("language model", "validation bits per byte", m["lm.val_bpb"], m["lm.unigram_val_bpb"], "unigram")]
        log.info("evaluate: validation %.4f bits per byte, perplexity %.2f (%d tokens, %d bytes, %d documents)",
                 scored.bpb, math.exp(scored.loss), scored.tokens, scored.bytes, scored.documents)
        docs = None
        if document_level:
            docs = score_clean_documents(model, tok, Path(clean_dir), eot, cfg.batch_size, cfg.max_tokens)
            m |= docs.metrics("lm.val_")
            log.info("evaluate: validation per document (as lm-evaluation-harness): %.4f bits per byte, word "
                     "perplexity %.2f (%d documents)", docs.bits_per_byte, docs.word_perplexity, len(docs.bytes))

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

        m |= task_m
        rows += task_rows
        if zero_shot:
            zs_m, zs_rows = zero_shot_results(model, tok, Path(tasks_dir), tasks, eot, task_m)
            m |= zs_m
            rows += zs_rows
        for mc in cfg.multiple_choice:  # local multiple-choice files, zero-shot
            items = read_multiple_choice(mc.path, mc.context_field, mc.choices_field, mc.gold_field)
            got = multiple_choice(DecoderScorer(model), text_encoder(tok), eot, items)
            m |= {f"mc.{mc.name}.{k}": v for k, v in got.items()}
            chance = sum(1 / len(c) for _, c, _ in items) / len(items)
            rows.append((f"multiple choice {mc.name}", "zero-shot accuracy", got["acc"], chance, "chance"))
            log.info("evaluate: %s zero-shot: acc %.4f, acc_norm %.4f (%d examples)", mc.name, got["acc"],
                     got["acc_norm"], got["examples"])

        sampled = samples(model, tok, cfg)
        with atomic_path(out) as tmp:
            tmp.mkdir()
            (tmp / "report.md").write_text(report_table(rows))
            (tmp / "samples.md").write_text(sampled)
            if docs is not None:  # the units lmcore compare resamples to tell a difference from noise
                (tmp / WINDOWS).write_text(json.dumps(docs.window_table()) + "\n")
            if submission:  # the leaderboard upload: CoLA.tsv, ..., AX.tsv of the GLUE tasks fine-tuned
                m["glue.submission_files"] = write_submission(submission, tmp)
        # flat keys in this order (not sorted): `dvc metrics show/diff` and readers see lm.val_bpb first
        write_text(metrics, json.dumps(m, indent=2) + "\n")
        tr.metrics({k: v for k, v in m.items() if isinstance(v, (int, float))})
        tr.artifact(out / "report.md")
        tr.artifact(out / "samples.md")
        if docs is not None:
            tr.artifact(out / WINDOWS)
        if submission:
            tr.artifact(out / SUBMISSION)
        return EvaluateResult(m, out / "report.md")
