"""Model folders: ``model.safetensors`` plus ``config.json``, written atomically.

Weights are never pickled: safetensors holds them, JSON holds the shape.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from lmcore.io import StageError, atomic_path, require
from lmcore.model import GPT, GPTConfig


def save_model(model: torch.nn.Module, folder: Path, config: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """Write ``folder/model.safetensors`` and ``folder/config.json`` (replacing ``folder``)."""
    from safetensors.torch import save_model as st_save

    with atomic_path(Path(folder)) as tmp:
        tmp.mkdir()
        st_save(model, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps({**config, **(extra or {})}, indent=2, sort_keys=True))
    return Path(folder)


def save_gpt(model: GPT, folder: Path, extra: dict[str, Any] | None = None) -> Path:
    return save_model(model, folder, {"model": dataclasses.asdict(model.cfg)}, extra)


def read_config(folder: Path) -> dict[str, Any]:
    path = require(Path(folder) / "config.json", "model config")
    return json.loads(path.read_text())


def load_gpt(folder: Path, map_location: str = "cpu") -> GPT:
    """Load a GPT saved by :func:`save_gpt`."""
    from safetensors.torch import load_model as st_load

    folder = Path(folder)
    cfg = read_config(folder)
    if "model" not in cfg:
        raise StageError(f"{folder}/config.json: no 'model' section")
    model = GPT(GPTConfig(**cfg["model"]))
    st_load(model, str(require(folder / "model.safetensors", "model weights")), device=map_location)
    return model
