"""Each stage's entry function wired to ``params.yaml`` and the default layout.

The CLI (what ``dvc.yaml`` runs) and the Prefect tasks both call :func:`run_stage`, so the two
orchestrators share one definition of what a stage reads and writes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmcore.config import Params
from lmcore.layout import Layout


def _prepare(p: Params, L: Layout) -> Any:
    from lmcore.prepare import prepare

    return prepare(p.prepare, L.raw, L.metrics("prepare"), p.tracking)


def _clean(p: Params, L: Layout, map_shards: Callable | None = None) -> Any:
    from lmcore.clean import clean

    return clean(p.clean, L.raw, L.clean, L.metrics("clean"), p.tracking, map_shards=map_shards)


def _tokenizer(p: Params, L: Layout) -> Any:
    from lmcore.tokenizer import train_tokenizer

    return train_tokenizer(p.tokenizer, L.clean, L.tokenizer, L.metrics("tokenizer"), p.tracking)


def _encode(p: Params, L: Layout) -> Any:
    from lmcore.encode import encode

    return encode(p.encode, L.clean, L.tokenizer, L.tokens, L.metrics("encode"), p.tracking)


def _pretrain(p: Params, L: Layout) -> Any:
    from lmcore.pretrain import pretrain

    return pretrain(p.pretrain, L.tokens, L.pretrain, L.metrics("pretrain"), L.loss_plot, p.tracking)


def _export(p: Params, L: Layout) -> Any:
    from lmcore.export import export

    return export(p.export, L.pretrained, L.tokenizer, L.export, L.metrics("export"), p.tracking)


def _finetune(p: Params, L: Layout) -> Any:
    from lmcore.finetune import finetune

    return finetune(p.finetune, L.tasks, L.pretrained, L.tokenizer, L.finetune, L.metrics("finetune"), p.tracking)


def _evaluate(p: Params, L: Layout) -> Any:
    from lmcore.evaluate import evaluate

    return evaluate(p.evaluate, L.tokens, L.pretrained, L.finetune, L.tokenizer, L.tasks, L.evaluate,
                    L.metrics("evaluate"), p.tracking)


@dataclasses.dataclass(frozen=True)
class StageIO:
    """What a stage reads and writes (paths relative to the layout root) and which sections of
    ``params.yaml`` it depends on. ``dvc.yaml`` declares the same; a test keeps them equal."""

    params: tuple[str, ...]
    deps: tuple[str, ...]
    outs: tuple[str, ...]
    persist: tuple[str, ...] = ()
    """Outputs kept across reruns and not cached by DVC (``persist: true, cache: false``):
    checkpoints a rerun resumes from."""


STAGE_IO: dict[str, StageIO] = {
    "prepare": StageIO(("prepare",), ("lmcore/prepare.py", "lmcore/glue.py"), ("data/raw",)),
    "clean": StageIO(("clean",), ("lmcore/clean", "data/raw/corpus"), ("data/clean",)),
    "tokenizer": StageIO(("tokenizer",), ("lmcore/tokenizer.py", "data/clean"), ("data/tokenizer",)),
    "encode": StageIO(("encode",), ("lmcore/encode.py", "lmcore/shards.py", "lmcore/tokenizer.py", "data/clean",
                                    "data/tokenizer"), ("data/tokens",)),
    "pretrain": StageIO(("pretrain",), ("lmcore/model.py", "lmcore/pretrain.py", "lmcore/shards.py",
                                        "configs/accelerate/cpu.yaml", "data/tokens"), ("runs/pretrain/final",),
                        persist=("runs/pretrain/checkpoints",)),
    "export": StageIO(("export",), ("lmcore/export.py", "runs/pretrain/final", "data/tokenizer"), ("runs/export",)),
    "finetune": StageIO(("finetune",), ("lmcore/finetune.py", "data/raw/tasks", "data/tokenizer",
                                        "runs/pretrain/final"), ("runs/finetune",)),
    "evaluate": StageIO(("evaluate",), ("lmcore/evaluate.py", "lmcore/shards.py", "data/tokens", "data/tokenizer",
                                        "data/raw/tasks",
                                        "runs/pretrain/final", "runs/finetune"), ("runs/evaluate",)),
}


def cache_key(name: str, params: Params, layout: Layout) -> str:
    """A key that changes when the stage's params sections, its input files, lmcore's code or
    the project folder change (the Prefect cache key)."""
    import hashlib
    import json

    from lmcore.io import fingerprint

    io = STAGE_IO[name]
    package = Path(__file__).resolve().parent
    paths = [package.parent / d if d.startswith(("lmcore/", "configs/")) else layout / d for d in io.deps]
    sections = {s: getattr(params, s).model_dump(mode="json") for s in io.params}
    # any change to lmcore's code invalidates the key: stricter than dvc.yaml, never stale
    code = fingerprint(*sorted(package.rglob("*.py")))
    payload = json.dumps([name, str(layout.root.resolve()), sections, fingerprint(*paths), code], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def outputs_exist(name: str, layout: Layout) -> bool:
    return all((layout / o).exists() for o in STAGE_IO[name].outs)


STAGES: dict[str, Callable[..., Any]] = {
    "prepare": _prepare,
    "clean": _clean,
    "tokenizer": _tokenizer,
    "encode": _encode,
    "pretrain": _pretrain,
    "export": _export,
    "finetune": _finetune,
    "evaluate": _evaluate,
}
ORDER = list(STAGES)


def run_stage(name: str, params: Params, layout: Layout = Layout(), **options: Any) -> Any:
    """Run one stage with its section of ``params`` on ``layout``; return what it produced.
    ``options`` go to the stage (``clean`` takes ``map_shards``, a function mapping its shard
    jobs over an orchestrator's workers)."""
    return STAGES[name](params, layout, **options)
