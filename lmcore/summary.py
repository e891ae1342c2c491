"""The summary of one pipeline execution, read in ten seconds: each stage's time (or the run it
was reused from), the headline numbers beside their baselines, where the outputs are.

``make pipeline`` prints it after ``dvc repro`` (``lmcore summary``), the Prefect flow at its end.
Building it also records the execution in MLflow (:func:`lmcore.tracking.link_execution`): an
execution whose stages all came from a cache still gets its parent run, linked to the runs that
produced its outputs; after ``dvc repro``, each stage run that ran gets its ``dvc.lock`` entry
(:func:`lmcore.tracking.record_dvc_lock`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmcore.config import Params
from lmcore.core.layout import Layout
from lmcore.stages import pipeline_outputs
from lmcore.tracking import Execution, dataset_name, link_execution, open_client, reading_store, record_dvc_lock

REPORT = "runs/evaluate/report.md"


@dataclasses.dataclass
class Headline:
    what: str
    metric: str
    value: str
    baselines: list[str]


def headlines(report: Path) -> list[Headline]:
    """The rows of the evaluate stage's ``report.md`` (what, metric, model, baseline, kind),
    one :class:`Headline` per metric with all its baselines."""
    rows: dict[tuple[str, str], Headline] = {}
    for line in report.read_text(encoding="utf-8").splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5:
            continue
        what, metric, value, baseline, kind = cells
        h = rows.setdefault((what, metric), Headline(what, metric, value, []))
        if baseline:
            h.baselines.append(f"{kind} {baseline}")
    return list(rows.values())


def _seconds(run: Any) -> float | None:
    info = run.info
    return (info.end_time - info.start_time) / 1000 if info.end_time and info.start_time else None


def _stage_lines(execution: Execution, children: list[Any], outputs: dict[str, list[Path]]) -> Iterator[str]:
    by_stage: dict[str, Any] = {}
    for run in sorted(children, key=lambda r: r.info.start_time):
        tags = run.data.tags
        name = tags.get("lmcore.stage", "?") + (f"@{tags['lmcore.task']}" if "lmcore.task" in tags else "")
        by_stage[name] = run  # the latest run of a stage in this execution
    width = max(len(s) for s in outputs)
    for stage, paths in outputs.items():
        run = by_stage.get(stage)
        if run is not None:
            secs = _seconds(run)
            took = f"{secs:8.1f} s" if secs is not None else "    -     "
            yield f"  {stage:<{width}}  {took}  {run.info.status.lower()}"
            continue
        producers = [execution.producers.get(dataset_name(p)) for p in paths]
        if any(producers):
            src = producers[0] or next(p for p in producers if p)
            key = src.data.tags.get("lmcore.pipeline_key", "no pipeline")
            yield f"  {stage:<{width}}  {'reused':>10}  from run {src.info.run_id[:8]} ({key})"
        elif all(p.exists() for p in paths):
            yield f"  {stage:<{width}}  {'reused':>10}  (no MLflow run has these bytes)"
        else:
            yield f"  {stage:<{width}}  {'not run':>10}"


def summarize(params: Params, layout: Layout, key: str | None) -> str:
    """The summary text of execution ``key`` (None: the outputs only, no MLflow)."""
    outputs = pipeline_outputs(params, layout)
    lines: list[str] = []
    if key and not any(p.exists() for ps in outputs.values() for p in ps):
        # nothing ran here (or --pipeline in the wrong folder): no execution to record, and none
        # made up ("every stage reused") to become the newest
        lines.append(f"pipeline {key}: no stage output in {layout.root}, nothing recorded")
    elif params.tracking.enabled and key:
        execution = link_execution(params.tracking, key, [p for ps in outputs.values() for p in ps])
        client, experiment_id, uri = open_client(params.tracking)
        with reading_store(uri):  # a store failing now: named, no traceback
            parent = client.get_run(execution.parent_id)
            children = client.search_runs([experiment_id], max_results=1000,
                                          filter_string=f"tags.`mlflow.parentRunId` = '{execution.parent_id}'")
            if execution.current:  # today's dvc.lock is not an older execution's
                record_dvc_lock(client, parent, children, layout / "dvc.lock")
        took = _seconds(parent)
        state = "every stage reused" if execution.created else (
            f"{parent.info.status.lower()}" + (f", {took:.0f} s" if took is not None else ""))
        lines.append(f"pipeline {key}: {state}")
        lines += _stage_lines(execution, children, outputs)
        lines.append(f"MLflow: run {execution.parent_id} in experiment '{params.tracking.experiment}' at {uri}")
    else:
        lines.append("pipeline outputs (tracking off or no execution key: no stage times)")
    report = layout / REPORT
    if report.exists():
        lines.append("headline numbers (model, then baselines):")
        for h in headlines(report):
            base = f"  ({', '.join(h.baselines)})" if h.baselines else ""
            lines.append(f"  {h.what}, {h.metric}: {h.value}{base}")
    else:
        lines.append(f"no evaluation yet ({REPORT} is missing)")
    kept = [p.as_posix() for ps in outputs.values() for p in ps if p.exists()]
    lines.append("outputs: " + ", ".join(kept) if kept else "outputs: none yet")
    return "\n".join(lines)
