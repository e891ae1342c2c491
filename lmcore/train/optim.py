"""Optimizers: AdamW with weight decay on matrices only, or Muon for the blocks' 2-D weights plus
AdamW for the rest (pretraining); AdamW with a learning rate of its own for the head
(fine-tuning)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lmcore.config import FinetuneHyper, PretrainConfig


def _is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    """2-D weights inside the transformer blocks (what Muon optimises)."""
    return p.dim() == 2 and name.startswith("blocks.")


def param_groups(named: Sequence[tuple[str, torch.nn.Parameter]], weight_decay: float,
                 decay_embeddings: bool = False) -> list[dict[str, Any]]:
    """Weight decay on 2-D matrices, none on norms; the (tied) embedding only by option."""
    decay, no_decay, seen = [], [], set()
    for name, p in named:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_embedding = "embed" in name or "lm_head" in name
        (decay if p.dim() >= 2 and (decay_embeddings or not is_embedding) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _adamw(groups: list[dict[str, Any]], cfg: PretrainConfig) -> torch.optim.Optimizer:
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    try:  # one fused kernel for all parameters where this torch has it for the device
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, **kwargs)


def build_optimizers(model: torch.nn.Module, cfg: PretrainConfig) -> list[torch.optim.Optimizer]:
    """AdamW for everything, or Muon for the blocks' 2-D weights plus AdamW for the rest."""
    named = list(model.named_parameters())
    if cfg.optimizer == "adamw":
        return [_adamw(param_groups(named, cfg.weight_decay, cfg.decay_embeddings), cfg)]
    hidden = [p for n, p in named if _is_hidden_matrix(n, p)]
    rest = [(n, p) for n, p in named if not _is_hidden_matrix(n, p)]
    muon = torch.optim.Muon(hidden, lr=cfg.muon_lr, momentum=cfg.muon_momentum, weight_decay=cfg.weight_decay)
    return [muon, _adamw(param_groups(rest, cfg.weight_decay, cfg.decay_embeddings), cfg)]


def finetune_optimizer(model: torch.nn.Module, head: torch.nn.Module, hp: FinetuneHyper) -> torch.optim.Optimizer:
    """AdamW: ``hp.lr`` for the pretrained body, ``hp.head_lr`` for the fresh ``head``."""
    head_params = list(head.parameters())
    head_ids = {id(p) for p in head_params}
    body = [p for p in model.parameters() if id(p) not in head_ids]
    return torch.optim.AdamW([{"params": body, "lr": hp.lr}, {"params": head_params, "lr": hp.head_lr}],
                             weight_decay=hp.weight_decay)
