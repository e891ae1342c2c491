"""The unigram baseline: add-one-smoothed frequencies of the training tokens, the floor a language
model must clearly beat (``lm.unigram_val_bpb`` and ``lm.<text>.unigram_bpb`` of the evaluate
stage). Counts are read in chunks, shard by shard: no int64 copy of a whole split."""

from __future__ import annotations

from typing import Any

import numpy as np

from lmcore.core.errors import StageError


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
