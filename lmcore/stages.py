"""Each stage's entry function wired to ``params.yaml`` and the default layout.

The CLI (what ``dvc.yaml`` runs) and the Prefect tasks both call :func:`run_stage`, so the two
orchestrators share one definition of what a stage reads and writes, and of the code it runs:
each stage's entry module (:data:`ENTRY_MODULES`) is imported only when the stage runs, so that
``lmcore prepare`` does not load torch, and its import closure is the stage's code dependency
for both DVC and Prefect (:func:`code_deps`).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmcore.config import Params
from lmcore.core.errors import StageError
from lmcore.core.imports import PACKAGE_DIR, closure_files
from lmcore.core.io import fingerprint, write_json
from lmcore.core.layout import Layout


def _prepare(p: Params, L: Layout) -> Any:
    from lmcore.data.prepare import prepare  # lazy: each stage loads only its own code

    return prepare(p.prepare, L.raw, L.metrics("prepare"), p.tracking, root=L.root)


def _clean(p: Params, L: Layout, map_shards: Callable | None = None) -> Any:
    from lmcore.data.clean.stage import clean  # lazy: each stage loads only its own code

    return clean(p.clean, L.raw, L.clean, L.metrics("clean"), p.tracking, map_shards=map_shards)


def _tokenizer(p: Params, L: Layout) -> Any:
    from lmcore.data.tokenizer import train_tokenizer  # lazy: each stage loads only its own code

    return train_tokenizer(p.tokenizer, L.clean, L.tokenizer, L.metrics("tokenizer"), p.tracking)


def _encode(p: Params, L: Layout) -> Any:
    from lmcore.data.encode import encode  # lazy: each stage loads only its own code

    return encode(p.encode, L.clean, L.tokenizer, L.tokens, L.metrics("encode"), p.tracking)


def _pretrain(p: Params, L: Layout) -> Any:
    from lmcore.train.pretrain import pretrain  # lazy: each stage loads only its own code

    return pretrain(p.pretrain, L.tokens, L.pretrain, L.metrics("pretrain"), L.plots, p.tracking)


def _export(p: Params, L: Layout) -> Any:
    from lmcore.export import export  # lazy: each stage loads only its own code

    return export(p.export, L.pretrained, L.tokenizer, L.export, L.metrics("export"), p.tracking)


def _finetune(p: Params, L: Layout, task: str | None = None) -> Any:
    """One task (``task``: what each DVC stage ``finetune@<task>`` and each Prefect task run), or
    every task of ``prepare.tasks.tasks`` in turn."""
    from lmcore.train.finetune import finetune  # lazy: each stage loads only its own code

    if task is not None and task not in p.prepare.tasks.tasks:
        raise StageError(f"task '{task}' is not in prepare.tasks.tasks ({', '.join(p.prepare.tasks.tasks)})")
    results = {t: finetune(p.finetune, L.tasks / t, L.pretrained, L.tokenizer, L.finetune / t,
                           L.metrics(f"finetune/{t}"), p.tracking)
               for t in ([task] if task else p.prepare.tasks.tasks)}
    return results[task] if task else {t: r.score for t, r in results.items()}


def _evaluate(p: Params, L: Layout) -> Any:
    from lmcore.eval.evaluate import evaluate  # lazy: each stage loads only its own code

    return evaluate(p.evaluate, L.tokens, L.pretrained, L.finetune, L.tokenizer, p.prepare.tasks.tasks, L.evaluate,
                    L.metrics("evaluate"), p.tracking, clean_dir=L.clean, tasks_dir=L / "data/raw/tasks", root=L.root)


ITEM = "${item}"


@dataclasses.dataclass(frozen=True)
class StageIO:
    """What a stage reads and writes (paths relative to the layout root) and which keys of
    ``params.yaml`` it depends on (sections, or dotted keys). ``dvc.yaml`` declares the same; a
    test keeps them equal."""

    params: tuple[str, ...]
    deps: tuple[str, ...]
    outs: tuple[str, ...]
    persist: tuple[str, ...] = ()
    """Outputs kept across reruns and not cached by DVC (``persist: true, cache: false``):
    checkpoints a rerun resumes from."""
    foreach: str | None = None
    """A params key holding a list: the stage runs once per item of it (a DVC ``foreach`` stage,
    ``<stage>@<item>``; one Prefect task run per item), and ``${item}`` in ``params``, ``deps``
    and ``outs`` stands for the item."""
    metrics: tuple[str, ...] = ()
    """Metrics files (DVC ``metrics``, not cached), when they are not ``metrics/<stage>.json``."""
    plots: tuple[str, ...] = ()
    """Folders of the tables ``dvc.yaml``'s top-level ``plots`` draw (outputs with ``cache: false``:
    git carries them, as the metrics files)."""
    launched: bool = False
    """Run under ``accelerate launch`` as ``params.yaml``'s ``launch`` section says
    (:mod:`lmcore.launch`): ``lmcore launch <stage>`` in ``dvc.yaml``, a child process group of
    the Prefect task. The other stages run in-process."""

    def expand(self, item: str) -> "StageIO":
        """This stage's inputs and outputs for one item of a ``foreach`` stage."""
        def sub(xs: tuple[str, ...]) -> tuple[str, ...]:
            return tuple(x.replace(ITEM, item) for x in xs)

        return dataclasses.replace(self, params=sub(self.params), deps=sub(self.deps), outs=sub(self.outs),
                                   persist=sub(self.persist), foreach=None, metrics=sub(self.metrics),
                                   plots=sub(self.plots))


ENTRY_MODULES: dict[str, str] = {
    "prepare": "lmcore.data.prepare",
    "clean": "lmcore.data.clean.stage",
    "tokenizer": "lmcore.data.tokenizer",
    "encode": "lmcore.data.encode",
    "pretrain": "lmcore.train.pretrain",
    "export": "lmcore.export",
    "finetune": "lmcore.train.finetune",
    "evaluate": "lmcore.eval.evaluate",
}
"""The module holding each stage's entry function. A stage's code dependencies are the import
closure of this module inside lmcore (:func:`code_deps`): what ``dvc.yaml`` declares and what the
Prefect cache key hashes."""

LAUNCH_CONFIG = "${launch.config}"
"""The Accelerate config file of the launched stages: ``launch.config``, a dependency (DVC
templating resolves it from ``params.yaml``; :func:`data_deps` does the same for Prefect)."""
LAUNCH_PARAMS = ("launch.config", "launch.num_processes", "launch.num_machines", "launch.cpu")
"""The ``launch`` keys a training result depends on (the number of processes sets the global
batch; CPU or GPU the arithmetic). The rank, address and port of a machine do not."""

CLEAN_SPLITS = ("data/clean/train", "data/clean/validation")
"""What the stages after ``clean`` read of its output."""

STAGE_IO: dict[str, StageIO] = {
    "prepare": StageIO(("prepare",), (), ("data/raw",)),
    # fineweb2.json: FineWeb-2's per-language thresholds, data the clean stage's filters read
    "clean": StageIO(("clean",), ("lmcore/data/clean/fineweb2.json", "data/raw/corpus"), ("data/clean",)),
    # the clean splits, not data/clean: its stats.json holds the run's timings, which would rerun
    # every stage after a clean that wrote the same text
    "tokenizer": StageIO(("tokenizer",), CLEAN_SPLITS, ("data/tokenizer",)),
    "encode": StageIO(("encode",), (*CLEAN_SPLITS, "data/tokenizer"), ("data/tokens",)),
    "pretrain": StageIO(("pretrain", *LAUNCH_PARAMS), (LAUNCH_CONFIG, "data/tokens"), ("runs/pretrain/final",),
                        persist=("runs/pretrain/checkpoints",), plots=("metrics/plots",), launched=True),
    "export": StageIO(("export",), ("runs/pretrain/final", "data/tokenizer"), ("runs/export",)),
    # one stage per task; each depends on the shared fine-tune settings and its own overrides only
    "finetune": StageIO(("finetune.defaults", "finetune.mixed_precision", "finetune.attention", "finetune.threads",
                         f"finetune.tasks.{ITEM}", *LAUNCH_PARAMS),
                        (LAUNCH_CONFIG, f"data/raw/tasks/{ITEM}", "data/tokenizer", "runs/pretrain/final"),
                        (f"runs/finetune/{ITEM}",), foreach="prepare.tasks.tasks",
                        metrics=(f"metrics/finetune/{ITEM}.json",), launched=True),
    # reads every task's results and prediction files (GLUE score, submission zip) for the listed tasks
    "evaluate": StageIO(("evaluate", "prepare.tasks.tasks"),
                        (*CLEAN_SPLITS, "data/raw/tasks", "data/tokens", "data/tokenizer", "runs/pretrain/final",
                         "runs/finetune"),
                        ("runs/evaluate",)),
}
"""Each stage's params keys, data dependencies and outputs. ``dvc.yaml`` declares the same, with
the stage's :func:`code_deps` before the data dependencies (a test keeps them equal)."""


WIRING = ("lmcore/stages.py", "lmcore/cli/main.py", "lmcore/cli/__main__.py")
"""What runs every stage beside its own code: this wiring (the folders and settings a stage is
given) and the command line that calls it (``lmcore <stage>``, and ``python -m lmcore.cli`` in a
launched process)."""
LAUNCH_WIRING = ("lmcore/launch.py",)
"""What starts a launched stage's processes (their number, CPU or GPU: the arithmetic)."""


def code_deps(name: str, package_dir: Path = PACKAGE_DIR) -> list[str]:
    """The lmcore source files stage ``name`` runs: the import closure of its entry module, then
    :data:`WIRING` (and :data:`LAUNCH_WIRING` for a launched stage), as paths relative to the
    project folder (``package_dir``: the ``lmcore`` folder read)."""
    own = closure_files(ENTRY_MODULES[name], package_dir)
    wiring = [*WIRING, *(LAUNCH_WIRING if STAGE_IO[name].launched else ())]
    return own + [f for f in wiring if f not in own]


def code_fingerprint(name: str, package_dir: Path = PACKAGE_DIR) -> str:
    """A hash of the contents of :func:`code_deps`: the code part of the Prefect cache key."""
    return fingerprint(*(package_dir.parent / f for f in code_deps(name, package_dir)))


def deps(name: str, item: str | None = None) -> list[str]:
    """Everything stage ``name`` depends on, as ``dvc.yaml`` lists it: its code, then its data."""
    return [*code_deps(name), *stage_io(name, item).deps]


def param_value(params: Params, key: str) -> Any:
    """The value of a dotted ``params.yaml`` key (``finetune.tasks.sst2``), as JSON data."""
    node: Any = params.model_dump(mode="json")
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def stage_items(name: str, params: Params) -> list[str] | None:
    """The items a ``foreach`` stage runs for (``finetune``: the task names), else None."""
    io = STAGE_IO[name]
    return None if io.foreach is None else [str(x) for x in param_value(params, io.foreach)]


def stage_io(name: str, item: str | None = None) -> StageIO:
    io = STAGE_IO[name]
    if io.foreach is None:
        return io
    if item is None:
        raise ValueError(f"stage {name} runs once per item of {io.foreach}: give the item")
    return io.expand(item)


def launch_config_file(config: str, layout: Layout) -> Path:
    """``launch.config`` as a file: an absolute path as it is; a relative one in the project
    folder (as DVC resolves it), or, where the project folder has none, in the checkout that holds
    the ``lmcore`` package (``configs/accelerate/`` ships there: a flow run with ``root`` elsewhere
    still finds it)."""
    if Path(config).is_absolute():
        return Path(config)
    own, shipped = layout / config, PACKAGE_DIR.parent / config
    return shipped if not own.exists() and shipped.exists() else own


def data_deps(name: str, params: Params, layout: Layout, item: str | None = None) -> list[Path]:
    """The data files and folders stage ``name`` reads, as paths: ``${launch.config}`` resolved
    from ``params`` like DVC's templating (:func:`launch_config_file`), the data files of the
    package (``lmcore/...``) in the checkout, the rest relative to the project folder."""
    def path(dep: str) -> Path:
        if dep == LAUNCH_CONFIG:
            return launch_config_file(params.launch.config, layout)
        return PACKAGE_DIR.parent / dep if dep.startswith(f"{PACKAGE_DIR.name}/") else layout / dep

    return [path(d) for d in stage_io(name, item).deps]


def metrics_path(name: str, layout: Layout, item: str | None = None) -> Path:
    """Stage ``name``'s metrics file (per item for a ``foreach`` stage)."""
    io = stage_io(name, item)
    return layout / io.metrics[0] if io.metrics else layout.metrics(name)


def named_inputs(name: str, params: Params, layout: Layout) -> list[Path]:
    """The files a stage reads because its params name them, beside its declared deps:
    prepare's ``corpus.paths`` (kind ``files``), its GLUE task folders and local task files,
    evaluate's ``texts`` and ``multiple_choice`` files (relative to the project folder, as the
    stages read them), globs expanded. Part of the Prefect cache
    key; ``dvc.yaml`` cannot list them (README: after editing one in place, ``dvc repro -f -s``)."""
    sections = {"prepare": params.prepare, "evaluate": params.evaluate}
    paths = [layout.rooted(p) for p in sections[name].input_files()] if name in sections else []
    # recursive, as the stages expand them (readers.expand_paths): "**" spans any depth
    return sorted({Path(m) for p in paths for m in (glob.glob(p, recursive=True) or [p])})


def cache_key(name: str, params: Params, layout: Layout, item: str | None = None) -> str:
    """A key that changes when the stage's params keys, its input files (declared, and
    :func:`named_inputs`), its code (the same :func:`code_deps` as ``dvc.yaml``) or the project
    folder change (the Prefect cache key); per item for a ``foreach`` stage."""
    io = stage_io(name, item)
    data = data_deps(name, params, layout, item)
    sections = {s: param_value(params, s) for s in io.params}
    payload = json.dumps([name, item, str(layout.root.resolve()), sections, fingerprint(*data),
                          fingerprint(*named_inputs(name, params, layout)), code_fingerprint(name)], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def pipeline_outputs(params: Params, layout: Layout) -> dict[str, list[Path]]:
    """Every stage's outputs, in stage order (``finetune@<task>`` for each task of a ``foreach``
    stage)."""
    out: dict[str, list[Path]] = {}
    for name in ORDER:
        items = stage_items(name, params)
        for item in items if items is not None else [None]:
            out[name if item is None else f"{name}@{item}"] = [layout / o for o in stage_io(name, item).outs]
    return out


def outputs_exist(name: str, layout: Layout, item: str | None = None) -> bool:
    return all((layout / o).exists() for o in stage_io(name, item).outs)


PRODUCED = ".lmcore/produced"
"""Per stage (and item), the cache key of the flow run that last wrote its outputs and a content
hash of those outputs (:func:`record_produced`)."""


def _produced(name: str, layout: Layout, item: str | None) -> Path:
    return layout / PRODUCED / f"{name}{f'@{item}' if item else ''}.json"


def _outputs_hash(name: str, layout: Layout, item: str | None) -> str:
    return fingerprint(*(layout / o for o in stage_io(name, item).outs))


def record_produced(name: str, params: Params, layout: Layout, item: str | None = None,
                    key: str | None = None) -> None:
    """After the flow ran stage ``name``: the outputs now on disk are those of cache key ``key``,
    the one computed when the stage started (None: computed now). A key computed at the end would
    stand for inputs or code changed while the stage ran (a checkout during a long training), and
    a later run with those would take outputs made from the earlier ones."""
    write_json(_produced(name, layout, item), {"key": key or cache_key(name, params, layout, item),
                                               "outputs": _outputs_hash(name, layout, item)})


def outputs_current(name: str, params: Params, layout: Layout, item: str | None = None) -> bool:
    """The outputs on disk are what the flow's run of the current cache key left: they exist, the
    flow last wrote them with these inputs, settings and code, and nothing has written them since
    (``dvc repro`` or ``lmcore <stage>`` with other settings). Otherwise the flow runs the stage
    instead of taking its result from Prefect's cache, which would leave the other run's files."""
    if not outputs_exist(name, layout, item):
        return False
    try:
        rec = json.loads(_produced(name, layout, item).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(rec, dict) and rec.get("key") == cache_key(name, params, layout, item)
            and rec.get("outputs") == _outputs_hash(name, layout, item))


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
    jobs over an orchestrator's workers; ``finetune`` takes ``task``, one item of its
    ``foreach``)."""
    return STAGES[name](params, layout, **options)
