"""Scoring a token stream with a model: the strided sliding window.

:func:`window_plan` says which tokens each window feeds and scores, :func:`sliding_window_nll`
runs the windows in batches, and :func:`score_stream` scores a stream of documents as the model was
trained on them (after one end-of-text token of context, so that every token is scored). The
evaluate stage scores the validation split and every held-out text this way, and
``benchmarks/quality.py`` its trained models.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from lmcore.core.errors import StageError

log = logging.getLogger(__name__)


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
            _, loss = model(x.to(device), y.to(device), reduction="sum", return_logits=False)
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


def score_stream(model, tokens: Any, length: int, eot: int, stride: int | None, batch_size: int,
                 desc: str | None = None) -> float:
    """NLL (nats) of every token of ``tokens[:length]``, a stream of documents each followed by
    ``eot``, after one ``eot`` of context (as at a document start in training)."""
    block = model.cfg.block_size
    nll, count = sliding_window_nll(model, _AfterContext(eot, tokens, length), block, stride or block, batch_size,
                                    desc=desc)
    assert count == length, (count, length)
    return nll
