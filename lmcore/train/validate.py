"""Validation of a language model: the mean next-token loss over fixed windows, in nats and in
bits per byte of text, and the best of a run."""

from __future__ import annotations

import math

import torch

from lmcore.train.step import TrainState, to_device


@torch.no_grad()
def evaluate_windows(model: torch.nn.Module, windows: torch.Tensor, batch: int, accelerator) -> float:
    """Mean next-token loss (nats) over fixed windows, shared out over the processes."""
    model.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = windows[rank::world]
    sums = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    # as many forward passes on every process (under FSDP each one gathers the weights from all):
    # a process whose share is a window short runs its last one again, not counted
    for i in range(0, -(-len(windows) // world), batch):
        counted = i < len(mine)
        w = to_device(mine[i : i + batch] if counted else windows[:1], accelerator.device)
        with accelerator.autocast():
            _, loss = model(w[:, :-1], w[:, 1:], reduction="sum", return_logits=False)
        if counted:
            sums[0] += loss.detach().double()  # no device sync per batch
            sums[1] += w[:, 1:].numel()
    if world > 1:
        sums = accelerator.reduce(sums, "sum")
    model.train()
    return float(sums[0] / sums[1])


def bits_per_byte(loss: float, tokens_per_byte: float) -> float:
    """A mean token loss in nats as bits per byte of the text."""
    return loss / math.log(2) * tokens_per_byte


def validate(model: torch.nn.Module, windows: torch.Tensor, batch: int, accelerator, state: TrainState,
             tokens_per_byte: float) -> dict[str, float]:
    """Validate at ``state.step``: keep the best loss in ``state``, append the row to its history
    and return it (``step``, ``val_loss``, ``val_bpb``)."""
    v = evaluate_windows(model, windows, batch, accelerator)
    if state.best_val_loss is None or v < state.best_val_loss:
        state.best_val_loss, state.best_step = v, state.step
    row = {"step": state.step, "val_loss": v, "val_bpb": bits_per_byte(v, tokens_per_byte)}
    state.history.append(row)
    return row
