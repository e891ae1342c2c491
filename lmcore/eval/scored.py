"""What is scored: whole documents, and exactly their UTF-8 bytes.

Bits per byte divide a negative log-likelihood by the UTF-8 bytes of exactly the documents scored,
whatever the tokenizer: :class:`Scored` holds the two and the metrics made of them. Of an encoded
split, :func:`split_selection` picks the first whole documents within ``max_tokens`` and counts
their bytes (those of the text encode read: the manifest's, and its per-document counts); of raw text,
:func:`encode_documents` tokenizes documents with the encode stage's own rules
(:func:`lmcore.data.encode.encode_batches`) and counts the bytes of the text, and
:func:`score_texts` scores them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from lmcore.core.errors import StageError
from lmcore.data.encode import encode_batches
from lmcore.data.tokenizer import special_ids, specials_as_text
from lmcore.eval.unigram import unigram_scored_nll
from lmcore.eval.windows import score_stream

DECODE_BATCH = 1000  # documents decoded per call when counting bytes
ENCODE_BATCH = 256  # documents encoded per call when scoring text


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


# ---------------------------------------------------------------------------------------------
# an encoded split


def _decoded_bytes(tok, docs: Iterable[np.ndarray]) -> int:
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
    documents holding at most ``max_tokens`` tokens (end-of-text tokens included). Bytes are those
    of the text as encode read it (the manifest's, and its per-document counts), so a selection is
    measured as the whole split is, whatever the tokenizer's normaliser; shards written without the
    counts (an older encode) fall back to decoding the documents."""
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
        prefix = _decoded_bytes(tok, [val[:max_tokens]])
        whole = val.bytes_of_first(1)
        if whole is not None:  # its share of the document's text, in the text's own bytes
            prefix = round(whole * prefix / max(_decoded_bytes(tok, [val.document(0)]), 1))
        return max_tokens, prefix, 1, True
    n_bytes = val.bytes_of_first(k)
    if n_bytes is None:
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


def score_split(model, tok, split: Any, info: dict[str, Any], eot: int, stride: int | None, batch_size: int,
                max_tokens: int | None, logp: np.ndarray | None = None, desc: str | None = None) -> Scored:
    """Score the first whole documents of an encoded ``split`` (its manifest entry ``info``) within
    ``max_tokens`` (:func:`split_selection`); ``logp``: unigram log-probabilities for the baseline."""
    if len(split) == 0:
        raise StageError("the split holds no tokens to score (data/tokens: encode wrote it empty)")
    n_tok, n_bytes, n_docs, cut = split_selection(split, info, max_tokens, tok)
    if n_bytes == 0:  # empty documents: each a lone end-of-text token
        raise StageError(f"the {n_tok} tokens scored hold no text (0 bytes): bits per byte has no meaning")
    nll = score_stream(model, split, n_tok, eot, stride, batch_size, desc=desc)
    uni = float("nan") if logp is None else unigram_scored_nll(split if n_tok == len(split) else split[:n_tok], logp)
    return Scored(nll, n_tok, n_bytes, n_docs, cut, uni)


# ---------------------------------------------------------------------------------------------
# raw text


def encode_documents(tok, texts: Iterator[str], max_tokens: int | None) -> tuple[np.ndarray, int, int, bool]:
    """Tokenize documents as the encode stage does (:func:`lmcore.data.encode.encode_batches`:
    special-token strings are plain text, each document followed by end-of-text) up to
    ``max_tokens`` tokens in whole documents: the tokens, the UTF-8 bytes of exactly the text they
    hold, the documents and whether the only document was cut (its first ``max_tokens`` tokens,
    bytes up to the end of the last one)."""

    eot = special_ids(tok).eot
    parts: list[np.ndarray] = []
    n_tokens = n_bytes = n_docs = 0
    with specials_as_text(tok):
        for batch, docs in encode_batches(tok, texts, ENCODE_BATCH, eot):
            for text, ids in zip(batch, docs):
                n = len(ids)
                if max_tokens is not None and n_tokens + n > max_tokens:
                    if n_docs:
                        return np.concatenate(parts), n_bytes, n_docs, False
                    cut = tok.encode(text)  # with character offsets
                    end = cut.offsets[max_tokens - 1][1]
                    return np.array(cut.ids[:max_tokens], dtype=np.uint32), len(text[:end].encode("utf-8")), 1, True
                parts.append(np.array(ids, dtype=np.uint32))
                n_tokens += n
                n_bytes += len(text.encode("utf-8"))
                n_docs += 1
    return (np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)), n_bytes, n_docs, False


def score_texts(model, tok, texts: Iterator[str], stride: int | None = None, batch_size: int = 16,
                max_tokens: int | None = None, logp: np.ndarray | None = None, desc: str | None = None,
                what: str = "texts") -> Scored:
    """Score documents with a loaded model and tokenizer (see
    :func:`lmcore.eval.evaluate.evaluate_texts`); ``logp``: unigram log-probabilities for the
    baseline."""

    eot = special_ids(tok).eot
    ids, n_bytes, n_docs, cut = encode_documents(tok, texts, max_tokens)
    if not n_docs:
        raise StageError(f"{what}: no text to score (every document is empty)")
    if n_bytes == 0:
        raise StageError(f"{what}: the {len(ids)} tokens scored hold no text (0 bytes)")
    nll = score_stream(model, ids, len(ids), eot, stride, batch_size, desc)
    uni = float("nan") if logp is None else unigram_scored_nll(ids, logp)
    return Scored(nll, len(ids), n_bytes, n_docs, cut, uni)
