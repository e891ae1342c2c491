"""What a training step trains on: pretraining's windows of token shards, fine-tuning's batches of
examples.

:class:`WindowSampler` cuts the training tokens into windows of ``block_size + 1`` tokens and
visits them in a seeded order, epoch after epoch; its only state is a position counter. One
optimizer step takes the next ``processes x grad_accum x batch_size`` windows, and process ``r``
trains on micro-batches ``r * grad_accum ... (r + 1) * grad_accum - 1`` of them
(:func:`micro_batches`), so one process with twice the accumulation sees exactly the windows two
processes see together. :func:`fixed_windows` are the validation windows, the same every time;
:func:`epoch_batches` one fine-tuning epoch's batches of example indices.
"""

from __future__ import annotations

import numpy as np
import torch

from lmcore.core.errors import StageError


class WindowSampler:
    """A seeded, resumable order of training windows.

    Epoch ``e`` shifts all window starts by an offset drawn from ``(seed, e)`` and visits the
    ``n_windows`` non-overlapping windows in a permutation drawn from the same generator. The
    sampler's state is one integer, the number of windows handed out so far.
    """

    def __init__(self, n_tokens: int, block: int, seed: int, pos: int = 0) -> None:
        self.block, self.seed, self.pos = block, seed, pos
        self.n_windows = (n_tokens - block) // block
        if self.n_windows < 1:
            raise StageError(f"training split has {n_tokens} tokens: pretraining needs at least 2 x block_size "
                             f"({2 * block}); lower pretrain.model.block_size or add text")
        self._epoch: tuple[int, int, np.ndarray] | None = None

    def _order(self, epoch: int) -> tuple[int, np.ndarray]:
        if self._epoch is None or self._epoch[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            offset = int(rng.integers(0, self.block))
            self._epoch = (epoch, offset, rng.permutation(self.n_windows))
        return self._epoch[1], self._epoch[2]

    def starts(self, first: int, count: int) -> np.ndarray:
        """Token offsets of windows ``first ... first + count - 1`` of the endless sequence."""
        out = np.empty(count, dtype=np.int64)
        for i in range(count):
            epoch, k = divmod(first + i, self.n_windows)
            offset, order = self._order(epoch)
            out[i] = offset + int(order[k]) * self.block
        return out

    def next_step(self, tokens: np.ndarray, windows: int) -> np.ndarray:
        """The next ``windows`` windows as an array (windows, block + 1); advances the position."""
        starts = self.starts(self.pos, windows)
        self.pos += windows
        return np.stack([tokens[s : s + self.block + 1] for s in starts]).astype(np.int64)

    def state_dict(self) -> dict[str, int]:
        return {"pos": self.pos, "seed": self.seed, "n_windows": self.n_windows}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["n_windows"] != self.n_windows or state["seed"] != self.seed:
            raise StageError(f"checkpoint sampler {state} does not match this data ({self.n_windows} windows)")
        self.pos = int(state["pos"])


def micro_batches(step_windows: np.ndarray, batch: int, accum: int, rank: int
                  ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This process's ``accum`` micro-batches (inputs, targets) of one step's windows."""
    out = []
    for m in range(accum):
        i = (rank * accum + m) * batch
        w = torch.from_numpy(step_windows[i : i + batch])
        out.append((w[:, :-1], w[:, 1:]))
    return out


def fixed_windows(tokens: np.ndarray, count: int, block: int) -> torch.Tensor:
    """``count`` windows of ``block + 1`` tokens spread evenly over ``tokens`` (the same every
    time, so validation losses are comparable across steps)."""
    n = len(tokens) - block - 1
    if n < 0:
        raise StageError(f"validation split has {len(tokens)} tokens: fewer than block_size+1 ({block + 1})")
    starts = np.linspace(0, n, num=count).astype(np.int64)
    return torch.from_numpy(np.stack([tokens[s : s + block + 1] for s in starts]).astype(np.int64))


def epoch_batches(lengths: list[int], batch_size: int, rng: np.random.Generator,
                  group_by_length: bool = True, window: int = 64) -> list[np.ndarray]:
    """One epoch's batches of example indices: a seeded permutation cut into batches. With
    ``group_by_length`` the permutation is sorted by length within windows of ``window`` batches
    and the batches are shuffled again, so a batch pads little but the order stays random."""
    perm = rng.permutation(len(lengths))
    if group_by_length:
        size = batch_size * window
        length = np.asarray(lengths)
        perm = np.concatenate([c[np.argsort(length[c], kind="stable")]
                               for c in (perm[i : i + size] for i in range(0, len(perm), size))] or [perm])
    batches = [perm[i : i + batch_size] for i in range(0, len(perm), batch_size)]
    if group_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def process_share(batches: list, index: int, count: int) -> list:
    """Process ``index``'s share of one epoch's ``batches`` when ``count`` processes split them:
    every other batch from ``index``, after the list is padded to a multiple of ``count`` by
    repeating its first batches (as torch's ``DistributedSampler`` pads). Every process then takes
    the same number of optimizer steps: each step is a collective (the gradients' all-reduce, the
    loss's reduction), and one process with a step more would wait for the others forever."""
    if count > 1 and len(batches) % count:
        batches = batches + [batches[i % len(batches)] for i in range(count - len(batches) % count)]
    return batches[index::count]


def step_groups(batches: list, accum: int) -> list[list]:
    """Consecutive groups of ``accum`` batches, one optimizer step each (the last may be shorter)."""
    return [batches[i : i + accum] for i in range(0, len(batches), accum)]
