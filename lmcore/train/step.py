"""One optimizer step, the same for pretraining and fine-tuning.

:func:`accumulate` runs forward and backward over this process's micro-batches. The gradient of
a step is that of the summed losses of its targets (tokens for language modelling, examples for
a classification or regression head) divided by the number of targets of the whole step (all
micro-batches, all processes), not a mean of per-micro-batch means. :func:`train_step` then clips
the gradient norm (``grad_clip``, 0: off) and applies the update, unless the loss or the norm is
not finite: that update is skipped and counted in the :class:`TrainState`, and ``max_nonfinite``
such steps in a row stop the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from lmcore.core.errors import StageError


def pins_memory(device: torch.device | str) -> bool:
    """Whether host batches bound for ``device`` are copied through pinned (page-locked) memory
    with ``non_blocking=True``: on CUDA, where the copy then runs asynchronously (DMA) and the
    host goes on queueing kernels; never on a CPU, where there is no copy to make."""
    return torch.device(device).type == "cuda"


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` on ``device``: a CPU tensor bound for CUDA goes through pinned memory, copied with
    ``non_blocking=True`` (:func:`pins_memory`); otherwise ``t.to(device)`` (the same tensor when
    it is there already). Safe to use at once: the copy is ordered before later work on the
    current stream, and torch keeps the pinned buffer alive until the copy is done."""
    if pins_memory(device) and t.device.type == "cpu":
        return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)
    return t.to(device)


class Objective(Protocol):
    """What a micro-batch's loss is: ``loss`` returns the ``sum`` of its targets' losses, or their
    ``mean`` (then scaled by its number of targets, so the arithmetic of a one-micro-batch step is
    that of a plain ``loss.backward()``)."""

    reduction: str

    def targets(self, batch: Any) -> int: ...

    def loss(self, model: torch.nn.Module, batch: Any, accelerator) -> torch.Tensor: ...


class NextToken:
    """Language modelling: a micro-batch is ``(inputs, targets)``; targets of -100 are ignored."""

    reduction = "sum"

    def targets(self, batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        return int((batch[1] != -100).sum())

    def loss(self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor], accelerator) -> torch.Tensor:
        x, y = to_device(batch[0], accelerator.device), to_device(batch[1], accelerator.device)
        with accelerator.autocast():
            _, loss = model(x, y, reduction="sum", return_logits=False)
        return loss


NEXT_TOKEN = NextToken()


def accumulate(model: torch.nn.Module, batches: Sequence[Any], accelerator, objective: Objective = NEXT_TOKEN
               ) -> tuple[torch.Tensor, int]:
    """Forward and backward over this process's micro-batches of one step.

    Each micro-batch contributes ``sum of its target losses / N`` where N counts the targets of
    the whole step on all processes; data-parallel averaging divides by the number of processes,
    so each process scales by it. The gradient is then exactly that of one big batch. Returns
    the summed loss of the step's targets (over all processes) as a tensor on the device, not yet
    read by the host (:func:`train_step` reads it together with the gradient norm, one
    synchronisation per optimizer step; the mean loss per target is ``float(sum) / N``), and N.
    """
    world = accelerator.num_processes
    counts = [objective.targets(b) for b in batches]
    local = sum(counts)
    total = local
    if world > 1:
        total = int(accelerator.reduce(torch.tensor(local, device=accelerator.device), "sum"))
    total = max(total, 1)
    mean = objective.reduction == "mean"
    loss_sum = torch.zeros((), dtype=torch.float64 if mean else torch.float32, device=accelerator.device)
    for i, (batch, count) in enumerate(zip(batches, counts)):
        sync = contextlib.nullcontext() if i == len(batches) - 1 else accelerator.no_sync(model)
        with sync:
            loss = objective.loss(model, batch, accelerator)
            # a mean's scale is exactly 1 for one micro-batch on one process
            accelerator.backward(loss * (world * count / total) if mean else loss * (world / total))
        loss_sum += loss.detach().double() * count if mean else loss.detach().float()
    if world > 1:
        loss_sum = accelerator.reduce(loss_sum, "sum")
    return loss_sum, total


@dataclasses.dataclass
class TrainState:
    """What a run has done so far, saved in ``trainer.json`` with each checkpoint."""

    step: int = 0
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    best_val_loss: float | None = None
    best_step: int | None = None
    best_checkpoint_loss: float | None = None
    best_checkpoint_step: int | None = None
    """The checkpoint of the lowest validation loss, kept when older ones are pruned (``best_step``
    can be a validation between checkpoints, which no checkpoint holds)."""
    train_seconds: float = 0.0
    skipped_steps: int = 0
    nonfinite_in_a_row: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def checkpointed(self, val_loss: float) -> None:
        """A checkpoint of ``state.step`` validated at ``val_loss``: the best one if the lowest."""
        if math.isfinite(val_loss) and (self.best_checkpoint_loss is None or val_loss < self.best_checkpoint_loss):
            self.best_checkpoint_loss, self.best_checkpoint_step = val_loss, self.step

    def load(self, saved: dict[str, Any]) -> None:
        for f in dataclasses.fields(self):
            if f.name in saved:
                setattr(self, f.name, saved[f.name])


@dataclasses.dataclass
class StepResult:
    loss: float
    """Mean loss per target of the step (all processes)."""
    targets: int
    grad_norm: float
    """Before clipping (computed with clipping off too)."""
    applied: bool
    """False when the update was skipped (a non-finite loss or gradient norm)."""


def train_step(model: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer], batches: Sequence[Any],
               accelerator, state: TrainState, *, grad_clip: float, max_nonfinite: int, hint: str,
               objective: Objective = NEXT_TOKEN) -> StepResult:
    """Accumulate the gradient of ``batches``, clip it to ``grad_clip`` (0: off), and update,
    unless the loss or the gradient norm is not finite (every process sees the same reduced
    values, so all skip together). ``max_nonfinite`` skipped steps in a row raise a StageError
    ending with ``hint`` (what to change). Advances ``state.step``; the gradients are cleared."""
    loss_sum, total = accumulate(model, batches, accelerator, objective)
    # the norm is needed with clipping off too (an infinite bound scales by 1): a finite loss can
    # come with a non-finite gradient, which one update would write into every weight
    norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    # the step's one host synchronisation: the loss and the norm together
    loss_sum, grad_norm = torch.stack([loss_sum.double(), torch.as_tensor(norm, device=loss_sum.device).double()]).tolist()
    loss = loss_sum / total
    applied = math.isfinite(loss) and math.isfinite(grad_norm)
    state.step += 1
    if applied:
        for o in optimizers:
            o.step()
        state.nonfinite_in_a_row = 0
    else:
        scaler = getattr(accelerator, "scaler", None)
        if scaler is not None:  # fp16: the optimizer's step would have lowered the loss scale after an overflow
            scaler.update()
        state.skipped_steps += 1
        state.nonfinite_in_a_row += 1
        accelerator.print(f"step {state.step}: loss {loss}, gradient norm {grad_norm}: update skipped")
        if state.nonfinite_in_a_row >= max_nonfinite:
            raise StageError(f"the loss or gradient was not finite for {state.nonfinite_in_a_row} steps in a row "
                             f"(step {state.step}): {hint}")
    for o in optimizers:
        o.zero_grad(set_to_none=True)
    return StepResult(loss, total, grad_norm, applied)
