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
    """Weight decay on 2-D matrices, none on norms; the token embedding (and the output head tied
    to it, which ``named_parameters`` lists once, as the embedding) only by option. An untied
    output head is a matrix like the others: decayed."""
    decay, no_decay, seen = [], [], set()
    for name, p in named:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_embedding = "embed" in name
        (decay if p.dim() >= 2 and (decay_embeddings or not is_embedding) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _target_device(model: torch.nn.Module, device: torch.device | str | None) -> torch.device:
    """The device the parameters will train on: ``device`` when given (the optimizers are built
    before ``accelerator.prepare`` moves the model, so the parameters may still be on the CPU),
    else where they are now."""
    if device is not None:
        return torch.device(device)
    return next(model.parameters()).device


def _adamw(groups: list[dict[str, Any]], cfg: PretrainConfig, device: torch.device) -> torch.optim.Optimizer:
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    if device.type == "cuda":  # one fused kernel for all parameters; never a silent fallback on CUDA
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    try:  # the fused kernel where this torch has it for the device (CPU since torch 2.4)
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, **kwargs)


def build_optimizers(model: torch.nn.Module, cfg: PretrainConfig,
                     device: torch.device | str | None = None) -> list[torch.optim.Optimizer]:
    """AdamW for everything, or Muon for the blocks' 2-D weights plus AdamW for the rest. AdamW
    is the fused one (on CUDA always). ``device``: where training runs (``accelerator.device``;
    default: where the parameters are now)."""
    named = list(model.named_parameters())
    target = _target_device(model, device)
    if cfg.optimizer == "adamw":
        return [_adamw(param_groups(named, cfg.weight_decay, cfg.decay_embeddings), cfg, target)]
    hidden = [p for n, p in named if _is_hidden_matrix(n, p)]
    rest = [(n, p) for n, p in named if not _is_hidden_matrix(n, p)]
    muon = torch.optim.Muon(hidden, lr=cfg.muon_lr, momentum=cfg.muon_momentum, weight_decay=cfg.weight_decay)
    return [muon, _adamw(param_groups(rest, cfg.weight_decay, cfg.decay_embeddings), cfg, target)]


def finetune_optimizer(model: torch.nn.Module, head: torch.nn.Module, hp: FinetuneHyper,
                       device: torch.device | str | None = None) -> torch.optim.Optimizer:
    """AdamW: ``hp.lr`` for the pretrained body, ``hp.head_lr`` for the fresh ``head``; weight
    decay as in pretraining (:func:`param_groups`: on 2-D matrices, never on norms, biases or the
    embedding); the fused kernel on CUDA (``device``: where training runs, default where the
    parameters are now), torch's default implementation elsewhere (as fine-tuning on a CPU always
    ran)."""
    head_ids = {id(p) for p in head.parameters()}
    named = list(model.named_parameters())
    body = [(n, p) for n, p in named if id(p) not in head_ids]
    fresh = [(n, p) for n, p in named if id(p) in head_ids]
    groups = ([g | {"lr": hp.lr} for g in param_groups(body, hp.weight_decay)]
              + [g | {"lr": hp.head_lr} for g in param_groups(fresh, hp.weight_decay)])
    fused = True if _target_device(model, device).type == "cuda" else None
    return torch.optim.AdamW(groups, weight_decay=hp.weight_decay, fused=fused)
