"""Stage ``tokenizer``: train a byte-level BPE tokenizer with HF ``tokenizers``.

Byte-level BPE maps any UTF-8 string to tokens and back exactly. The special tokens come from
``params.yaml``: the first ends a document, the second pads, the third joins sentence pairs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lmcore.config import TokenizerConfig, TrackingConfig, flatten
from lmcore.io import StageError, atomic_path, iter_field, require, sha256_file, split_shards, write_json


def build_trainer(cfg: TokenizerConfig):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(cfg.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    return tok, trainer


def load(path: str | Path):
    """Load a saved ``tokenizer.json``."""
    from tokenizers import Tokenizer

    path = require(Path(path) / "tokenizer.json" if Path(path).is_dir() else path, "tokenizer")
    return Tokenizer.from_file(str(path))


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    eot: int
    pad: int
    sep: int


def special_ids(tok) -> SpecialIds:
    """Ids of the end-of-text, padding and separator tokens: the first three special tokens,
    which the trainer placed first in the vocabulary in the order of ``params.yaml``."""
    added = tok.get_added_tokens_decoder()
    ids = sorted(i for i, t in added.items() if t.special)
    if len(ids) < 3:
        raise StageError(f"tokenizer has {len(ids)} special tokens; it needs end of text, padding, separator")
    return SpecialIds(*ids[:3])


@dataclasses.dataclass
class TokenizerResult:
    path: Path
    vocab_size: int
    sha256: str
    bytes_per_token: float


def train_tokenizer(cfg: TokenizerConfig, clean_dir: Path, out: Path, metrics: Path,
                    tracking: TrackingConfig = TrackingConfig()) -> TokenizerResult:
    """Train on the shards of ``clean_dir/train/``; save ``out/tokenizer.json``; report bytes per token
    on the validation split."""
    from lmcore.tracking import stage_run

    clean_dir = Path(clean_dir)
    train = split_shards(clean_dir, "train")
    valid = split_shards(clean_dir, "validation")
    with stage_run("tokenizer", tracking, flatten(cfg, "tokenizer.")) as tr:
        tok, trainer = build_trainer(cfg)
        tok.train_from_iterator(iter_field(train), trainer=trainer)
        texts = list(iter_field(valid))
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        n_tokens = sum(len(e.ids) for e in tok.encode_batch(texts))
        n_words = sum(len(t.split()) for t in texts)
        with atomic_path(Path(out)) as tmp:
            tmp.mkdir()
            tok.save(str(tmp / "tokenizer.json"))
        path = Path(out) / "tokenizer.json"
        result = TokenizerResult(path, tok.get_vocab_size(), sha256_file(path), n_bytes / max(n_tokens, 1))
        m = {"vocab_size": result.vocab_size, "validation_bytes_per_token": result.bytes_per_token,
             "validation_tokens_per_word": n_tokens / max(n_words, 1)}
        write_json(metrics, m)
        tr.metrics(m)
        tr.artifact(path, "tokenizer")
        return result
