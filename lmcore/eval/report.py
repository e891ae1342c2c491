"""What the evaluate stage writes for a reader: the report table, the sample generations, and the
description of the model evaluated (MLflow params).

- :func:`report_table`: ``report.md``, one row per metric beside its baseline (the unigram model
  for bits per byte, majority class and bag-of-words for a task);
- :func:`samples`: ``samples.md``, every prompt's sample;
- :func:`describe_model`: the model and tokenizer evaluated, logged as params of the evaluate run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmcore.config import EvaluateConfig
from lmcore.core.io import sha256_file
from lmcore.generate import GenerationConfig, generate_text

Row = tuple[str, str, float, float, str]
"""A report row: what, metric, the model's value, the baseline's (NaN: none), the baseline's kind."""


def report_table(rows: Sequence[Row]) -> str:
    """The Markdown table of ``report.md``."""
    lines = ["| what | metric | model | baseline | baseline kind |", "|---|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c:.4f} | {'' if math.isnan(d) else f'{d:.4f}'} | {e} |" for a, b, c, d, e in rows]
    return "\n".join(lines) + "\n"


def describe_model(model, model_cfg: dict[str, Any], tok, tok_file: Path) -> dict[str, Any]:
    """What was evaluated, logged as MLflow params of the evaluate run (``lmcore compare`` reads
    them when the pretrain stage did not run in the same pipeline execution)."""
    c = model.cfg
    return {"model.n_layer": c.n_layer, "model.n_head": c.n_head, "model.n_kv_heads": c.kv_heads,
            "model.n_embd": c.n_embd, "model.block_size": c.block_size, "model.vocab_size": c.vocab_size,
            "model.n_params": model.num_params(), "model.steps": model_cfg.get("steps"),
            "tokenizer.vocab_size": tok.get_vocab_size(), "tokenizer.sha256": sha256_file(tok_file)}


def samples(model, tok, cfg: EvaluateConfig) -> str:
    """Every prompt's sample (one batch, KV cache, ``cfg``'s sampling settings and seed), as
    ``samples.md``."""

    gen = GenerationConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                           top_p=cfg.top_p, repetition_penalty=cfg.repetition_penalty, seed=cfg.seed)
    texts = generate_text(model, tok, cfg.prompts, gen)
    return "\n".join(f"### Prompt: {prompt!r}\n\n```\n{text}\n```\n" for prompt, text in zip(cfg.prompts, texts))
