"""Document-level bits per byte, byte perplexity and word perplexity, as lm-evaluation-harness
defines them for its ``loglikelihood_rolling`` tasks (wikitext and local-file tasks alike).

Per document: the text is tokenized without special tokens; the first window is one prefix
token (the tokenizer's BOS, else its EOS: lmcore's end-of-text) followed by the document's first
``max_len - 1`` tokens and predicts its first ``max_len`` tokens; each later window predicts the
next ``max_len`` tokens from the ``max_len`` tokens before them, the last one right-aligned
(lm-eval's ``get_rolling_token_windows`` with ``context_len=1`` and ``make_disjoint_window``).
Every token is predicted once; the document's log-likelihood is the sum. Over a corpus:

    bits_per_byte   = -sum(LL) / (sum(bytes) * ln 2)     bytes = len(text.encode("utf-8"))
    byte_perplexity = exp(-sum(LL) / sum(bytes))
    word_perplexity = exp(-sum(LL) / sum(words))        words = len(re.split(r"\\s+", text))

Unlike the strided stream of :mod:`lmcore.eval.windows` (documents scored one after another, each
followed by end-of-text, as in training), each document starts from nothing but the prefix, and
its end-of-text is not scored: the numbers a user compares with the harness's. Works with any
scorer: lmcore's decoder (:class:`DecoderScorer`) or a Hugging Face causal LM
(:class:`HFScorer`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from tqdm import tqdm

from lmcore.core.errors import StageError

log = logging.getLogger(__name__)


def rolling_windows(tokens: Sequence[int], prefix: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """``(context, continuation)`` pairs covering ``tokens`` once each (lm-eval's rolling windows,
    made disjoint): the model reads ``(context + continuation)[:-1]`` and predicts
    ``continuation`` from its last ``len(continuation)`` positions."""
    if max_len < 1:
        raise StageError(f"the model's context must be at least 1 token, got {max_len}")
    tokens = list(tokens)
    if not tokens:
        return []
    first = min(max_len, len(tokens))
    out = [([prefix], tokens[:first])]
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_len)
        end = done + n
        window = tokens[max(end - max_len - 1, 0) : end - 1]
        cont = tokens[end - n : end]
        out.append((window[: len(window) - (n - 1)], cont))
        done = end
    return out


def count_words(text: str) -> int:
    """lm-eval's word count (``re.split(r"\\s+", text)``: a leading or trailing space adds one)."""
    return len(re.split(r"\s+", text))


class DecoderScorer:
    """Per-row summed negative log-likelihoods from lmcore's :class:`~lmcore.model.decoder.Decoder`."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.max_len = int(model.cfg.block_size)

    @torch.no_grad()
    def nll(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _, loss = self.model(x, y, reduction="none", return_logits=False)
        return loss.view(y.shape).double().sum(dim=1)


class HFScorer:
    """The same from a Hugging Face causal LM (``AutoModelForCausalLM``), in float32."""

    def __init__(self, model: Any, max_len: int) -> None:
        self.model = model
        self.max_len = int(max_len)

    @torch.no_grad()
    def nll(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=x).logits.float()
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=-100,
                               reduction="none")
        return loss.view(y.shape).double().sum(dim=1)


@dataclasses.dataclass
class DocumentScores:
    """Per-document log-likelihoods and what they were divided by."""

    loglikelihoods: list[float]
    """Natural-log likelihood of each document (<= 0)."""
    bytes: list[int]
    words: list[int]
    tokens: list[int]
    windows: list[tuple[int, float, int]] = dataclasses.field(default_factory=list)
    """``(document, negative log-likelihood in nats, tokens predicted)`` of every window, in
    document order: the units a paired bootstrap resamples (:mod:`lmcore.eval.bootstrap`)."""

    def window_table(self) -> dict[str, list]:
        """The windows as columns, each with its share of its document's bytes (in proportion to
        the tokens it predicts): ``document``, ``nll``, ``tokens``, ``bytes``."""
        doc, nll, tok = (list(c) for c in zip(*self.windows)) if self.windows else ([], [], [])
        share = [self.bytes[d] * t / max(self.tokens[d], 1) for d, t in zip(doc, tok)]
        return {"document": doc, "nll": nll, "tokens": tok, "bytes": share}

    @property
    def bits_per_byte(self) -> float:
        return -sum(self.loglikelihoods) / (sum(self.bytes) * math.log(2))

    @property
    def byte_perplexity(self) -> float:
        return _exp(-sum(self.loglikelihoods) / sum(self.bytes))

    @property
    def word_perplexity(self) -> float:
        # text without spaces (Chinese, Japanese) is one "word" per run: its NLL can pass the
        # 709 nats where exp overflows; the perplexity is then reported as inf, not a crash
        return _exp(-sum(self.loglikelihoods) / sum(self.words))

    def metrics(self, prefix: str) -> dict[str, float | int]:
        """``<prefix>doc_bpb``, ``byte_perplexity``, ``word_perplexity``, ``doc_documents``."""
        return {f"{prefix}doc_bpb": self.bits_per_byte, f"{prefix}byte_perplexity": self.byte_perplexity,
                f"{prefix}word_perplexity": self.word_perplexity, f"{prefix}doc_documents": len(self.bytes)}


def _exp(x: float) -> float:
    return math.exp(x) if x < 709.0 else math.inf


def score_documents(scorer: Any, token_lists: Iterable[Sequence[int]], texts: Sequence[str], prefix: int,
                    batch_size: int = 16, desc: str | None = None) -> DocumentScores:
    """Score each document's tokens (``token_lists[i]`` encodes ``texts[i]``) with its rolling
    windows; ``scorer``: :class:`DecoderScorer` or :class:`HFScorer`. Windows of all documents
    are batched together (a batch pads to its longest window)."""
    token_lists = [list(t) for t in token_lists]
    if len(token_lists) != len(texts):
        raise StageError(f"{len(token_lists)} token lists for {len(texts)} texts")
    if not any(texts):
        raise StageError(f"{len(texts)} document(s) and no text among them (0 bytes): nothing to score")
    jobs = [(d, w, ctx, cont) for d, toks in enumerate(token_lists)
            for w, (ctx, cont) in enumerate(rolling_windows(toks, prefix, scorer.max_len))]
    jobs.sort(key=lambda j: -(len(j[2]) + len(j[3])))  # similar lengths together: less padding
    ll = [0.0] * len(texts)
    per_window: list[tuple[int, int, float, int]] = []
    device = next(scorer.model.parameters()).device
    t0 = time.perf_counter()
    n_tokens = sum(len(t) for t in token_lists)
    with tqdm(total=n_tokens, desc=desc or "score", unit="tok", unit_scale=True, mininterval=2,
              disable=desc is None) as bar:
        for i in range(0, len(jobs), batch_size):
            chunk = jobs[i : i + batch_size]
            width = max(len(c) + len(t) - 1 for _, _, c, t in chunk)
            x = torch.zeros((len(chunk), width), dtype=torch.long)
            y = torch.full((len(chunk), width), -100, dtype=torch.long)
            for r, (_, _, ctx, cont) in enumerate(chunk):
                seq = (ctx + cont)[:-1]
                x[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                y[r, len(seq) - len(cont) : len(seq)] = torch.tensor(cont, dtype=torch.long)
            nll = scorer.nll(x.to(device), y.to(device)).cpu().tolist()
            for (d, w, _, cont), v in zip(chunk, nll):
                ll[d] -= v
                per_window.append((d, w, v, len(cont)))
                bar.update(len(cont))
    if desc is not None:
        secs = time.perf_counter() - t0
        log.info("%s: %d documents, %d tokens in %d windows in %.1f s (%.0f tokens/s)", desc, len(texts), n_tokens,
                 len(jobs), secs, n_tokens / max(secs, 1e-9))
    per_window.sort()  # by document, then window: the same order in every run on the same tokens
    return DocumentScores(ll, [len(t.encode("utf-8")) for t in texts], [count_words(t) for t in texts],
                          [len(t) for t in token_lists], [(d, v, n) for d, _, v, n in per_window])


# ---------------------------------------------------------------------------------------------
# any model folder, and its own tokenizer


@dataclasses.dataclass
class Loaded:
    """A scorer, how to tokenize for it, and the prefix token of its first windows."""

    scorer: Any
    encode: Any
    """``str -> list[int]``, no special tokens added."""
    prefix: int
    backend: str


def _hf_max_length(config: Any, tokenizer: Any) -> int:
    """lm-eval's ``max_length`` of a Hugging Face model: the config's ``n_positions``,
    ``max_position_embeddings`` or ``n_ctx``, else the tokenizer's ``model_max_length``, else 2048."""
    cfg = getattr(config, "text_config", None) or config
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(cfg, attr, None):
            return int(getattr(cfg, attr))
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit and limit < 10**9 else 2048


def load_hf(folder: Path) -> Loaded:
    """Any local Hugging Face causal LM folder (``AutoModelForCausalLM``, float32, eval) and its
    tokenizer; needs ``transformers``."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer  # lazy: optional, for foreign models only
    except ImportError as e:
        raise StageError(f"{folder}: scoring a Hugging Face model folder needs transformers "
                         "(pip install transformers)") from e
    try:
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        raise StageError(f"{folder}: not a Hugging Face causal LM folder transformers can load "
                         f"({str(e).splitlines()[0][:200]})") from None
    prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if prefix is None:
        raise StageError(f"{folder}: its tokenizer has neither a BOS nor an EOS token to start a document with")

    def encode(text: str) -> list[int]:
        return tok(text, add_special_tokens=False).input_ids

    return Loaded(HFScorer(model, _hf_max_length(model.config, tok)), encode, int(prefix), "transformers")
