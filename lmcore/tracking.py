"""MLflow tracking: one run per stage, grouped under one parent run per pipeline execution.

Stages call :func:`stage_run` and the small methods of :class:`Tracker`; nothing else in lmcore
touches the MLflow API. A pipeline execution is identified by a *pipeline key*:

1. ``LMCORE_PIPELINE_RUN`` in the environment (set by ``make pipeline`` and by the Prefect flow);
2. otherwise, when the stage runs under ``dvc repro``/``dvc exp run``, the id and start time of
   that DVC process, so all stages of one ``dvc repro`` share a parent;
3. otherwise the stage's run stands alone.

The parent run is found by its ``lmcore.pipeline_key`` tag, or created by the first stage.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from lmcore.config import TrackingConfig

log = logging.getLogger(__name__)

PIPELINE_ENV = "LMCORE_PIPELINE_RUN"
KEY_TAG = "lmcore.pipeline_key"


def _mlflow():
    """The mlflow module, imported at the first use: it takes ~2 s to import, and a stage with
    ``tracking.enabled: false`` never loads it."""
    import mlflow  # lazy: see the docstring

    return mlflow


def _dvc_ancestor_key() -> str | None:
    try:
        proc = psutil.Process().parent()
        while proc is not None:
            cmd = proc.cmdline()
            exe = Path(cmd[0]).name if cmd else ""
            if exe == "dvc" or (len(cmd) > 1 and (Path(cmd[1]).name == "dvc" or cmd[1:3] == ["-m", "dvc"])):
                return f"dvc-{socket.gethostname()}-{proc.pid}-{int(proc.create_time())}"
            proc = proc.parent()
    except (psutil.Error, OSError):
        return None
    return None


def pipeline_key() -> str | None:
    """The key that groups this stage with the other stages of the same execution."""
    return os.environ.get(PIPELINE_ENV) or _dvc_ancestor_key()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


class Tracker:
    """Logging helpers for one stage run. With ``active=False`` every method does nothing
    (tracking disabled, or a non-main process of a distributed run)."""

    def __init__(self, active: bool) -> None:
        self.active = active
        self.run_id: str | None = None

    def params(self, params: dict[str, Any]) -> None:
        if not self.active:
            return
        mlflow = _mlflow()

        items = list(params.items())
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            mlflow.log_params({k: _param_value(v) for k, v in items[i : i + 100]})

    def metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.active:
            return
        mlflow = _mlflow()

        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        if clean:
            mlflow.log_metrics(clean, step=step)

    def artifact(self, path: str | Path, folder: str | None = None) -> None:
        if not self.active:
            return
        mlflow = _mlflow()

        path = Path(path)
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=folder)
        else:
            mlflow.log_artifact(str(path), artifact_path=folder)

    def json(self, obj: dict[str, Any], name: str) -> None:
        if not self.active:
            return
        mlflow = _mlflow()

        mlflow.log_dict(obj, name)


def _param_value(v: Any) -> Any:
    s = str(v)
    return s if len(s) <= 6000 else s[:5997] + "..."


def _configure(cfg: TrackingConfig) -> None:
    mlflow = _mlflow()

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = cfg.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # make relative sqlite paths absolute so subprocesses agree on the database
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(cfg.experiment)


def _parent_run_id(key: str, experiment: str) -> str:
    mlflow = _mlflow()

    client = mlflow.MlflowClient()
    exp = mlflow.get_experiment_by_name(experiment)
    found = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{KEY_TAG}` = '{key}' and tags.`lmcore.kind` = 'pipeline'",
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    tags = {KEY_TAG: key, "mlflow.runName": f"pipeline {key}", "lmcore.kind": "pipeline"}
    commit = _git_commit()
    if commit:
        tags["lmcore.git_commit"] = commit
    run = client.create_run(exp.experiment_id, tags=tags)
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


@contextlib.contextmanager
def stage_run(
    stage: str, cfg: TrackingConfig, params: dict[str, Any] | None = None, active: bool = True,
    run_name: str | None = None, tags: dict[str, str] | None = None,
) -> Iterator[Tracker]:
    """Open the MLflow run of one stage (a child of the pipeline's parent run) and yield a
    :class:`Tracker`. The run is marked FAILED if the block raises. A stage that runs once per
    item (``finetune``: one run per task) passes its own ``run_name`` and ``tags``."""
    if not (cfg.enabled and active):
        yield Tracker(False)
        return
    mlflow = _mlflow()

    _configure(cfg)
    key = pipeline_key()
    tags = {**(tags or {}), "lmcore.stage": stage, "lmcore.kind": "stage"}
    if key:
        tags["mlflow.parentRunId"] = _parent_run_id(key, cfg.experiment)
        tags[KEY_TAG] = key
    commit = _git_commit()
    if commit:
        tags["lmcore.git_commit"] = commit
    tracker = Tracker(True)
    try:
        with mlflow.start_run(run_name=run_name or stage, tags=tags) as run:
            tracker.run_id = run.info.run_id
            if params:
                tracker.params(params)
                tracker.json(params, f"config/{stage}.json")
            yield tracker
    except BaseException:
        if key:  # the pipeline execution failed with this stage
            _mlflow().MlflowClient().set_terminated(tags["mlflow.parentRunId"], "FAILED")
        raise
