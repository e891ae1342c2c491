"""Model folders: ``model.safetensors`` plus ``config.json``, written atomically.

Weights are never pickled: safetensors holds them, JSON holds the shape.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_model as st_load
from safetensors.torch import save_model as st_save

from lmcore.core.errors import StageError
from lmcore.core.io import atomic_path, require, sha256_file
from lmcore.model.decoder import Decoder, DecoderConfig
from lmcore.model.llama import load_llama


def save_model(model: torch.nn.Module, folder: Path, config: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """Write ``folder/model.safetensors`` and ``folder/config.json`` (replacing ``folder``)."""
    with atomic_path(Path(folder)) as tmp:
        tmp.mkdir()
        st_save(model, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps({**config, **(extra or {})}, indent=2, sort_keys=True))
    return Path(folder)


def save_decoder(model: Decoder, folder: Path, extra: dict[str, Any] | None = None) -> Path:
    return save_model(model, folder, {"model": model.cfg.model_dump()}, extra)


def read_config(folder: Path) -> dict[str, Any]:
    """A model folder's ``config.json``, or a :class:`StageError` saying what is wrong with it."""
    path = require(Path(folder) / "config.json", "model config")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as e:
        raise StageError(f"{path}: not a model config ({e})") from None
    if not isinstance(cfg, dict):
        raise StageError(f"{path}: not a model config (a JSON {type(cfg).__name__}, not an object)")
    return cfg


def load_weights(model: torch.nn.Module, weights: Path, map_location: str = "cpu") -> None:
    """Load ``weights`` (safetensors) into ``model``, strictly; a truncated file or tensors of
    another shape are a :class:`StageError` naming the file."""
    try:
        st_load(model, str(weights), device=map_location)
    except (SafetensorError, RuntimeError, OSError) as e:
        why = " ".join(str(e).split()).removeprefix(f"Error(s) in loading state_dict for {type(model).__name__}: ")
        raise StageError(f"{weights}: cannot be loaded into the model its config.json describes ({why[:300]})") from None


def decoder_config(folder: Path) -> tuple[DecoderConfig, dict[str, Any]]:
    """The decoder shape of an lmcore model folder (:func:`save_decoder`) and its whole
    ``config.json``, checked without reading the weights: a fine-tuned classifier's folder, a
    missing or invalid ``model`` section are a :class:`StageError`."""
    folder = Path(folder)
    cfg = read_config(folder)
    if "task" in cfg:
        raise StageError(f"{folder} holds a model fine-tuned on a task (a classifier), not a language model: give "
                         "a pretrained model folder (runs/pretrain/final) or its export (runs/export)")
    if not isinstance(cfg.get("model"), dict):
        raise StageError(f"{folder}/config.json: no 'model' section")
    try:
        return DecoderConfig(**cfg["model"]), cfg
    except ValidationError as e:
        why = "; ".join(f"{'.'.join(map(str, err['loc']))} = {err.get('input')!r}: {err['msg']}" for err in e.errors())
        raise StageError(f"{folder}/config.json: the 'model' section is not a decoder shape ({why[:300]})") from None


def load_decoder(folder: Path, map_location: str = "cpu", shape: DecoderConfig | None = None) -> Decoder:
    """Load a Decoder saved by :func:`save_decoder`; ``shape``: its :func:`decoder_config`, where
    the caller has read it already."""
    model = Decoder(shape or decoder_config(folder)[0])
    load_weights(model, require(Path(folder) / "model.safetensors", "model weights"), map_location)
    return model


def load_lm(folder: str | Path) -> tuple[Any, dict[str, Any]]:
    """A language model for scoring, in float32 and eval mode, and its folder's ``config.json``:
    an lmcore model folder (``runs/pretrain/final``: ``config.json`` with a ``model`` section) or
    a Hugging Face Llama folder of the shape lmcore writes (``runs/export``)."""

    folder = Path(folder)
    cfg = read_config(folder)
    if "model" in cfg:
        return load_decoder(folder).float().eval(), cfg
    if cfg.get("model_type") == "llama":
        return load_llama(folder, cfg).eval(), cfg
    raise StageError(f"{folder / 'config.json'}: neither an lmcore model folder (a 'model' section) nor a Llama "
                     f"folder (model_type 'llama'); has keys {', '.join(sorted(cfg)[:12])}")


def check_tokenizer(model_cfg: dict[str, Any], vocab_size: int, tok, tokenizer_path: Path, model_dir: Path) -> None:
    """Refuse a tokenizer the model was not trained with (sha256 recorded by pretrain, or a
    vocabulary larger than the model's ``vocab_size``)."""
    want = model_cfg.get("tokenizer_sha256")
    if want:
        got = sha256_file(tokenizer_path)
        if got != want:
            raise StageError(f"{tokenizer_path}: sha256 {got[:12]}... is not the tokenizer {model_dir} was trained "
                             f"with ({want[:12]}...): give that model's tokenizer")
    if tok.get_vocab_size() > vocab_size:
        raise StageError(f"{tokenizer_path}: {tok.get_vocab_size()} tokens, more than the {vocab_size} "
                         f"of the model in {model_dir}")
