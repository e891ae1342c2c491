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
import dataclasses
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
from lmcore.core.errors import StageError
from lmcore.core.io import sync_tree

_CKPT = re.compile(r"^step-(\d{6,})$")
# settings that change what is computed; the others (logging, checkpointing, threads) may
# differ between a run and its resumption. How a step's windows are split (processes x
# grad_accum x batch_size) is not part of the hash: a run resumes on another number of processes
# when the product, the global batch, stays the same (StepLayout).
_BOOKKEEPING = {"eval_interval", "log_interval", "checkpoint_interval", "keep_checkpoints", "max_nonfinite", "threads",
                "grad_accum", "batch_size"}


def config_hash(cfg: PretrainConfig, manifest: dict[str, Any]) -> str:
    data = json.dumps([cfg.model_dump(mode="json", exclude=_BOOKKEEPING), manifest["tokenizer_sha256"],
                       manifest["splits"]["train"]], sort_keys=True)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class StepLayout:
    """How one optimizer step's windows are split: ``processes x grad_accum x batch_size``.
    Only the product (the global batch) changes what is computed, up to the order of floating
    point sums."""

    processes: int
    grad_accum: int
    batch_size: int

    @property
    def global_batch(self) -> int:
        return self.processes * self.grad_accum * self.batch_size

    def describe(self) -> str:
        return (f"{self.global_batch} windows per step ({self.processes} process(es) x grad_accum {self.grad_accum} "
                f"x batch_size {self.batch_size})")


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``folder`` (those with ``trainer.json``), oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CKPT.match(p.name))]
    return sorted((s, p) for s, p in found if (p / "trainer.json").exists())


def save_checkpoint(accelerator, folder: Path, step: int, trainer: dict[str, Any], keep: int) -> Path:
    """Save the state of every process into ``folder/step-NNNNNN`` (via a temporary folder and
    a rename), then prune to the last ``keep`` plus the best (``trainer["best_checkpoint_step"]``); the
    checkpoints of another run (other settings or another global batch, left by :func:`resume`
    until now) go too."""
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
        sync_tree(tmp)  # on disk before older checkpoints are pruned: a power cut leaves a whole one
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        sync_tree(folder, files=False)  # the rename itself
        prune(folder, keep, trainer.get("best_checkpoint_step"), _run_of(trainer))
    accelerator.wait_for_everyone()
    return target


def _run_of(trainer: dict[str, Any]) -> tuple[Any, Any, Any]:
    """What makes checkpoints one run's: the settings hash, the global batch and the run's id
    (``trainer["run"]``: drawn when a run starts afresh, kept when it resumes). Without the id, a
    run started afresh over a finished run of the same settings (other code) counted the old
    run's later steps as its own: pruning kept those and deleted the new run's, so each
    interruption of the new run started it from step 0 again."""
    layout = trainer.get("layout")
    return (trainer.get("config_hash"), StepLayout(**layout).global_batch if isinstance(layout, dict) else None,
            trainer.get("run"))


def _other_run(path: Path, run: tuple[Any, Any, Any]) -> bool:
    try:
        return _run_of(json.loads((path / "trainer.json").read_text())) != run
    except (OSError, ValueError, TypeError, AttributeError):  # unreadable: not this run's
        return True


def prune(folder: Path, keep: int, best_step: int | None, run: tuple[Any, Any, Any] | None = None) -> None:
    """Remove all checkpoints but the last ``keep`` and the one of ``best_step``; with ``run``
    (:func:`_run_of` the newest), also every checkpoint of another run; and the temporary folders
    of saves that were interrupted."""
    for tmp in folder.glob(".step-*.tmp"):  # a save interrupted at a step never saved again (a signal's)
        shutil.rmtree(tmp, ignore_errors=True)
    ckpts = list_checkpoints(folder)
    if run is not None:
        for s, p in [c for c in ckpts if _other_run(c[1], run)]:
            shutil.rmtree(p, ignore_errors=True)
        ckpts = list_checkpoints(folder)
    keep_steps = {s for s, _ in ckpts[-keep:]} | {best_step}
    for s, p in ckpts:
        if s not in keep_steps:
            shutil.rmtree(p, ignore_errors=True)


_TRAINER_KEYS = ("step", "config_hash", "layout", "sampler", "schedulers")


def _corrupt(where: Path, why: str, path: Path, folder: Path) -> StageError:
    """The error of a checkpoint ``path`` (in ``folder``) that cannot be resumed, and what to do."""
    return StageError(f"{where}: corrupt checkpoint{why}; remove {path} to resume from an older checkpoint, "
                      f"or {folder} to start afresh")


def _read_trainer(path: Path, folder: Path) -> dict[str, Any]:
    """A checkpoint's ``trainer.json``, or a :class:`StageError` saying what to do about it."""
    try:
        saved = json.loads((path / "trainer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise _corrupt(path / "trainer.json", f" ({e})", path, folder) from None
    missing = [k for k in _TRAINER_KEYS if k not in saved] if isinstance(saved, dict) else list(_TRAINER_KEYS)
    if missing:
        raise _corrupt(path / "trainer.json", f" (no {', '.join(missing)})", path, folder)
    return saved


def resume(accelerator, folder: Path, chash: str, sampler, schedulers: Sequence[Any], layout: StepLayout,
           max_steps: int, code: str | None = None) -> dict[str, Any] | None:
    """Load the newest checkpoint in ``folder`` if it has the settings hash ``chash`` and the
    global batch of ``layout``: the Accelerate state, the sampler and the schedulers; return the
    rest of its ``trainer.json``. The number of processes may differ from the run that wrote it
    (the sampler's position counts windows of all processes). Checkpoints of other settings, or
    of a finished run with another global batch, mean starting afresh (None); they stay until
    this run saves its first checkpoint (:func:`save_checkpoint`), so a run that fails before
    that loses nothing. An unfinished run with another global batch or other settings is refused
    (:class:`StageError`), so that its progress is not lost to a changed launch or params file; so
    is a corrupt newest checkpoint. ``code``: a hash of the code the run runs (``trainer["code"]``); a
    finished run of other code starts afresh (its weights are not what this code would train),
    an unfinished one resumes with a warning."""
    ckpts = list_checkpoints(folder)
    if not ckpts:
        return None
    step, path = ckpts[-1]
    saved = _read_trainer(path, folder)
    other_code = code is not None and saved.get("code") not in (None, code)
    if saved.get("config_hash") == chash and other_code and step >= max_steps:
        accelerator.print(f"{folder}: a finished run of other code (the training code changed since); starting "
                          "afresh (its checkpoints are replaced at this run's first checkpoint)")
    elif saved.get("config_hash") == chash:
        try:
            was = StepLayout(**saved["layout"])
        except TypeError as e:
            raise _corrupt(path / "trainer.json", f" (layout: {e})", path, folder) from None
        if was.global_batch == layout.global_batch:
            try:
                accelerator.load_state(str(path))
                sampler.load_state_dict(saved.pop("sampler"))
                for sched, sd in zip(schedulers, saved.pop("schedulers"), strict=True):
                    sched.load_state_dict(sd)
            except Exception as e:  # noqa: BLE001 (safetensors, torch.load, a missing file: all mean the same here)
                first = str(e).splitlines()[0] if str(e) else ""
                if "parameter group" in first and other_code:  # whole, but grouped by older code
                    raise StageError(
                        f"{path}: the optimizer state of a run of older code, whose parameter groups differ from "
                        f"this code's (since 2026-12-08 an untied output head is weight-decayed): finish the run "
                        f"with the code that started it, or remove {folder} to start afresh") from None
                raise _corrupt(path, f", cannot be loaded ({type(e).__name__}: {first})", path, folder) from None
            moved = "" if was == layout else f"; written as {was.describe()}, continued as {layout.describe()}"
            changed = ("; the training code changed since it was written (remove the folder to start afresh "
                       "with this code)") if other_code else ""
            accelerator.print(f"resuming from step {saved['step']} ({path}){moved}{changed}")
            return saved
        if step < max_steps:
            raise StageError(
                f"{path} is step {step} of an unfinished run of {was.describe()}; this launch would train "
                f"{layout.describe()}. A resumed run must keep the global batch (processes x grad_accum x batch_size): "
                f"set pretrain.grad_accum or pretrain.batch_size so that the product is {was.global_batch}, "
                f"or remove {folder} to start afresh")
        accelerator.print(f"{folder}: a finished run of {was.describe()}; this run trains {layout.describe()}: "
                          "starting afresh (its checkpoints are replaced at this run's first checkpoint)")
    else:
        total = saved.get("max_steps")  # recorded since 2026-12-07; older checkpoints count as finished
        if isinstance(total, int) and step < total:
            raise StageError(
                f"{path} is step {step} of {total} of an unfinished run of other settings ({saved.get('config_hash')} "
                f"!= {chash}): these settings would start afresh and its checkpoints would go at this run's first "
                f"one. Restore the pretrain settings it ran with (its MLflow run holds them) to resume it, or remove "
                f"{folder} to start afresh")
        accelerator.print(f"{folder}: checkpoints of other settings ({saved.get('config_hash')} != {chash}); "
                          "starting afresh (they are replaced at this run's first checkpoint)")
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
