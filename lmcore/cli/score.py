"""``lmcore score``: document-level bits per byte, byte and word perplexity of any model folder
on held-out text, as lm-evaluation-harness computes them (not a stage); the scoring is
:func:`lmcore.eval.evaluate.score_model_documents`."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from lmcore.core.errors import StageError


def _positive(text: str) -> int:
    """An argument that must be a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def add_parser(sub: Any) -> None:
    """The ``score`` subcommand of the ``lmcore`` CLI."""
    p = sub.add_parser("score", help="bits per byte, byte and word perplexity of any model folder (lmcore's or a "
                                     "Hugging Face causal LM) on held-out text, per document as lm-evaluation-harness "
                                     "scores it")
    p.add_argument("model", help="a model folder: runs/pretrain/final, runs/export, or any Hugging Face causal LM")
    p.add_argument("--texts", nargs="+",
                   help="files, folders or globs of text or JSONL (default: the clean validation split, "
                        "data/clean/validation under --root)")
    p.add_argument("--text-field", default="text", help="the JSONL field holding the text (default: text)")
    p.add_argument("--tokenizer", help="tokenizer.json or its folder, for an lmcore model folder "
                                       "(default: data/tokenizer for runs/pretrain/final, else the model folder)")
    p.add_argument("--backend", choices=["auto", "lmcore", "transformers"], default="auto",
                   help="auto: lmcore's loader for its own model folders, transformers for the rest")
    p.add_argument("--batch-size", type=_positive, default=8, help="windows per forward pass (text scoring)")
    p.add_argument("--limit", type=_positive, help="score the first N documents only")
    p.add_argument("--task", help="instead of text: zero-shot scores on a prepared task folder "
                                  "(data/raw/tasks/<task>), by log-likelihood after lm-evaluation-harness's prompt")
    p.add_argument("--multiple-choice", metavar="JSONL",
                   help="instead of text: zero-shot acc/acc_norm on a JSONL file of {context, choices, gold}")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def main(args: argparse.Namespace) -> int:
    # lazy: loads torch
    from lmcore.eval.evaluate import multiple_choice_model, read_documents, score_model_documents, zero_shot_model
    from lmcore.model.folder import read_config

    root = Path(args.root)
    try:
        model = Path(args.model)
        hf = args.backend == "transformers" or (args.backend == "auto" and "model" not in read_config(model))
        if args.tokenizer and hf:  # transformers reads the folder's own tokenizer: a --tokenizer was ignored
            raise StageError(f"--tokenizer {args.tokenizer}: the transformers backend scores {model} with its own "
                             "tokenizer (the folder's); --tokenizer is for lmcore model folders")
        if args.task and args.multiple_choice:
            raise StageError("--task and --multiple-choice: give one (each scores zero-shot examples of its own)")
        if args.task or args.multiple_choice:
            given = [f for f, v in (("--texts", args.texts), ("--limit", args.limit),
                                    ("--text-field", args.text_field != "text")) if v]
            if given:  # they select documents to score: silently ignored, a quick --limit 50 ran the whole task
                raise StageError(f"{', '.join(given)}: for text scoring, not with "
                                 f"{'--task' if args.task else '--multiple-choice'}")
            tok = args.tokenizer or (None if (model / "tokenizer.json").exists() else root / "data/tokenizer")
            if args.task:
                z, backend = zero_shot_model(model, args.task, tok, args.backend)
            else:
                z, backend = multiple_choice_model(model, args.multiple_choice, tok, args.backend)
            z = {"model": str(model), "backend": backend, "task": args.task or args.multiple_choice, **z}
            print(json.dumps(z) if args.json else f"{model} ({backend}) on {z['task']}, zero-shot: "
                  + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in z.items()
                              if k not in ("model", "backend", "task")))
            return 0
        paths = args.texts or [str(root / "data/clean/validation")]
        texts = [t for i, t in zip(range(args.limit or 10**12), read_documents(paths, args.text_field))]
        if not texts:
            raise StageError(f"{', '.join(paths)}: no documents to score")
        tok = args.tokenizer
        if tok is None and not (model / "tokenizer.json").exists():
            tok = root / "data/tokenizer"
        scores, backend = score_model_documents(model, texts, tok, args.backend, args.batch_size)
    except StageError as e:
        print(f"lmcore score: error: {e}", file=sys.stderr)
        return 2
    out = {"model": str(model), "backend": backend, "documents": len(texts), "tokens": sum(scores.tokens),
           "bytes": sum(scores.bytes), "words": sum(scores.words), "loglikelihood": sum(scores.loglikelihoods),
           "bits_per_byte": scores.bits_per_byte, "byte_perplexity": scores.byte_perplexity,
           "word_perplexity": scores.word_perplexity}
    if args.json:  # strict JSON: a non-finite value (word perplexity of text without spaces: inf) is null
        print(json.dumps({k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in out.items()},
                         allow_nan=False))
    else:
        print(f"{model} ({backend}): {out['documents']} documents, {out['tokens']:,} tokens, {out['bytes']:,} bytes, "
              f"{out['words']:,} words\n  bits per byte {out['bits_per_byte']:.6f}  byte perplexity "
              f"{out['byte_perplexity']:.6f}  word perplexity {out['word_perplexity']:.4f}")
    return 0
