"""Text generation: a KV cache, batched prompts of different lengths, sampling and streaming.

:func:`stream` is the loop and yields each step's new token per row, :func:`generate` collects
them, :func:`generate_text` goes from prompt strings to texts, :class:`TextStream` turns a growing
completion into the text to print next, and :func:`generate_ids` is the nanoGPT-style tensor
interface. The command line is ``lmcore.cli.generate``.

- Prompts of different lengths are left-padded into one batch. A key mask hides the padding from
  attention and each row's RoPE positions start at 0 at its first real token, so a row gets the
  tokens its prompt alone would get (up to the float rounding of a batched matmul).
- With the cache (default), the prompts run through the model in one forward pass (prefill), then
  each step feeds only the new token, which attends to the keys and values cached for the tokens
  before it (:class:`lmcore.model.decoder.KVCache`). Without it (``use_cache=False``) every step encodes
  the whole sequence again: the reference path, with the same tokens under greedy decoding (a test
  checks it).
- ``compile=True`` runs each step after the prefill through
  :meth:`lmcore.model.decoder.Decoder.decode_step` compiled by ``torch.compile``: the new token
  attends to every position of the preallocated cache under a key mask, so no shape grows and the
  step is captured once per batch size (on CUDA as a CUDA graph, replayed per token). On a CPU it
  removes most of the per-token Python and operator overhead that bounds batch-1 decoding of a
  small model (``benchmarks/generate_vs_hf.py --compile``); the compilation costs seconds to a
  minute once per process, model and batch size.
- Past the model's context (``block_size``) the cache cannot grow: generation then falls back to
  encoding the last ``block_size`` tokens again at every step, without the cache (a sliding
  window, logged once), which is what ``use_cache=False`` does there too.
- Sampling, in this order (Hugging Face's): repetition penalty (CTRL: the logits of the tokens
  already in that row's prompt or output are divided by the penalty when positive and multiplied
  by it when negative), temperature (0: greedy, the argmax), top-k, top-p (the smallest set of the
  most likely tokens whose probabilities sum to at least p, never empty), then one draw per row
  from a ``torch.Generator`` seeded for the call: the same seed and inputs give the same tokens.
- A row stops at the end-of-text token (``stop_id``; not part of the completion) or after
  ``max_new_tokens``; a finished row is fed padding and no longer counted, and the loop ends when
  every row has stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pydantic
import torch

from lmcore.config import Sampling
from lmcore.core.machine import require_cxx_compiler
from lmcore.data.tokenizer import special_ids
from lmcore.model.decoder import KVCache

log = logging.getLogger(__name__)

REPLACEMENT = "\ufffd"  # what decoding gives for the bytes of a character not complete yet


class GenerationConfig(Sampling):
    """How to generate: the sampling fields of :class:`lmcore.config.Sampling` (their defaults,
    checks and documentation: plain sampling at temperature 1, no seed) and ``use_cache``. Frozen;
    a bad value raises ``ValueError`` naming the field."""

    use_cache: bool = True
    """Keep the keys and values of earlier tokens (:class:`lmcore.model.decoder.KVCache`) instead of
    encoding the whole sequence at every step."""
    compile: bool = False
    """With the cache: decode through :meth:`lmcore.model.decoder.Decoder.decode_step` compiled by
    ``torch.compile`` (:func:`compiled_decode_step`; on CUDA as a CUDA graph). The first call for
    a model and batch size compiles (seconds to a minute); later tokens and calls run faster."""

    @pydantic.model_validator(mode="after")
    def _compile_needs_the_cache(self) -> GenerationConfig:
        if self.compile and not self.use_cache:
            raise ValueError("compile = True needs use_cache = True: the compiled step is the cached decode step")
        return self


# ---------------------------------------------------------------------------------------------
# logits processors (each takes and returns (B, vocab) float logits)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (Keskar et al. 2019): the logits of tokens marked in ``seen``
    (B, vocab) are divided by ``penalty`` when positive, multiplied by it when negative, so that a
    penalty above 1 always makes them less likely."""

    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """-inf for every token below the k-th largest logit of its row (ties with it are kept)."""

    if k is None or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probabilities sum to at
    least ``p`` (a token is kept when the tokens ranked above it hold less than ``p``; the most
    likely one always is), -inf for the rest."""

    if p is None or p >= 1.0:
        return logits
    ranked, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(ranked, dim=-1)
    above = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
    drop_ranked = above >= p
    drop_ranked[:, 0] = False
    drop = torch.zeros_like(drop_ranked).scatter(-1, order, drop_ranked)
    return logits.masked_fill(drop, float("-inf"))


def next_tokens(logits: torch.Tensor, cfg: GenerationConfig, seen: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row (B,) from float logits (B, vocab): repetition penalty, then the argmax
    (temperature 0), or temperature, top-k, top-p and a draw from ``generator``."""

    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    # less the row's maximum first: a tiny temperature then sends the others to -inf, not the
    # maximum to +inf (inf - inf in the softmax would be NaN)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / cfg.temperature
    logits = top_p_filter(top_k_filter(logits, cfg.top_k), cfg.top_p)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)


# ---------------------------------------------------------------------------------------------
# the loop


def positions_of(real: torch.Tensor) -> torch.Tensor:
    """RoPE positions (B, T) of left-padded rows: 0 at each row's first real token (True in
    ``real``), then one more per real token; padding gets the position of the next real token
    (it is masked out anyway)."""
    return (real.long().cumsum(dim=1) - 1).clamp_(min=0)


_COMPILED: dict[tuple[type, str], Callable[..., torch.Tensor]] = {}


def compiled_decode_step(model) -> Callable[..., torch.Tensor]:
    """``model.decode_step`` compiled by ``torch.compile``: static shapes (one graph per model
    shape and batch size), mode ``reduce-overhead`` on CUDA (the step replayed as a CUDA graph).
    The class's function is compiled, once per process and mode, and the model passed to it: the
    parameters are inputs of the graph, so later generations and other models of the same shape
    reuse it, and nothing here holds on to a model or lives in its attributes (which a copy or a
    pickle of the model would carry). On a CPU without a working C++ compiler it raises
    :class:`lmcore.core.errors.StageError` (see :func:`lmcore.core.machine.require_cxx_compiler`)."""
    device = next(model.parameters()).device
    require_cxx_compiler("compiling the decode step (lmcore generate --compile, GenerationConfig.compile)", device)
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    key = (type(model), mode)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(type(model).decode_step, dynamic=False, mode=mode)
    return functools.partial(_COMPILED[key], model)


def cache_length(tokens: int, block: int) -> int:
    """Positions of the KV cache for a generation of ``tokens`` (prompt and new tokens): the power
    of two that holds them, at least 64 and at most the context ``block``. Not the context
    itself: a Llama folder's context of 131,072 made a cache of gigabytes for a short reply.
    Rounded up, so that the compiled decode step (whose shapes include the cache's length) is
    captured for a few lengths only."""
    return min(block, max(64, 1 << max(tokens - 1, 1).bit_length()))


def stream(model, prompts: Sequence[Sequence[int]], cfg: GenerationConfig = GenerationConfig(),
           stop_id: int | None = None, pad_id: int = 0) -> Iterator[list[int | None]]:
    """Generate continuations of ``prompts`` (lists of token ids, of any lengths) with ``model``
    (a :class:`lmcore.model.decoder.Decoder`), one step at a time: each step yields the new token of every row,
    None for rows that have stopped. A row's ``stop_id`` token is yielded once and ends the row.
    ``pad_id`` fills the left of shorter prompts and the rows that stopped (it is masked out, so
    any id will do). The model is put in eval mode while the loop runs, without autograd."""

    rows = [[int(t) for t in p] for p in prompts]
    if not rows or cfg.max_new_tokens == 0:
        return
    vocab, block = model.cfg.vocab_size, model.cfg.block_size
    for i, p in enumerate(rows):
        if not p:
            raise ValueError(f"prompt {i} has no tokens (give at least one, e.g. the end-of-text token)")
        if not 0 <= min(p) <= max(p) < vocab:
            raise ValueError(f"prompt {i} holds token ids outside the model's vocabulary 0 .. {vocab - 1}")
    if not 0 <= pad_id < vocab:  # it goes through the embedding (masked out after)
        raise ValueError(f"pad_id {pad_id} is outside the model's vocabulary 0 .. {vocab - 1}")
    device = next(model.parameters()).device
    B, W = len(rows), max(map(len, rows))
    # the tokens and their realness in buffers, not copied per token (seq and real below are views
    # of the filled columns); room for the context's worth of new tokens at first, doubled when a
    # long generation fills it (allocated up front, a max_new_tokens of 10^11 asked for 800 GB)
    width = W + min(cfg.max_new_tokens, max(block, 64))
    tokens = torch.full((B, width), pad_id, dtype=torch.long)
    reals = torch.zeros((B, width), dtype=torch.bool)
    for i, p in enumerate(rows):
        tokens[i, W - len(p):W] = torch.tensor(p)
        reals[i, W - len(p):W] = True
    tokens, reals = tokens.to(device), reals.to(device)
    filled = W
    padded = min(map(len, rows)) < W  # a key mask is needed once any row has padding (or has stopped)
    seen = None
    if cfg.repetition_penalty != 1.0:  # the tokens of each row so far (padding goes to column `vocab`)
        seen = torch.zeros((B, vocab + 1), dtype=torch.bool, device=device)
        seen.scatter_(1, torch.where(reals[:, :W], tokens[:, :W], vocab), True)
        seen = seen[:, :vocab]
    generator = torch.Generator(device=device)
    if cfg.seed is None:
        generator.seed()
    else:
        generator.manual_seed(cfg.seed)

    cache = KVCache(cache_length(W + cfg.max_new_tokens, block)) if cfg.use_cache else None
    step = compiled_decode_step(model) if cache is not None and cfg.compile else None
    key_mask = at = None  # the compiled step's (B, block) keys to attend to and write position
    live = torch.ones(B, dtype=torch.bool, device=device)  # the rows still generating,
    alive = [True] * B  # and the same on the host
    next_pos = None  # with the cache: each row's position for its next token, (B, 1)
    training = model.training
    model.eval()
    try:
        for _ in range(cfg.max_new_tokens):
            seq, real = tokens[:, :filled], reals[:, :filled]
            # inference mode, not only no_grad: no version counters or view tracking for the ~100
            # small operators of a step (+12 % tokens/s at batch 1, Zen 2); not across the yield:
            # the caller's code runs in its own mode
            with torch.inference_mode():
                if cache is not None and filled <= cache.max_len:
                    start = cache.length  # the whole prompts first (prefill), then the last token only
                    if start == 0:
                        positions = positions_of(real)
                        next_pos = positions[:, -1:] + 1
                    else:
                        positions, next_pos = next_pos, next_pos + 1
                    if start == 0 or step is None:
                        logits = model.next_token_logits(seq[:, start:], positions=positions,
                                                         key_mask=real if padded else None, cache=cache)
                    else:  # every cached position is attended to, masked: shapes that do not grow
                        if key_mask is None:
                            key_mask = torch.zeros((B, cache.max_len), dtype=torch.bool, device=device)
                            key_mask[:, :start] = real[:, :start]
                            at = torch.zeros(1, dtype=torch.long, device=device)
                        else:  # the previous token: visible to later ones if real
                            key_mask[:, start - 1] = real[:, start - 1]
                        key_mask[:, start] = True  # a token always sees its own key
                        at.fill_(start)
                        cache.at = at
                        try:
                            # the last token as (B, 1) of its own, not a view of `tokens`, whose
                            # stride (the buffer's width) would make every max_new_tokens a new graph
                            logits = step(nxt.view(B, 1), positions, key_mask, cache)
                        finally:
                            cache.at = None
                        cache.length += 1
                else:  # no cache, or the context is full: encode the last block_size tokens again
                    if cache is not None:
                        log.warning("generate: %d tokens exceed the model's context of %d: from here on each step "
                                    "encodes the last %d tokens again, without the KV cache", filled, block,
                                    block)
                        cache = None
                    win = real[:, -block:]
                    logits = model.next_token_logits(seq[:, -block:], positions=positions_of(win), key_mask=win)
                nxt = next_tokens(logits, cfg, seen, generator)
                if padded:
                    nxt = nxt.masked_fill(~live, pad_id)
            out = [t if a else None for t, a in zip(nxt.tolist(), alive)]
            if filled == tokens.shape[1]:
                tokens = torch.cat([tokens, torch.full_like(tokens, pad_id)], dim=1)
                reals = torch.cat([reals, torch.zeros_like(reals)], dim=1)
            tokens[:, filled] = nxt
            reals[:, filled] = live
            filled += 1
            if seen is not None:
                idx = live.nonzero().squeeze(1)
                seen[idx, nxt[idx]] = True
            if stop_id is not None and stop_id in out:  # rows stop (checked on the host: no extra sync)
                alive = [a and t != stop_id for t, a in zip(out, alive)]
                if not any(alive):
                    yield out
                    break
                live = torch.tensor(alive, device=device)
                padded = True  # a stopped row's next tokens are masked out
            yield out
    finally:
        model.train(training)


@dataclasses.dataclass
class Completion:
    tokens: list[int]
    """The generated tokens, without the stop token."""
    stopped: bool
    """Ended at the stop token (else after ``max_new_tokens``)."""


def generate(model, prompts: Sequence[Sequence[int]], cfg: GenerationConfig = GenerationConfig(),
             stop_id: int | None = None, pad_id: int = 0,
             on_step: Callable[[list[int | None]], Any] | None = None) -> list[Completion]:
    """The completions of ``prompts`` (see :func:`stream`); ``on_step`` sees every step's tokens."""
    out: list[list[int]] = [[] for _ in prompts]
    stopped = [False] * len(out)
    for step in stream(model, prompts, cfg, stop_id, pad_id):
        for i, t in enumerate(step):
            if t is None:
                continue
            if stop_id is not None and t == stop_id:
                stopped[i] = True
            else:
                out[i].append(t)
        if on_step is not None:
            on_step(step)
    return [Completion(t, s) for t, s in zip(out, stopped)]


@torch.no_grad()
def generate_ids(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 eot_id: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """``idx`` (B, T) followed by up to ``max_new_tokens`` sampled tokens (greedy when
    ``temperature`` is 0), until every row has produced ``eot_id`` (kept; rows that stopped
    earlier are padded with it): nanoGPT's ``model.generate`` as a function. ``generator`` draws
    the sampling seed. :func:`generate` has top-p, the repetition penalty and prompts of
    different lengths."""
    if idx.dim() != 2:
        raise ValueError(f"idx must be (batch, tokens), not of shape {tuple(idx.shape)}")
    if idx.shape[0] == 0 or max_new_tokens == 0:
        return idx
    seed = None if generator is None else int(torch.randint(2**32, (1,), generator=generator, device=generator.device))  # a Seed
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
    done = generate(model, idx.tolist(), cfg, stop_id=eot_id)
    rows = [c.tokens + ([eot_id] if c.stopped else []) for c in done]
    width = max(map(len, rows))
    pad = eot_id if eot_id is not None else 0
    new = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=idx.dtype).reshape(len(rows), width)
    return torch.cat([idx, new.to(idx.device)], dim=1)


# ---------------------------------------------------------------------------------------------
# text


def encode_prompts(tok, prompts: Sequence[str], eot: int | None = None) -> list[list[int]]:
    """Token ids of each prompt; an empty prompt becomes the end-of-text token alone (what starts
    a document in training; ``eot``: the model folder's, default the tokenizer's)."""

    eot = special_ids(tok).eot if eot is None else eot
    return [e.ids or [eot] for e in tok.encode_batch(list(prompts))] if prompts else []


class TextStream:
    """The text of a growing completion, given one token at a time, cut into what to print next.

    The whole prompt + completion is decoded at every token and the part after the decoded prompt
    is the completion's text (so a Unigram tokenizer's leading space and characters whose bytes span
    tokens come out right); a trailing incomplete character (decoded as U+FFFD) is held back until
    its last byte arrives. The pieces printed add up to :meth:`text` at the end."""

    def __init__(self, tok, prompt_ids: Sequence[int]) -> None:
        self.tok = tok
        self.prompt = list(prompt_ids)
        self.base = self._decode(self.prompt)
        self.tokens: list[int] = []
        self.printed = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def text(self) -> str:
        """The completion's text so far."""
        full = self._decode(self.prompt + self.tokens)
        return full[len(self.base):] if full.startswith(self.base) else self._decode(self.tokens)

    def push(self, token: int) -> str:
        """Add a token; return the new text ready to print (may be empty)."""
        self.tokens.append(int(token))
        return self._advance(self.text().rstrip(REPLACEMENT))

    def flush(self) -> str:
        """The rest of the text, incomplete characters included (at the end of the completion)."""
        return self._advance(self.text())

    def _advance(self, text: str) -> str:
        if not text.startswith(self.printed):  # decoding changed text already printed: cannot unprint it
            return ""
        new, self.printed = text[len(self.printed):], text
        return new


def generate_text(model, tok, prompts: Sequence[str], cfg: GenerationConfig = GenerationConfig(),
                  model_cfg: dict[str, Any] | None = None) -> list[str]:
    """Each prompt followed by its completion, decoded, from prompt strings; stops at the
    tokenizer's end-of-text token, or at a Hugging Face folder's own with ``model_cfg`` (its
    ``config.json``, as :func:`lmcore.model.folder.load_lm` returns it)."""

    sp = special_ids(tok, model_cfg)
    ids = encode_prompts(tok, prompts, sp.eot)
    done = generate(model, ids, cfg, stop_id=sp.eot, pad_id=sp.pad)
    return [tok.decode(p + c.tokens, skip_special_tokens=True) for p, c in zip(ids, done)]
