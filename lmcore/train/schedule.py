"""Learning-rate schedules: multipliers of the peak learning rate by step, and the schedulers that
apply them (stepped by hand once per optimizer step; their state goes to ``trainer.json``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from lmcore.config import PretrainConfig


def lr_factor(step: int, cfg: PretrainConfig) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based).

    ``cosine``: linear warm-up to 1, then cosine decay to ``min_lr_ratio`` at ``max_steps``.
    ``wsd``: linear warm-up, 1 until the last ``decay_fraction`` of the steps, then linear decay
    to ``min_lr_ratio``.
    """
    warmup, total, floor = cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if cfg.schedule == "wsd":
        decay_start = max(warmup, total - round(cfg.decay_fraction * total))
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start + 1) / max(1, total - decay_start))
        return 1.0 - (1.0 - floor) * progress
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def linear_warmup_decay(step: int, warmup: int, total: int) -> float:
    """Fine-tuning's multiplier: linear warm-up over ``warmup`` steps, then linear decay to 0 at
    ``total``."""
    return (step + 1) / (warmup + 1) if step < warmup else max(0.0, (total - step) / max(1, total - warmup))


def schedulers(optimizers: Sequence[torch.optim.Optimizer], factor: Callable[[int], float]
               ) -> list[torch.optim.lr_scheduler.LambdaLR]:
    """One scheduler per optimizer, each multiplying every group's peak rate by ``factor(step)``."""
    return [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in optimizers]
