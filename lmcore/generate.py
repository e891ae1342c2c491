"""Text generation: a KV cache, batched prompts of different lengths, sampling and streaming.

:func:`stream` is the loop and yields each step's new token per row, :func:`generate` collects
them, :func:`generate_text` goes from prompt strings to texts, :class:`TextStream` turns a growing
completion into the text to print next, and ``lmcore generate`` (:func:`main`) is the command line.

- Prompts of different lengths are left-padded into one batch. A key mask hides the padding from
  attention and each row's RoPE positions start at 0 at its first real token, so a row gets the
  tokens its prompt alone would get (up to the float rounding of a batched matmul).
- With the cache (default), the prompts run through the model in one forward pass (prefill), then
  each step feeds only the new token, which attends to the keys and values cached for the tokens
  before it (:class:`lmcore.model.KVCache`). Without it (``use_cache=False``) every step encodes
  the whole sequence again: the reference path, with the same tokens under greedy decoding (a test
  checks it).
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

import argparse
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmcore.io import StageError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# torch is imported inside the functions: `lmcore <stage>` builds this module's parser and must not
# pay for importing torch
REPLACEMENT = "\ufffd"  # what decoding gives for the bytes of a character not complete yet


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    """Tokens generated per prompt at most."""
    temperature: float = 1.0
    """Divides the logits before sampling; 0: greedy (the most likely token, no randomness)."""
    top_k: int | None = None
    """Sample from the k most likely tokens only (None: all)."""
    top_p: float | None = None
    """Nucleus sampling: the smallest set of most likely tokens with probability at least p
    (None or 1: all)."""
    repetition_penalty: float = 1.0
    """CTRL's penalty on the tokens already in the row's prompt or output (1: none; 1.1 to 1.3 are
    usual)."""
    seed: int | None = None
    """Seed of the sampling generator (None: a fresh random seed)."""
    use_cache: bool = True
    """Keep the keys and values of earlier tokens (:class:`lmcore.model.KVCache`) instead of
    encoding the whole sequence at every step."""

    def __post_init__(self) -> None:
        bad = []
        if self.max_new_tokens < 0:
            bad.append(f"max_new_tokens = {self.max_new_tokens} (must be >= 0)")
        if not self.temperature >= 0:
            bad.append(f"temperature = {self.temperature} (must be >= 0; 0 is greedy)")
        if self.top_k is not None and self.top_k < 1:
            bad.append(f"top_k = {self.top_k} (must be >= 1, or None for all tokens)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            bad.append(f"top_p = {self.top_p} (must be in (0, 1])")
        if not self.repetition_penalty > 0:
            bad.append(f"repetition_penalty = {self.repetition_penalty} (must be > 0; 1 is none)")
        if bad:
            raise ValueError("invalid generation setting(s): " + "; ".join(bad))


# ---------------------------------------------------------------------------------------------
# logits processors (each takes and returns (B, vocab) float logits)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (Keskar et al. 2019): the logits of tokens marked in ``seen``
    (B, vocab) are divided by ``penalty`` when positive, multiplied by it when negative, so that a
    penalty above 1 always makes them less likely."""
    import torch

    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """-inf for every token below the k-th largest logit of its row (ties with it are kept)."""
    import torch

    if k is None or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probabilities sum to at
    least ``p`` (a token is kept when the tokens ranked above it hold less than ``p``; the most
    likely one always is), -inf for the rest."""
    import torch

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
    import torch

    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    logits = top_p_filter(top_k_filter(logits / cfg.temperature, cfg.top_k), cfg.top_p)
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)


# ---------------------------------------------------------------------------------------------
# the loop


def positions_of(real: torch.Tensor) -> torch.Tensor:
    """RoPE positions (B, T) of left-padded rows: 0 at each row's first real token (True in
    ``real``), then one more per real token; padding gets the position of the next real token
    (it is masked out anyway)."""
    return (real.long().cumsum(dim=1) - 1).clamp_(min=0)


def stream(model, prompts: Sequence[Sequence[int]], cfg: GenerationConfig = GenerationConfig(),
           stop_id: int | None = None, pad_id: int = 0) -> Iterator[list[int | None]]:
    """Generate continuations of ``prompts`` (lists of token ids, of any lengths) with ``model``
    (a :class:`lmcore.model.GPT`), one step at a time: each step yields the new token of every row,
    None for rows that have stopped. A row's ``stop_id`` token is yielded once and ends the row.
    ``pad_id`` fills the left of shorter prompts and the rows that stopped (it is masked out, so
    any id will do). The model is put in eval mode while the loop runs, without autograd."""
    import torch

    rows = [[int(t) for t in p] for p in prompts]
    if not rows or cfg.max_new_tokens == 0:
        return
    vocab, block = model.cfg.vocab_size, model.cfg.block_size
    for i, p in enumerate(rows):
        if not p:
            raise ValueError(f"prompt {i} has no tokens (give at least one, e.g. the end-of-text token)")
        if not 0 <= min(p) <= max(p) < vocab:
            raise ValueError(f"prompt {i} holds token ids outside the model's vocabulary 0 .. {vocab - 1}")
    device = next(model.parameters()).device
    B, W = len(rows), max(map(len, rows))
    seq = torch.full((B, W), pad_id, dtype=torch.long)
    real = torch.zeros((B, W), dtype=torch.bool)
    for i, p in enumerate(rows):
        seq[i, W - len(p):] = torch.tensor(p)
        real[i, W - len(p):] = True
    seq, real = seq.to(device), real.to(device)
    seen = None
    if cfg.repetition_penalty != 1.0:  # the tokens of each row so far (padding goes to column `vocab`)
        seen = torch.zeros((B, vocab + 1), dtype=torch.bool, device=device)
        seen.scatter_(1, torch.where(real, seq, vocab), True)
        seen = seen[:, :vocab]
    generator = torch.Generator(device=device)
    if cfg.seed is None:
        generator.seed()
    else:
        generator.manual_seed(cfg.seed)

    from lmcore.model import KVCache

    cache = KVCache(block) if cfg.use_cache else None
    done = torch.zeros(B, dtype=torch.bool, device=device)
    training = model.training
    model.eval()
    try:
        for _ in range(cfg.max_new_tokens):
            with torch.no_grad():  # not across the yield: the caller's code runs with its own grad mode
                if cache is not None and seq.shape[1] <= block:
                    start = cache.length  # the whole prompts first (prefill), then the last token only
                    logits = model.next_token_logits(seq[:, start:], positions=positions_of(real)[:, start:],
                                                     key_mask=real, cache=cache)
                else:  # no cache, or the context is full: encode the last block_size tokens again
                    if cache is not None:
                        log.warning("generate: %d tokens exceed the model's context of %d: from here on each step "
                                    "encodes the last %d tokens again, without the KV cache", seq.shape[1], block,
                                    block)
                        cache = None
                    win = real[:, -block:]
                    logits = model.next_token_logits(seq[:, -block:], positions=positions_of(win), key_mask=win)
                nxt = next_tokens(logits, cfg, seen, generator).masked_fill(done, pad_id)
            live = ~done
            out = [t if alive else None for t, alive in zip(nxt.tolist(), live.tolist())]
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            real = torch.cat([real, live[:, None]], dim=1)
            if seen is not None:
                idx = live.nonzero().squeeze(1)
                seen[idx, nxt[idx]] = True
            if stop_id is not None:
                done = done | (nxt == stop_id)
            yield out
            if bool(done.all()):
                break
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


# ---------------------------------------------------------------------------------------------
# text


def encode_prompts(tok, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt; an empty prompt becomes the end-of-text token alone (what starts
    a document in training)."""
    from lmcore.tokenizer import special_ids

    eot = special_ids(tok).eot
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


def generate_text(model, tok, prompts: Sequence[str], cfg: GenerationConfig = GenerationConfig()) -> list[str]:
    """Each prompt followed by its completion, decoded, from prompt strings; stops at the
    tokenizer's end-of-text token."""
    from lmcore.tokenizer import special_ids

    sp = special_ids(tok)
    ids = encode_prompts(tok, prompts)
    done = generate(model, ids, cfg, stop_id=sp.eot, pad_id=sp.pad)
    return [tok.decode(p + c.tokens, skip_special_tokens=True) for p, c in zip(ids, done)]


# ---------------------------------------------------------------------------------------------
# lmcore generate


def add_parser(sub: Any) -> None:
    """The ``generate`` subcommand of the ``lmcore`` CLI."""
    p = sub.add_parser("generate", help="generate text from a model folder (KV cache, sampling, streaming; not a "
                                        "pipeline stage)",
                       description="Continue prompts with a trained model. Prompts come from --prompt, else from "
                                   "--file, else from standard input: one prompt per line (a .jsonl file: a JSON "
                                   "string or an object with a 'prompt' field per line, for prompts with newlines). "
                                   "Sampling defaults come from the evaluate section of the params file.")
    p.add_argument("--model", help="model folder: runs/pretrain/final (default, under --root) or an exported "
                                   "Hugging Face Llama folder such as runs/export")
    p.add_argument("--tokenizer", help="tokenizer folder or tokenizer.json (default: the model folder when it holds "
                                       "tokenizer.json, else data/tokenizer under --root)")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    p.add_argument("--file", help="a file of prompts, one per line (.jsonl: one JSON string or {'prompt': ...} "
                                  "per line); '-' is standard input")
    p.add_argument("--max-new-tokens", type=int, help="tokens per prompt at most (default: evaluate.max_new_tokens)")
    p.add_argument("--temperature", type=float, help="0 is greedy (default: evaluate.temperature)")
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens; 0: all (default: evaluate.top_k)")
    p.add_argument("--top-p", type=float, help="nucleus sampling, 1: off (default: evaluate.top_p)")
    p.add_argument("--repetition-penalty", type=float, help="1: off (default: evaluate.repetition_penalty)")
    p.add_argument("--seed", type=int, help="sampling seed (default: evaluate.seed)")
    p.add_argument("--no-cache", action="store_true", help="encode the whole sequence at every step (slower; "
                                                            "the reference path)")
    p.add_argument("--no-stream", action="store_true", help="print each text once complete, not token by token")


def read_prompts(path: str | Path | None, stdin=None) -> list[str]:
    """Prompts from a file (one per line; ``.jsonl``: a JSON string or an object with a
    ``prompt`` field per line) or, for None or ``-``, from ``stdin``. Blank lines are skipped."""
    if path is None or str(path) == "-":
        name, lines = "standard input", (stdin or sys.stdin).read().splitlines()
    else:
        p = Path(path)
        if not p.is_file():
            raise StageError(f"--file {p}: not found")
        try:
            name, lines = str(p), p.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise StageError(f"{p}: invalid UTF-8 ({e.reason} at byte {e.start})") from None
    jsonl = path is not None and str(path).endswith((".jsonl", ".ndjson"))
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not jsonl:
            out.append(line)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise StageError(f"{name}: line {n}: not valid JSON ({e.msg})") from None
        text = obj.get("prompt") if isinstance(obj, dict) else obj
        if not isinstance(text, str):
            raise StageError(f"{name}: line {n}: expected a JSON string or an object with a string field 'prompt'")
        out.append(text)
    if not out:
        raise StageError(f"{name}: no prompt (one per line)")
    return out


def settings(args: argparse.Namespace, defaults) -> GenerationConfig:
    """Command-line values over ``defaults`` (an :class:`lmcore.config.EvaluateConfig`)."""
    def pick(name: str, default: Any) -> Any:
        v = getattr(args, name)
        return default if v is None else v

    top_k = pick("top_k", defaults.top_k)
    try:
        return GenerationConfig(max_new_tokens=pick("max_new_tokens", defaults.max_new_tokens),
                                temperature=pick("temperature", defaults.temperature),
                                top_k=None if top_k == 0 else top_k, top_p=pick("top_p", defaults.top_p),
                                repetition_penalty=pick("repetition_penalty", defaults.repetition_penalty),
                                seed=pick("seed", defaults.seed), use_cache=not args.no_cache)
    except ValueError as e:  # name the command-line option (params.yaml's values were checked on loading)
        msg = str(e)
        for f in dataclasses.fields(GenerationConfig):
            msg = msg.replace(f"{f.name} =", f"--{f.name.replace('_', '-')} =")
        raise StageError(msg) from None


def main(args: argparse.Namespace, stdin=None, stdout=None) -> int:
    """Run ``lmcore generate`` from parsed arguments (also reads ``args.params`` and ``args.root``)."""
    from lmcore import config
    from lmcore import tokenizer as tokmod
    from lmcore.config import ConfigError, EvaluateConfig
    from lmcore.evaluate import check_tokenizer, load_lm
    from lmcore.layout import Layout

    out = stdout or sys.stdout
    layout = Layout(Path(args.root))
    try:
        defaults = config.load(args.params).evaluate if Path(args.params).exists() else EvaluateConfig()
        cfg = settings(args, defaults)
        model_dir = Path(args.model) if args.model else layout.pretrained
        if not (model_dir / "config.json").is_file():
            raise StageError(f"{model_dir}: no model folder here (config.json missing); give --model, e.g. "
                             "runs/pretrain/final or runs/export")
        tok_path = Path(args.tokenizer) if args.tokenizer else (
            model_dir if (model_dir / "tokenizer.json").is_file() else layout.tokenizer)
        tok_file = tok_path / "tokenizer.json" if tok_path.is_dir() else tok_path
        prompts = list(args.prompt) if args.prompt else read_prompts(args.file, stdin)
        model, model_cfg = load_lm(model_dir)
        tok = tokmod.load(tok_file)
        check_tokenizer(model, model_cfg, tok, tok_file, model_dir)
        sp = tokmod.special_ids(tok)
        ids = encode_prompts(tok, prompts)
    except (ConfigError, StageError) as e:
        print(f"lmcore generate: error: {e}", file=sys.stderr)
        return 2

    block = model.cfg.block_size
    if max(map(len, ids)) + cfg.max_new_tokens > block:
        log.info("generate: prompt + %d new tokens may exceed the model's context of %d tokens: past it, each step "
                 "encodes the last %d tokens again without the cache", cfg.max_new_tokens, block, block)
    streams = [TextStream(tok, p) for p in ids]
    finished = [False] * len(ids)
    shown = 0  # texts printed so far (in prompt order)
    live = len(ids) == 1 and not args.no_stream

    def show_done() -> None:
        nonlocal shown
        while shown < len(ids) and finished[shown]:
            if len(ids) > 1:
                out.write(("\n" if shown else "") + f"==> {shown + 1}/{len(ids)} <==\n")
            out.write(prompts[shown] + streams[shown].text() + "\n")
            shown += 1
        out.flush()

    if live:
        out.write(prompts[0])
        out.flush()
    n_tokens, t0 = 0, time.perf_counter()
    try:
        for step in stream(model, ids, cfg, stop_id=sp.eot, pad_id=sp.pad):
            for i, t in enumerate(step):
                if t is None:
                    continue
                n_tokens += 1
                if t == sp.eot:
                    finished[i] = True
                    continue
                if live:
                    out.write(streams[i].push(t))
                    out.flush()
                else:
                    streams[i].tokens.append(t)
            if not live and not args.no_stream:
                show_done()
    except KeyboardInterrupt:
        out.write("\n")
        print("lmcore generate: interrupted", file=sys.stderr)
        return 130
    seconds = time.perf_counter() - t0
    if live:
        out.write(streams[0].flush() + "\n")
        out.flush()
    else:
        finished = [True] * len(ids)
        show_done()
    print(f"lmcore generate: {n_tokens} tokens for {len(ids)} prompt(s) in {seconds:.2f} s "
          f"({n_tokens / max(seconds, 1e-9):.1f} tokens/s, KV cache {'on' if cfg.use_cache else 'off'}, "
          f"seed {cfg.seed})", file=sys.stderr)
    return 0
