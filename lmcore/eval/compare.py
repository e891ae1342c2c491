"""``lmcore compare``: the pipeline runs of an MLflow experiment side by side (not a stage).

Each pipeline execution is one MLflow parent run with a child run per stage that ran
(:mod:`lmcore.tracking`); a stage run without a parent (a stage run by hand) counts as a run of its
own. For each run that pretrained, evaluated or fine-tuned, the table gathers:

- what was trained: the model shape, parameter count, tokenizer vocabulary, steps and learning
  rate (from the pretrain run's params; shape, vocabulary and steps also from the evaluate run's
  ``model.*`` params, when pretraining did not run in that execution), and the training
  throughput (``tokens_per_second_mean``);
- how good it is: pretrain's last ``val_bpb``, evaluate's ``lm.val_bpb`` and ``lm.<text>.bpb``
  for every held-out text, the GLUE score and every task's score.

Rows are sorted by ``--metric`` (default ``val_bpb``: evaluate's ``lm.val_bpb``, then, for runs
without it, pretrain's ``val_bpb``; lower is better, higher for scores and throughput). The
markdown table (``compare.md``) and a plot of pretrain's validation bits per byte against the step
for every run (``val_bpb.png``) are written atomically to ``--out`` (default ``runs/compare/``);
the table is printed too.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from lmcore.config import TrackingConfig
from lmcore.core.errors import StageError
from lmcore.core.io import atomic_path, write_text
from lmcore.data import glue
from lmcore.eval.bootstrap import bits_per_byte_stat, bits_per_byte_units, paired_bootstrap, same_windows
from lmcore.tracking import open_client, reading_store

STAGE_ORDER = ["prepare", "clean", "tokenizer", "encode", "pretrain", "export", "finetune", "evaluate"]
COMPARED = {"pretrain", "evaluate", "finetune"}  # a run shows up when one of these ran in it
HIGHER_IS_BETTER = re.compile(r"score|accuracy|(^|[._])acc(_norm)?$|f1|matthews|pearson|spearman|tokens_per_second|mfu")
PLOT_METRIC = "val_bpb"  # pretrain's stepped validation bits per byte
DEFAULT_METRIC = "val_bpb"
"""What the table is sorted by unless a metric is named: evaluate's bits per byte, else pretrain's."""


@dataclasses.dataclass
class PipelineRun:
    """One pipeline execution (a parent run and its stage runs), or one stage run on its own."""

    run_id: str
    name: str
    start: int
    """Start time, ms since the epoch."""
    status: str
    commit: str | None
    stages: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Stage name -> its MLflow run (the last finished one); ``finetune:<task>`` per task."""

    def metric(self, stage: str, key: str) -> float | None:
        run = self.stages.get(stage)
        return None if run is None else run.data.metrics.get(key)

    def param(self, stage: str, key: str) -> str | None:
        run = self.stages.get(stage)
        return None if run is None else run.data.params.get(key)

    def first(self, *sources: tuple[str, str, str]) -> Any:
        """The first value found among ``(kind, stage, key)`` sources (kind ``metric`` or ``param``)."""
        for kind, stage, key in sources:
            v = self.metric(stage, key) if kind == "metric" else self.param(stage, key)
            if v is not None and v != "None":
                return v
        return None

    @property
    def tasks(self) -> dict[str, float]:
        """Task -> score: the fine-tune runs' ``score``, else evaluate's ``<task>.score``."""
        out: dict[str, float] = {}
        ev = self.stages.get("evaluate")
        if ev is not None:
            out |= {k[: -len(".score")]: v for k, v in ev.data.metrics.items()
                    if k.endswith(".score") and not k.startswith(("glue.", "lm."))}
        for stage, run in self.stages.items():
            if stage.startswith("finetune:") and "score" in run.data.metrics:
                out[stage.split(":", 1)[1]] = run.data.metrics["score"]
        return out

    @property
    def texts(self) -> dict[str, float]:
        """Held-out text name -> evaluate's ``lm.<name>.bpb``."""
        ev = self.stages.get("evaluate")
        if ev is None:
            return {}
        return {m.group(1): v for k, v in ev.data.metrics.items() if (m := re.fullmatch(r"lm\.(.+)\.bpb", k))}


# ---------------------------------------------------------------------------------------------
# reading MLflow


def store_settings(tracking: TrackingConfig, experiment: str | None = None,
                   tracking_uri: str | None = None) -> TrackingConfig:
    """``tracking`` (the params file's settings: a server's retries and timeout) pointed at the
    experiment and store given on the command line, checked as the params file's would be."""
    given = {k: v for k, v in (("experiment", experiment), ("tracking_uri", tracking_uri)) if v is not None}
    try:
        return TrackingConfig(**{**tracking.model_dump(), **given})
    except ValueError as e:  # pydantic's ValidationError: only a value given here can be wrong
        err = e.errors()[0]
        key = str(err["loc"][0]) if err["loc"] else ""
        flag = "--" + key.replace("_", "-")
        raise StageError(f"{flag} {given.get(key)!r}: {err['msg'].removeprefix('Value error, ')}") from e


def read_client(tracking: TrackingConfig) -> Any:
    """An ``MlflowClient`` of ``tracking``'s store, opened as the stages open it (a relative
    sqlite path from the working directory; a server with ``tracking``'s retry settings); a
    missing sqlite file is an error (MLflow would create an empty database)."""
    return open_client(tracking, existing=True, experiment=False)[0]


def _all_runs(client, experiment_id: str) -> list[Any]:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token,
                                  order_by=["attributes.start_time DESC"])
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _newer(a: Any, b: Any | None) -> bool:
    """Whether run ``a`` should replace ``b`` for its stage: finished beats unfinished, then later."""
    if b is None:
        return True
    rank = (a.info.status == "FINISHED", a.info.start_time or 0)
    return rank > (b.info.status == "FINISHED", b.info.start_time or 0)


def pipeline_runs(client, experiment: str, limit: int | None = None, cached: bool = False) -> list[PipelineRun]:
    """The pipeline executions of ``experiment`` that pretrained, evaluated or fine-tuned, newest
    first, at most ``limit``; with ``cached``, also those that reused every output (no stage run
    of their own: their parent names the runs that made the outputs)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise StageError(f"no MLflow experiment '{experiment}' (experiments: {', '.join(names) or 'none'}): "
                         "give --experiment")
    runs = _all_runs(client, exp.experiment_id)
    groups: dict[str, PipelineRun] = {}
    for r in runs:
        if r.data.tags.get("lmcore.kind") == "pipeline":
            groups[r.info.run_id] = PipelineRun(r.info.run_id, r.info.run_name or r.info.run_id, r.info.start_time or 0,
                                                r.info.status, r.data.tags.get("lmcore.git_commit"))
    for r in runs:
        tags = r.data.tags
        stage = tags.get("lmcore.stage")
        if tags.get("lmcore.kind") != "stage" or stage is None:
            continue
        group = groups.get(tags.get("mlflow.parentRunId", ""))
        if group is None:  # a stage run on its own
            group = groups.setdefault(r.info.run_id, PipelineRun(
                r.info.run_id, r.info.run_name or stage, r.info.start_time or 0, r.info.status,
                tags.get("lmcore.git_commit")))
        key = f"{stage}:{tags['lmcore.task']}" if stage == "finetune" and "lmcore.task" in tags else stage
        if _newer(r, group.stages.get(key)):
            group.stages[key] = r
        group.commit = group.commit or tags.get("lmcore.git_commit")
    found = [g for g in groups.values() if any(s.split(":")[0] in COMPARED for s in g.stages)
             or cached and not g.stages]
    found.sort(key=lambda g: g.start, reverse=True)
    return found[:limit] if limit else found


# ---------------------------------------------------------------------------------------------
# the table


def logged_metrics(runs: list[PipelineRun]) -> list[str]:
    """Every ``<stage>.<metric>`` the stage runs of ``runs`` logged (``finetune:<task>.<metric>``
    for a task), sorted: what ``--metric`` can name."""
    return sorted({f"{stage}.{key}" for r in runs for stage, run in r.stages.items() for key in run.data.metrics})


def metric_value(run: PipelineRun, metric: str) -> tuple[int, float] | None:
    """``(source rank, value)`` of ``metric`` for ``run``: ``<stage>.<key>`` names one stage's
    metric (``finetune:<task>.<key>`` one task's); a bare name is looked up in evaluate (``NAME``,
    then ``lm.NAME``), then pretrain, then the other stages. The rank sorts runs measured by the
    same source together."""
    stage, _, key = metric.partition(".")
    if key and (v := run.metric(stage, key)) is not None:
        return 0, v
    sources = [(0, "evaluate", metric), (0, "evaluate", f"lm.{metric}"), (1, "pretrain", metric)]
    sources += [(2, s, metric) for s in sorted(run.stages) if s not in ("evaluate", "pretrain")]
    for rank, stage, key in sources:
        v = run.metric(stage, key)
        if v is not None:
            return rank, v
    return None


def sort_runs(runs: list[PipelineRun], metric: str) -> list[PipelineRun]:
    """Best first by ``metric`` (see :func:`metric_value`); runs without it last, newest first."""
    sign = -1.0 if HIGHER_IS_BETTER.search(metric) else 1.0

    def key(r: PipelineRun) -> tuple:
        v = metric_value(r, metric)
        if v is None or not math.isfinite(v[1]):  # a diverged run's NaN: with the runs without it
            return (1, 0, 0.0, -r.start)
        return (0, v[0], sign * v[1], -r.start)

    return sorted(runs, key=key)


def _num(v: Any, digits: int = 4) -> str:
    if v is None:
        return ""
    try:
        x = float(v)
    except (TypeError, ValueError):
        return str(v)
    if x != x:  # NaN
        return "nan"
    if x.is_integer() and abs(x) >= 1000:
        return f"{int(x):,}"
    return f"{x:.{digits}f}"


def _int(v: Any) -> str:
    return "" if v is None else f"{int(float(v)):,}"


def _utc(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc).strftime("%Y-%m-%d %H:%M")


def _millions(v: Any) -> str:
    return "" if v is None else f"{float(v) / 1e6:.2f}M"


def _model(r: PipelineRun) -> str:
    def get(field: str) -> Any:
        return r.first(("param", "pretrain", f"pretrain.model.{field}"), ("param", "evaluate", f"model.{field}"))

    layers, width, heads, kv, ctx = (get(f) for f in ("n_layer", "n_embd", "n_head", "n_kv_heads", "block_size"))
    if layers is None or width is None:
        return ""
    h = f"{heads}/{kv}" if kv not in (None, heads) else f"{heads}"
    return f"{layers}x{width}, {h} heads, ctx {ctx}"


Column = tuple[str, Callable[[PipelineRun], str]]


def columns(runs: list[PipelineRun]) -> list[Column]:
    """The table's columns; those empty for every run are dropped."""
    cols: list[Column] = [
        ("run", lambda r: r.name.removeprefix("pipeline ")),
        ("started (UTC)", lambda r: _utc(r.start)),
        ("commit", lambda r: (r.commit or "")[:8]),
        ("status", lambda r: r.status),
        ("model", _model),
        ("params", lambda r: _millions(r.first(("param", "pretrain", "n_params"),
                                                ("param", "evaluate", "model.n_params")))),
        ("vocab", lambda r: _int(r.first(("param", "tokenizer", "tokenizer.vocab_size"),
                                         ("param", "evaluate", "tokenizer.vocab_size"),
                                         ("metric", "tokenizer", "vocab_size")))),
        ("steps", lambda r: _int(r.first(("param", "pretrain", "pretrain.max_steps"),
                                         ("param", "evaluate", "model.steps")))),
        ("lr", lambda r: r.param("pretrain", "pretrain.lr") or ""),
        ("tokens/s", lambda r: _int(r.first(("metric", "pretrain", "tokens_per_second_mean"),
                                            ("metric", "pretrain", "tokens_per_second")))),
        ("pretrain val bpb", lambda r: _num(r.metric("pretrain", "val_bpb"))),
        ("val bpb", lambda r: _num(r.metric("evaluate", "lm.val_bpb"))),
    ]
    texts = sorted({t for r in runs for t in r.texts})
    cols += [(f"{t} bpb", lambda r, t=t: _num(r.texts.get(t))) for t in texts]
    cols.append(("GLUE", lambda r: _num(r.metric("evaluate", "glue.score"))))
    tasks = sorted({t for r in runs for t in r.tasks})
    cols += [(t, lambda r, t=t: _num(r.tasks.get(t))) for t in tasks]
    return [(name, get) for name, get in cols if any(get(r) for r in runs)]


def markdown_table(runs: list[PipelineRun]) -> str:
    cols = columns(runs)
    lines = ["| # | " + " | ".join(name for name, _ in cols) + " |",
             "|---:|" + "|".join("---" for _ in cols) + "|"]
    for i, r in enumerate(runs, 1):
        lines.append(f"| {i} | " + " | ".join(get(r).replace("|", "\\|") for _, get in cols) + " |")
    return "\n".join(lines) + "\n"


def describe_order(metric: str) -> str:
    better = "higher" if HIGHER_IS_BETTER.search(metric) else "lower"
    stage, _, key = metric.partition(".")
    if key and stage.split(":")[0] in STAGE_ORDER:  # finetune:<task> too
        return f"Sorted by the {stage} run's `{key}`, {better} is better first."
    return (f"Sorted by evaluate's `{metric}` (or `lm.{metric}`), {better} is better first; then the runs without "
            f"it, by pretrain's `{metric}`; runs with neither last.")


# ---------------------------------------------------------------------------------------------
# the plot


def plot_histories(client, runs: list[PipelineRun], path: Path) -> int:
    """Pretrain's validation bits per byte against the step, one line per run (numbered as in the
    table), as a PNG written atomically; returns the number of lines drawn."""
    import matplotlib  # lazy: ~0.5 s to import; only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: ~0.5 s to import; only the plot needs it

    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    drawn = 0
    for i, r in enumerate(runs, 1):
        pre = r.stages.get("pretrain")
        if pre is None:
            continue
        history = sorted((m.step, m.value) for m in client.get_metric_history(pre.info.run_id, PLOT_METRIC))
        if not history:
            continue
        steps, values = zip(*history)
        ax.plot(steps, values, marker="o", markersize=3, label=f"{i}. {r.name.removeprefix('pipeline ')}"[:60])
        drawn += 1
    ax.set_xlabel("step")
    ax.set_ylabel("validation bits per byte")
    ax.set_title("pretrain validation bits per byte")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no pretrain run logged val_bpb", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return drawn


# ---------------------------------------------------------------------------------------------
# entry points


@dataclasses.dataclass
class CompareResult:
    table: str
    """The markdown table."""
    markdown: Path
    plot: Path
    runs: list[PipelineRun]
    """In table order."""
    plotted: int
    """Runs drawn in the plot (those whose pretrain run logged ``val_bpb``)."""


def compare(tracking: TrackingConfig, metric: str | None = None, out: Path = Path("runs/compare"),
            limit: int | None = 20) -> CompareResult:
    """Compare the last ``limit`` pipeline runs of ``tracking.experiment``, best first by ``metric``
    (default :data:`DEFAULT_METRIC`; one that no run logged is an error, where it was asked for);
    write ``out/compare.md`` and ``out/val_bpb.png``."""
    experiment = tracking.experiment
    with reading_store(tracking.tracking_uri):
        client = read_client(tracking)
        runs = pipeline_runs(client, experiment, limit)
    if not runs:
        raise StageError(f"experiment '{experiment}' has no run that pretrained, evaluated or fine-tuned")
    if metric is None:
        metric = DEFAULT_METRIC
    elif all(metric_value(r, metric) is None for r in runs):
        raise StageError(f"--metric {metric}: none of the {len(runs)} run(s) logged it; they logged: "
                         + ", ".join(logged_metrics(runs)))
    runs = sort_runs(runs, metric)
    table = markdown_table(runs)
    out = Path(out)
    md = (f"# Runs of experiment `{experiment}`\n\n{describe_order(metric)} Plot: `val_bpb.png` "
          f"(pretrain validation bits per byte against step, numbered as here).\n\n{table}")
    write_text(out / "compare.md", md)
    plotted = plot_histories(client, runs, out / "val_bpb.png")
    return CompareResult(table, out / "compare.md", out / "val_bpb.png", runs, plotted)


# ---------------------------------------------------------------------------------------------
# two runs: a difference or noise


def _find(runs: list[PipelineRun], what: str) -> PipelineRun:
    for r in runs:
        if what in (r.run_id, r.name, r.name.removeprefix("pipeline ")) or any(
                s.info.run_id == what for s in r.stages.values()):
            return r
    raise StageError(f"{what}: no pipeline run (key, parent run id or stage run id) in this experiment")


def _stage(client, run: PipelineRun, key: str, output: str) -> Any | None:
    """The stage run ``key`` of ``run``, or the run that produced ``output`` when the execution
    reused it from a cache (its parent's ``lmcore.produced_by.<output>`` tag)."""
    if key in run.stages:
        return run.stages[key]
    produced = client.get_run(run.run_id).data.tags.get(f"lmcore.produced_by.{output}")
    return client.get_run(produced) if produced and produced != "unknown" else None


def _artifact(client, run: Any, name: str, tmp: Path) -> Any | None:
    from mlflow.exceptions import MlflowException  # lazy: as compare()

    try:
        path = client.download_artifacts(run.info.run_id, name, str(tmp))
    except (MlflowException, OSError):
        return None
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _task_stat(spec: Any, table: dict[str, Any]) -> tuple[list[int], Any]:
    """The units (every validation example of every split) as each split's size, and the task
    score of a resample (resampled within each split: :func:`paired_bootstrap`'s ``strata``)."""
    splits = list(table["splits"])
    sizes = [len(table["splits"][s]["labels"]) for s in splits]
    offsets = np.cumsum([0] + sizes)
    preds = {s: np.asarray(table["splits"][s]["predictions"], dtype=float) for s in splits}
    labels = {s: np.asarray(table["splits"][s]["labels"], dtype=float) for s in splits}

    def stat(idx: Any) -> float:
        p, y = {}, {}
        for k, s in enumerate(splits):
            local = idx[(idx >= offsets[k]) & (idx < offsets[k + 1])] - offsets[k]
            p[s], y[s] = preds[s][local].tolist(), labels[s][local].tolist()
        return glue.task_score(spec, glue.evaluate_splits(spec, p, y))

    return sizes, stat


def noise(tracking: TrackingConfig, a: str, b: str, resamples: int = 2000,
          confidence: float = 0.95) -> list[str]:
    """Whether run ``b`` differs from run ``a`` beyond noise: a paired bootstrap
    (:mod:`lmcore.eval.bootstrap`) of validation bits per byte over the evaluate stage's windows
    and of each task's score over its validation examples. One line per metric (or why it could
    not be tested)."""
    with reading_store(tracking.tracking_uri), tempfile.TemporaryDirectory() as tmp:
        client = read_client(tracking)
        runs = pipeline_runs(client, tracking.experiment, cached=True)  # a no-op execution's outputs came from a cache
        ra, rb = _find(runs, a), _find(runs, b)
        lines = [f"{ra.name} ({ra.run_id[:8]}) -> {rb.name} ({rb.run_id[:8]}): b - a, paired bootstrap"]
        ea, eb = (_stage(client, r, "evaluate", "runs/evaluate") for r in (ra, rb))
        wa = _artifact(client, ea, "windows.json", Path(tmp) / "a") if ea else None
        wb = _artifact(client, eb, "windows.json", Path(tmp) / "b") if eb else None
        if wa is None or wb is None:
            lines.append("validation bits per byte: not tested (an evaluate run without windows.json: "
                         "evaluate.document_level off, or made before lmcore logged it)")
        elif not same_windows(wa, wb):
            lines.append("validation bits per byte: not tested (the runs scored different windows: another "
                         "tokenizer, context or validation split; compare lm.val_bpb directly)")
        else:
            (ua, unit), (ub, _) = bits_per_byte_units(wa), bits_per_byte_units(wb)  # the same documents
            lines.append(paired_bootstrap("validation bits per byte (document level)", bits_per_byte_stat(ua),
                                          bits_per_byte_stat(ub), len(ua["nll"]), unit, resamples,
                                          confidence).line())
        tasks = sorted({k.split(":", 1)[1] for r in (ra, rb) for k in r.stages if k.startswith("finetune:")})
        for task in tasks:
            fa, fb = (_stage(client, r, f"finetune:{task}", f"runs/finetune/{task}") for r in (ra, rb))
            pa = _artifact(client, fa, "validation_predictions.json", Path(tmp) / f"a-{task}") if fa else None
            pb = _artifact(client, fb, "validation_predictions.json", Path(tmp) / f"b-{task}") if fb else None
            if pa is None or pb is None:
                lines.append(f"{task} score: not tested (a fine-tuning run without validation_predictions.json)")
                continue
            if [pa["splits"][s]["labels"] for s in pa["splits"]] != [pb["splits"][s]["labels"] for s in pb["splits"]]:
                lines.append(f"{task} score: not tested (the runs were validated on different examples)")
                continue
            spec = glue.TaskSpec.from_dict(pa["task"], f"validation_predictions.json of {task}")
            sizes, stat_a = _task_stat(spec, pa)
            _, stat_b = _task_stat(spec, pb)
            lines.append(paired_bootstrap(f"{task} score", stat_a, stat_b, sum(sizes), "validation examples",
                                          resamples, confidence, strata=sizes).line())
    return lines
