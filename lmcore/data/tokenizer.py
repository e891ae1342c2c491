"""Stage ``tokenizer``: train a byte-level BPE or a Unigram tokenizer with HF ``tokenizers``.

The tokenizer is trained from a stream of the clean training split (``data/clean/train/*.jsonl``)
and saved as ``tokenizer.json`` (loads in ``tokenizers.Tokenizer.from_file``) plus
``tokenizer_config.json`` and ``special_tokens_map.json``, so that
``transformers.PreTrainedTokenizerFast.from_pretrained(folder)`` (and ``AutoTokenizer``) gets the
end-of-text (``eos``), padding (``pad``) and separator (``sep``) tokens. The special tokens come
from ``params.yaml`` and get ids 0, 1, 2, ... in that order: the first ends a document, the second
pads, the third joins sentence pairs (:func:`special_ids`).

Models (``tokenizer.kind``) and what ``decode(encode(text))`` gives back:

- ``byte_bpe`` (default): byte-level BPE. Text is split into words (GPT-2 regex) whose UTF-8
  bytes are merged into tokens; all 256 bytes are in the vocabulary, so there is no unknown token.
  With ``normalizer: none`` every string (any UTF-8: CJK, emoji, control characters, ``\\x00``)
  round-trips exactly: ``tok.decode(tok.encode(t).ids, skip_special_tokens=False) == t`` (a
  property test checks it). With ``nfc``/``nfkc`` the result is the normalised text.
- ``unigram``: a Unigram language model over characters (SentencePiece's algorithm), with
  byte fallback: the 256 tokens ``<0x00>``..``<0xFF>`` are added to the vocabulary, so a character
  never seen in training is encoded as its UTF-8 bytes and decodes back exactly (no ``<unk>`` in
  practice). The ``metaspace`` pre-tokenizer replaces every space by ``▁`` (U+2581), prepends one
  ``▁`` to the text and splits before each ``▁``; decoding turns every ``▁`` back into a space and
  removes the one it prepended. So it round-trips exactly except that (1) a literal ``▁`` in the
  text comes back as a space, and (2) a text that starts with a space loses that first space.
  Tabs, newlines and runs of spaces are kept. Every ``<`` is a pre-token of its own, so no text
  can spell a byte token (``<0x41>`` as written stays that text). ``whitespace_digits`` does the
  same and also puts every digit in a token of its own.

Special-token strings inside a text (``"<|endoftext|>"``) are matched as the special token by
``encode``; the ``encode`` stage turns that off, so a document cannot inject an end-of-text token.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from tqdm import tqdm

from lmcore.config import TokenizerConfig, TrackingConfig, flatten
from lmcore.core.errors import StageError
from lmcore.core.io import atomic_path, iter_field, read_jsonl, require, sha256_file, split_shards, write_json
from lmcore.tracking import stage_run

log = logging.getLogger(__name__)
T = TypeVar("T")

METASPACE = "\u2581"
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
TRAIN_BATCH = 1000  # documents handed to the trainer per call (fewer Python -> Rust crossings)
BATCH_CHARS = 1 << 20  # characters encoded per call at most: bounds the memory of the encodings


def _normalizer(name: str):

    return {"none": None, "nfc": normalizers.NFC(), "nfkc": normalizers.NFKC()}[name]


def build_trainer(cfg: TokenizerConfig):
    """An untrained ``tokenizers.Tokenizer`` set up as ``cfg`` says, and its trainer."""

    digits = pre_tokenizers.Digits(individual_digits=True)
    if cfg.kind == "byte_bpe":
        tok = Tokenizer(models.BPE())
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.pre_tokenizer = byte_level if cfg.pre_tokenizer == "byte_level" else \
            pre_tokenizers.Sequence([digits, byte_level])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=cfg.vocab_size,
            min_frequency=cfg.min_frequency,
            special_tokens=list(cfg.special_tokens),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    elif cfg.kind == "unigram":
        tok = Tokenizer(models.Unigram())
        meta = pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True)
        # "<" stands alone, so no piece of text can spell a byte token ("<0x41>" would decode to "A")
        lt = pre_tokenizers.Split("<", behavior="isolated")
        tok.pre_tokenizer = pre_tokenizers.Sequence([meta, lt] if cfg.pre_tokenizer == "metaspace" else [meta, digits, lt])
        tok.decoder = decoders.Sequence([
            decoders.ByteFallback(),
            decoders.Metaspace(replacement=METASPACE, prepend_scheme="always", split=True),
        ])
        trainer = trainers.UnigramTrainer(
            vocab_size=cfg.vocab_size - len(BYTE_TOKENS),  # the byte tokens are added after training
            special_tokens=[*cfg.special_tokens, cfg.unk_token],
            unk_token=cfg.unk_token,
            show_progress=False,
        )
    else:  # pragma: no cover - the config's Literal rules it out
        raise StageError(f"tokenizer.kind = {cfg.kind!r} is not supported")
    norm = _normalizer(cfg.normalizer)
    if norm is not None:
        tok.normalizer = norm
    return tok, trainer


def _add_byte_fallback(tok):
    """The trained Unigram ``tok`` with the 256 byte tokens appended (scored below every piece)
    and byte fallback on. The trained scores are rounded to 1e-9 and equal scores ordered by piece:
    the trainer's last digits (1e-14) and its order of ties differ from run to run, which made the
    same corpus give another ``tokenizer.json`` (and other ids) every time."""

    data = json.loads(tok.to_str())
    model = data["model"]
    specials = {t["content"] for t in data.get("added_tokens", [])}
    n = next((i for i, (piece, _) in enumerate(model["vocab"]) if piece not in specials), len(model["vocab"]))
    pieces = sorted(([piece, round(score, 9)] for piece, score in model["vocab"][n:]), key=lambda e: (-e[1], e[0]))
    # the trainer ends with the characters it must keep, in a hash order, scored one 1e-4 step
    # apart (the last steps meeting the rarest characters' score): from the first of those steps
    # on, the same scores go to the same characters in code point order
    def step(i: int) -> bool:
        return len(pieces[i][0]) == len(pieces[i + 1][0]) == 1 and abs(pieces[i][1] - pieces[i + 1][1] - 1e-4) < 1e-7

    start = next((i for i in range(len(pieces) - 2) if step(i) and step(i + 1)), None)
    if start is not None and all(len(piece) == 1 for piece, _ in pieces[start:]):
        chars = sorted(piece for piece, _ in pieces[start:])
        pieces[start:] = [[c, score] for c, (_, score) in zip(chars, pieces[start:])]
    vocab = model["vocab"] = model["vocab"][:n] + pieces  # the special tokens keep their ids
    have = {piece for piece, _ in vocab}
    floor = min(score for _, score in vocab) - 10.0
    vocab.extend([b, floor] for b in BYTE_TOKENS if b not in have)
    model["byte_fallback"] = True
    return Tokenizer.from_str(json.dumps(data))


def batched(items: Iterable[T], n: int, max_chars: int | None = None,
            text: Callable[[T], str] = lambda t: t) -> Iterator[list[T]]:
    """Lists of ``n`` items (texts, or records whose ``text(item)`` is one), or fewer once their
    texts hold ``max_chars`` characters."""
    batch: list[T] = []
    chars = 0
    for item in items:
        batch.append(item)
        chars += len(text(item))
        if len(batch) >= n or (max_chars is not None and chars >= max_chars):
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def train(cfg: TokenizerConfig, texts: Iterable[str]):
    """Train a tokenizer on a stream of texts; return the ``tokenizers.Tokenizer``."""
    tok, trainer = build_trainer(cfg)
    try:
        tok.train_from_iterator(batched(texts, TRAIN_BATCH), trainer=trainer)
    except Exception as e:  # the tokenizers library raises a bare Exception
        if "not large enough to contain all chars" not in str(e):
            raise
        raise StageError(f"tokenizer.vocab_size = {cfg.vocab_size}: too small for kind 'unigram' on this corpus: "
                         f"its trainer needs a piece for every distinct character of the text, beside the "
                         f"{len(BYTE_TOKENS)} byte tokens and {len(cfg.special_tokens) + 1} special tokens; raise "
                         "it (a corpus of many scripts needs thousands) or use kind 'byte_bpe'") from e
    if cfg.kind == "unigram":
        tok = _add_byte_fallback(tok)
    return tok


def load(path: str | Path):
    """Load a saved ``tokenizer.json`` (or the folder holding it)."""

    path = require(Path(path) / "tokenizer.json" if Path(path).is_dir() else path, "tokenizer")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on a malformed file
        raise StageError(f"{path}: not a valid tokenizer.json ({e})") from None


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    eot: int
    pad: int
    sep: int


def special_ids(tok, model_cfg: dict[str, Any] | None = None) -> SpecialIds:
    """Ids of the end-of-text, padding and separator tokens: the first three special tokens,
    which the trainer placed first in the vocabulary in the order of ``params.yaml``. With
    ``model_cfg`` (a Hugging Face model folder's ``config.json``), the folder's own
    ``eos_token_id`` (the first of a list) and ``pad_token_id`` (else the end of text) instead:
    a Llama tokenizer not trained by lmcore lists ``<unk>``, ``<s>``, ``</s>`` first, and
    generation stopped at ``<unk>`` and never at ``</s>``."""
    def token_id(v: Any) -> int | None:  # some conversions write -1 or null for "none"
        return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None

    eos = (model_cfg or {}).get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    if "model" not in (model_cfg or {}) and token_id(eos) is not None:
        pad = token_id(model_cfg.get("pad_token_id"))
        return SpecialIds(eos, eos if pad is None else pad, eos)
    added = tok.get_added_tokens_decoder()
    ids = sorted(i for i, t in added.items() if t.special)
    if len(ids) < 3:
        raise StageError(f"tokenizer has {len(ids)} special tokens; it needs end of text, padding, separator")
    return SpecialIds(*ids[:3])


def hf_config(cfg: TokenizerConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """``tokenizer_config.json`` and ``special_tokens_map.json`` for ``transformers``."""
    eos, pad, sep, *extra = cfg.special_tokens
    special: dict[str, Any] = {"eos_token": eos, "pad_token": pad, "sep_token": sep}
    if cfg.kind == "unigram":
        special["unk_token"] = cfg.unk_token
    if extra:
        special["additional_special_tokens"] = list(extra)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "clean_up_tokenization_spaces": False,  # decode must not touch spaces before punctuation
        "model_input_names": ["input_ids", "attention_mask"],
        "lmcore": {"kind": cfg.kind, "normalizer": cfg.normalizer, "pre_tokenizer": cfg.pre_tokenizer},
    }
    return config, special


def save(tok, cfg: TokenizerConfig, folder: Path) -> Path:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    config, special = hf_config(cfg)
    for name, obj in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        (folder / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return folder / "tokenizer.json"


@contextlib.contextmanager
def specials_as_text(tok) -> Iterator[Any]:
    """``tok`` encoding special-token strings (``"<|endoftext|>"``) inside a document as plain text,
    for the duration of the ``with`` block: the only end-of-text tokens are the ones that
    :func:`encode_batches` puts after each document."""
    saved = tok.encode_special_tokens
    tok.encode_special_tokens = True
    try:
        yield tok
    finally:
        tok.encode_special_tokens = saved


def validation_stats(tok, docs: Iterable[tuple[str, str | None]], batch_size: int = TRAIN_BATCH
                     ) -> dict[str | None, dict[str, int]]:
    """UTF-8 bytes, characters, tokens and whitespace-separated words of ``(text, language)``
    pairs, encoded in batches: per language (the clean stage's ``language`` of each document;
    None where it has none) and over all of them (key ``"all"``)."""
    out: dict[str | None, dict[str, int]] = {}
    for batch in batched(docs, batch_size, max_chars=BATCH_CHARS, text=lambda d: d[0]):
        with specials_as_text(tok):  # counted as encode counts them: "<|endoftext|>" in a document is text
            encodings = tok.encode_batch_fast([t for t, _ in batch])
        for (text, lang), enc in zip(batch, encodings, strict=True):
            for key in ("all", lang):
                s = out.setdefault(key, {"documents": 0, "bytes": 0, "chars": 0, "tokens": 0, "words": 0})
                s["documents"] += 1
                s["bytes"] += len(text.encode("utf-8"))
                s["chars"] += len(text)
                s["words"] += len(text.split())
                s["tokens"] += len(enc)
    out.setdefault("all", {"documents": 0, "bytes": 0, "chars": 0, "tokens": 0, "words": 0})
    return out


def language_metrics(stats: dict[str | None, dict[str, int]]) -> dict[str, float]:
    """``validation.<language>.bytes_per_token`` and ``.tokens_per_char`` for every language of
    the validation split (what the vocabulary does to each language)."""
    m: dict[str, float] = {}
    for lang, s in sorted(stats.items(), key=lambda kv: str(kv[0])):
        if lang is None or lang == "all":
            continue
        m[f"validation.{lang}.bytes_per_token"] = s["bytes"] / max(s["tokens"], 1)
        m[f"validation.{lang}.tokens_per_char"] = s["tokens"] / max(s["chars"], 1)
        m[f"validation.{lang}.documents"] = s["documents"]
    return m


@dataclasses.dataclass
class TokenizerResult:
    path: Path
    vocab_size: int
    sha256: str
    bytes_per_token: float
    train_seconds: float = float("nan")
    """Wall time of reading the training split and training (not the validation metrics)."""


def train_tokenizer(cfg: TokenizerConfig, clean_dir: Path, out: Path, metrics: Path,
                    tracking: TrackingConfig = TrackingConfig()) -> TokenizerResult:
    """Train on the shards of ``clean_dir/train/``; save ``out/tokenizer.json`` (and the
    ``transformers`` configs beside it); report bytes per token on the validation split."""


    clean_dir = Path(clean_dir)
    train_shards = split_shards(clean_dir, "train")
    valid = split_shards(clean_dir, "validation")
    with stage_run("tokenizer", tracking, flatten(cfg, "tokenizer."), inputs=[clean_dir],
                   outputs=[out]) as tr:
        counted = {"docs": 0, "chars": 0}

        def stream() -> Iterator[str]:
            for text in tqdm(iter_field(train_shards), desc="tokenizer: train", unit="doc", mininterval=2):
                counted["docs"] += 1
                counted["chars"] += len(text)
                yield text

        t0 = time.perf_counter()
        tok = train(cfg, stream())
        seconds = time.perf_counter() - t0
        if counted["docs"] == 0:
            raise StageError(f"{clean_dir / 'train'}: no documents to train the tokenizer on")
        docs = ((d["text"], d.get("language")) for p in valid for d in read_jsonl(p))
        per_language = validation_stats(tok, tqdm(docs, desc="tokenizer: validation", unit="doc", mininterval=2))
        stats = per_language["all"]
        with atomic_path(Path(out)) as tmp:
            save(tok, cfg, tmp)
        path = Path(out) / "tokenizer.json"
        result = TokenizerResult(path, tok.get_vocab_size(), sha256_file(path),
                                 stats["bytes"] / max(stats["tokens"], 1), seconds)
        m = {"vocab_size": result.vocab_size, "validation_bytes_per_token": result.bytes_per_token,
             "validation_tokens_per_word": stats["tokens"] / max(stats["words"], 1),
             "validation_tokens_per_char": stats["tokens"] / max(stats["chars"], 1), **language_metrics(per_language)}
        write_json(metrics, m)
        tr.metrics({**m, "train_seconds": seconds, "train_chars_per_second": counted["chars"] / max(seconds, 1e-9)})
        log.info("tokenizer: trained %s on %d documents (%.1f M characters) in %.1f s (%.2f M chars/s); "
                 "vocabulary %d, %.3f bytes/token on validation", cfg.kind, counted["docs"], counted["chars"] / 1e6,
                 seconds, counted["chars"] / 1e6 / max(seconds, 1e-9), result.vocab_size, result.bytes_per_token)
        tr.artifact(Path(out), "tokenizer")
        return result
