"""MLflow tracking: one run per stage, grouped under one parent run per pipeline execution.

Stages call :func:`stage_run` and the small methods of :class:`Tracker`; nothing else in lmcore
touches the MLflow API. A pipeline execution is identified by a *pipeline key*:

1. ``LMCORE_PIPELINE_RUN`` in the environment (set by ``make pipeline`` and by the Prefect flow);
2. otherwise, when the stage runs under ``dvc repro``/``dvc exp run``, the id and start time of
   that DVC process, so all stages of one ``dvc repro`` share a parent;
3. otherwise the stage's run stands alone.

The parent run is found by its ``lmcore.pipeline_key`` tag, or created by the first stage.

The store is the same for every backend: a local sqlite file (the default) or a tracking server
over HTTP (``lmcore tracking-server``: MLflow on PostgreSQL). Several stages may start at once
against a new store: on sqlite a file lock beside the database serialises the first use (MLflow's
schema migration, the experiment, the parent run); on a server a second creator of the
experiment reads it back, and of two parent runs created at once for one key the earlier is kept.

Tracking failures: a store that does not answer when a stage starts stops the stage before it
does anything (a :class:`StageError` naming the URI). A store lost in the middle of a stage (after
``tracking.request_retries`` retries) does not: the stage goes on, its outputs are written, and
one warning says that its MLflow run is incomplete.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import filelock
import psutil

from lmcore.config import TrackingConfig
from lmcore.core.errors import StageError

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


def _errors() -> tuple[type[BaseException], ...]:
    """What a tracking store raises when it fails (unreachable, refused, timed out, locked)."""
    import requests  # lazy: loaded with mlflow, only when a stage tracks
    import sqlalchemy.exc  # lazy: as above
    from mlflow.exceptions import MlflowException  # lazy: as above

    return MlflowException, requests.exceptions.RequestException, sqlalchemy.exc.SQLAlchemyError, OSError


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:240]}{'...' if len(text) > 240 else ''}"


class Tracker:
    """Logging helpers for one stage run, through an ``MlflowClient`` bound to its run. With
    ``active=False`` every method does nothing (tracking disabled, or a non-main process of a
    distributed run). The first failure of the store prints one warning and turns it off."""

    def __init__(self, active: bool, client: Any = None, uri: str = "") -> None:
        self.active = active
        self.client = client
        self.uri = uri
        self.run_id: str | None = None
        self.lost: str | None = None
        """Why tracking stopped in the middle of the stage (None while it works)."""

    def _call(self, fn, *args, **kwargs) -> None:
        if not self.active:
            return
        try:
            fn(*args, **kwargs)
        except _errors() as e:
            self._lose(e)

    def _lose(self, e: BaseException) -> None:
        self.active = False
        self.lost = _short(e)
        print(f"lmcore: warning: tracking at {self.uri} failed ({self.lost}); the stage goes on untracked and "
              f"writes its outputs as usual; MLflow run {self.run_id} is incomplete", file=sys.stderr, flush=True)

    def params(self, params: dict[str, Any]) -> None:
        if not self.active:
            return
        from mlflow.entities import Param  # lazy: mlflow loads only when a stage tracks

        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self._call(self.client.log_batch, self.run_id, params=items[i : i + 100], synchronous=True)

    def metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.active:
            return
        from mlflow.entities import Metric  # lazy: mlflow loads only when a stage tracks

        now = int(time.time() * 1000)
        clean = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        for i in range(0, len(clean), 1000):  # MLflow caps a batch at 1,000 metrics
            self._call(self.client.log_batch, self.run_id, metrics=clean[i : i + 1000], synchronous=True)

    def artifact(self, path: str | Path, folder: str | None = None) -> None:
        if not self.active:
            return
        path = Path(path)
        if path.is_dir():
            self._call(self.client.log_artifacts, self.run_id, str(path), artifact_path=folder)
        else:
            self._call(self.client.log_artifact, self.run_id, str(path), artifact_path=folder)

    def json(self, obj: dict[str, Any], name: str) -> None:
        if not self.active:
            return
        self._call(self.client.log_dict, self.run_id, obj, name)


def _param_value(v: Any) -> str:
    s = str(v)
    return s if len(s) <= 6000 else s[:5997] + "..."


def resolved_uri(cfg: TrackingConfig) -> str:
    """The tracking URI with a relative sqlite path made absolute, so subprocesses agree on the
    database."""
    uri = cfg.tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    return uri


def _store_lock(uri: str) -> contextlib.AbstractContextManager:
    """A lock that serialises the first use of a sqlite store by several processes (MLflow's
    schema migration is not safe to run twice at once); a server needs none."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        db.parent.mkdir(parents=True, exist_ok=True)
        return filelock.FileLock(str(db) + ".lock", timeout=600)
    return contextlib.nullcontext()


def _http_settings(cfg: TrackingConfig) -> None:
    """MLflow's HTTP client reads its retry policy from the environment: a failing server is
    given up on after ``request_retries`` retries (waits 1, 2, 4... s), not MLflow's default of
    7 retries over about four minutes."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(cfg.request_retries)
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(cfg.request_timeout)


def _experiment_id(client: Any, name: str) -> str:
    from mlflow.exceptions import MlflowException  # lazy: mlflow loads only when a stage tracks

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException as e:  # created by another stage in the meantime
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def _parent_run_id(client: Any, key: str, experiment_id: str) -> str:
    where = f"tags.`{KEY_TAG}` = '{key}' and tags.`lmcore.kind` = 'pipeline'"
    order = ["attributes.start_time ASC"]
    found = client.search_runs([experiment_id], filter_string=where, max_results=1, order_by=order)
    if found:
        return found[0].info.run_id
    tags = {KEY_TAG: key, "mlflow.runName": f"pipeline {key}", "lmcore.kind": "pipeline"}
    commit = _git_commit()
    if commit:
        tags["lmcore.git_commit"] = commit
    run = client.create_run(experiment_id, tags=tags)
    client.set_terminated(run.info.run_id, "FINISHED")
    # two stages of one execution that started at once on a server may both have created one:
    # every stage keeps the earliest, and a later creator deletes its own
    first = client.search_runs([experiment_id], filter_string=where, max_results=1, order_by=order)[0]
    if first.info.run_id != run.info.run_id:
        client.delete_run(run.info.run_id)
    return first.info.run_id


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

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = resolved_uri(cfg)
    if uri.startswith(("http://", "https://")):
        _http_settings(cfg)
    key = pipeline_key()
    tags = {**(tags or {}), "lmcore.stage": stage, "lmcore.kind": "stage", "mlflow.runName": run_name or stage}
    commit = _git_commit()
    if commit:
        tags["lmcore.git_commit"] = commit
    try:
        with _store_lock(uri):
            client = mlflow.MlflowClient(tracking_uri=uri)  # a new sqlite store is created (migrated) here
            experiment_id = _experiment_id(client, cfg.experiment)
            if key:
                tags["mlflow.parentRunId"] = _parent_run_id(client, key, experiment_id)
                tags[KEY_TAG] = key
        run = client.create_run(experiment_id, run_name=run_name or stage, tags=tags)
    except _errors() as e:
        raise StageError(f"the tracking store {uri} (tracking.tracking_uri) did not answer: {_short(e)}; start it "
                         "(lmcore tracking-server), correct the URI, or set tracking.enabled: false") from e
    tracker = Tracker(True, client, uri)
    tracker.run_id = run.info.run_id
    status = "FAILED"
    try:
        if params:
            tracker.params(params)
            tracker.json(params, f"config/{stage}.json")
        yield tracker
        status = "FINISHED"
    finally:
        tracker._call(client.set_terminated, tracker.run_id, status)
        if status == "FAILED" and key:  # the pipeline execution failed with this stage
            tracker._call(client.set_terminated, tags["mlflow.parentRunId"], "FAILED")
