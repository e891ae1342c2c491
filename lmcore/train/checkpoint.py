"""Checkpoints of a training run and the signals that ask for one.

A checkpoint (``<folder>/step-NNNNNN``) holds the Accelerate state (model as safetensors,
optimizer, RNG of every process, all loaded with ``weights_only=True``) and ``trainer.json``
(the :class:`~lmcore.train.step.TrainState`, the sampler position, the learning-rate
schedulers, a hash of the settings). It is written to a temporary folder and renamed; the last
``keep`` and the one with the best validation loss are kept. :func:`resume` loads the newest
one of the same settings.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from lmcore.config import PretrainConfig

_CKPT = re.compile(r"^step-(\d{6,})$")
# settings that change what is computed; the others (logging, checkpointing, threads) may
# differ between a run and its resumption
_BOOKKEEPING = {"eval_interval", "log_interval", "checkpoint_interval", "keep_checkpoints", "max_nonfinite", "threads"}


def config_hash(cfg: PretrainConfig, manifest: dict[str, Any], world: int) -> str:
    data = json.dumps([cfg.model_dump(mode="json", exclude=_BOOKKEEPING), manifest["tokenizer_sha256"],
                       manifest["splits"]["train"], world], sort_keys=True)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``folder`` (those with ``trainer.json``), oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CKPT.match(p.name))]
    return sorted((s, p) for s, p in found if (p / "trainer.json").exists())


def save_checkpoint(accelerator, folder: Path, step: int, trainer: dict[str, Any], keep: int) -> Path:
    """Save the state of every process into ``folder/step-NNNNNN`` (via a temporary folder and
    a rename), then prune to the last ``keep`` plus the best (``trainer["best_step"]``)."""
    target = folder / f"step-{step:06d}"
    tmp = folder / f".step-{step:06d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer.json").write_text(json.dumps(trainer, indent=1))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        prune(folder, keep, trainer.get("best_step"))
    accelerator.wait_for_everyone()
    return target


def prune(folder: Path, keep: int, best_step: int | None) -> None:
    """Remove all checkpoints but the last ``keep`` and the one of ``best_step``."""
    ckpts = list_checkpoints(folder)
    keep_steps = {s for s, _ in ckpts[-keep:]} | {best_step}
    for s, p in ckpts:
        if s not in keep_steps:
            shutil.rmtree(p, ignore_errors=True)


def resume(accelerator, folder: Path, chash: str, sampler, schedulers: Sequence[Any]) -> dict[str, Any] | None:
    """Load the newest checkpoint in ``folder`` if it has the settings hash ``chash``: the
    Accelerate state, the sampler and the schedulers; return the rest of its ``trainer.json``.
    Checkpoints of other settings are removed (None: start afresh)."""
    ckpts = list_checkpoints(folder)
    if not ckpts:
        return None
    saved = json.loads((ckpts[-1][1] / "trainer.json").read_text())
    if saved.get("config_hash") == chash:
        accelerator.load_state(str(ckpts[-1][1]))
        sampler.load_state_dict(saved.pop("sampler"))
        for sched, sd in zip(schedulers, saved.pop("schedulers"), strict=True):
            sched.load_state_dict(sd)
        accelerator.print(f"resuming from step {saved['step']} ({ckpts[-1][1]})")
        return saved
    accelerator.print(f"{folder}: checkpoints of other settings ({saved.get('config_hash')} != {chash}); "
                      "starting afresh and replacing them")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(folder)
    return None


@contextlib.contextmanager
def stop_signals() -> Iterator[dict[str, int]]:
    """Turn SIGTERM and SIGINT into a flag the training loop checks after each step."""
    flag = {"signum": 0}

    def handler(signum, _frame):
        flag["signum"] = signum

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread (e.g. a Prefect task runner thread)
            pass
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def stop_requested(flag: dict[str, int], accelerator) -> int:
    """The signal number any process received (0: none), so that all stop at the same step."""
    signum = flag["signum"]
    if accelerator.num_processes > 1:
        signum = int(accelerator.reduce(torch.tensor(signum, device=accelerator.device), "max"))
    return signum
