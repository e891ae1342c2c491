"""MLflow tracking: one run per stage, grouped under one parent run per pipeline execution.

Stages call :func:`stage_run` and the small methods of :class:`Tracker`; nothing else in lmcore
touches the MLflow API. A pipeline execution is identified by a *pipeline key*:

1. ``LMCORE_PIPELINE_RUN`` in the environment (set by ``make pipeline`` and by the Prefect flow);
2. otherwise, when the stage runs under ``dvc repro``/``dvc exp run``, the id and start time of
   that DVC process, so all stages of one ``dvc repro`` share a parent;
3. otherwise the stage's run stands alone.

The parent run is found by its ``lmcore.pipeline_key`` tag, or created by the first stage. It spans
the execution: each stage sets it RUNNING when it starts and FINISHED (with that end time) or
FAILED when it ends, so after the last stage its status and end time are the execution's.

Lineage: every stage run records the git commit (and whether the tree had uncommitted changes
besides ``dvc.lock``), the sha256 of the params file, the host and process that ran it, and what
it read and wrote as MLflow dataset inputs with their content digests (:meth:`Tracker.inputs`,
:meth:`Tracker.outputs`).

A run whose process died without closing it (SIGKILL, a lost machine) is closed as KILLED by the
next stage that starts on the same host, and so is its pipeline's parent run.

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
import dataclasses
import hashlib
import json
import logging
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import filelock
import psutil
import yaml

from lmcore.config import TrackingConfig
from lmcore.core.errors import StageError
from lmcore.core.io import sha256_file

log = logging.getLogger(__name__)

PIPELINE_ENV = "LMCORE_PIPELINE_RUN"
KEY_TAG = "lmcore.pipeline_key"
EXPERIMENT_KIND = "mlflow.experimentKind"  # read by the MLflow UI to pick its layout


def _mlflow():
    """The mlflow module, imported at the first use: it takes ~2 s to import, and a stage with
    ``tracking.enabled: false`` never loads it."""
    import mlflow  # lazy: see the docstring

    return mlflow


def _start_ticks(proc: Any) -> str:
    """When ``proc`` started, the same in every process that asks: on Linux the raw start time in
    clock ticks since boot (``/proc/<pid>/stat``); psutil's ``create_time`` adds the boot time,
    which moves when the wall clock is stepped (seen: 21 s between two stages of one
    ``dvc repro`` on a VM), so two stages of one execution got two keys."""
    try:
        stat = Path(f"/proc/{proc.pid}/stat").read_text()
        return stat[stat.rindex(")") + 2 :].split()[19]  # field 22: starttime
    except (OSError, ValueError, IndexError):
        return str(int(proc.create_time()))


def _dvc_ancestor_key() -> str | None:
    try:
        proc = psutil.Process().parent()
        while proc is not None:
            cmd = proc.cmdline()
            exe = Path(cmd[0]).name if cmd else ""
            if exe == "dvc" or (len(cmd) > 1 and (Path(cmd[1]).name == "dvc" or cmd[1:3] == ["-m", "dvc"])):
                return f"dvc-{socket.gethostname()}-{proc.pid}-{_start_ticks(proc)}"
            proc = proc.parent()
    except (psutil.Error, OSError):
        return None
    return None


def pipeline_key() -> str | None:
    """The key that groups this stage with the other stages of the same execution."""
    return os.environ.get(PIPELINE_ENV) or _dvc_ancestor_key()


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_tags() -> dict[str, str]:
    """``lmcore.git_commit`` and ``lmcore.git_dirty`` ("true" when tracked files other than
    ``dvc.lock``, which the pipeline itself rewrites, differ from the commit) of the working
    directory's repository; empty outside a repository."""
    commit = _git("rev-parse", "HEAD")
    if not commit:
        return {}
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude,top)dvc.lock")
    return {"lmcore.git_commit": commit, "lmcore.git_dirty": "unknown" if status is None else str(bool(status)).lower()}


def _process_tags() -> dict[str, str]:
    me = psutil.Process()
    return {"lmcore.host": socket.gethostname(), "lmcore.pid": str(me.pid),
            "lmcore.pid_started": _start_ticks(me)}


def _alive(pid: str | None, started: str | None) -> bool:
    """Whether the process that opened a run on this host still runs (same pid, same start)."""
    try:
        proc = psutil.Process(int(pid or ""))
        if started is None:
            return True
        if "." in started:  # written by an older lmcore: psutil's create_time
            return abs(proc.create_time() - float(started)) < 0.05
        return _start_ticks(proc) == started
    except (ValueError, psutil.Error):
        return False


def close_stale_runs(client: Any, experiment_id: str) -> list[str]:
    """Close as KILLED the RUNNING stage runs of this host whose process is gone, and their
    pipeline's parent run; return their ids."""
    host = socket.gethostname()
    where = f"attributes.status = 'RUNNING' and tags.`lmcore.host` = '{host}' and tags.`lmcore.kind` = 'stage'"
    closed = []
    for run in client.search_runs([experiment_id], filter_string=where, max_results=1000):
        tags = run.data.tags
        if _alive(tags.get("lmcore.pid"), tags.get("lmcore.pid_started")):
            continue
        client.set_tag(run.info.run_id, "lmcore.closed_as_killed_by_pid", str(os.getpid()))
        client.set_terminated(run.info.run_id, "KILLED")
        closed.append(run.info.run_id)
        parent = tags.get("mlflow.parentRunId")
        if parent and client.get_run(parent).info.status == "RUNNING":
            client.set_terminated(parent, "KILLED")
    if closed:
        print(f"lmcore: closed {len(closed)} MLflow run(s) left RUNNING by a process that is gone (now KILLED): "
              f"{', '.join(closed)}", file=sys.stderr, flush=True)
    return closed


def _errors() -> tuple[type[BaseException], ...]:
    """What a tracking store raises when it fails (unreachable, refused, timed out, locked)."""
    import requests  # lazy: loaded with mlflow, only when a stage tracks
    import sqlalchemy.exc  # lazy: as above
    from mlflow.exceptions import MlflowException  # lazy: as above

    return MlflowException, requests.exceptions.RequestException, sqlalchemy.exc.SQLAlchemyError, OSError


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:240]}{'...' if len(text) > 240 else ''}"


@contextlib.contextmanager
def reading_store(uri: str) -> Iterator[None]:
    """Around a command's reads of the tracking store at ``uri``: a store that fails (an unknown
    scheme, unreachable, refused) is a :class:`StageError` naming it, not a traceback."""
    try:
        yield
    except _errors() as e:
        raise StageError(f"the tracking store {uri} did not answer: {_short(e)}; check the URI "
                         "(--tracking-uri, or tracking.tracking_uri in the params file) and that its server runs") from e


class Tracker:
    """Logging helpers for one stage run, through an ``MlflowClient`` bound to its run. With
    ``active=False`` every method does nothing (tracking disabled, or a non-main process of a
    distributed run). The first failure of the store prints one warning and turns it off."""

    def __init__(self, active: bool, client: Any = None, uri: str = "") -> None:
        self.active = active
        self.client = client
        self.uri = uri
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.registry = False
        """Final models go to the model registry (``tracking.registry.enabled``)."""
        self.lost: str | None = None
        """Why tracking stopped in the middle of the stage (None while it works)."""
        self.logged_through: dict[str, int] = {}
        """Per metric, the last step a continued run already holds: a resumed stage runs the steps
        after its checkpoint again (the same values: resuming is bitwise identical), and those up
        to this one are not logged twice."""

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
        clean = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()
                 if v is not None and (step is None or step > self.logged_through.get(k, -1))]
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

    def model(self, folder: Path, name: str, metrics: dict[str, float], metric: str, goal: str,
              step: int = 0) -> None:
        """Log ``folder`` (a final model) as an MLflow logged model of this run with ``metrics``
        logged at ``step`` and linked to it (they are also the run's metrics: the caller does not
        log them again), and register it as a new version of ``name`` with the alias
        ``candidate``; the registered model remembers which ``metric`` ``lmcore promote`` compares
        and its ``goal`` (minimize or maximize). Without a registry: the metrics and the folder
        as a plain run artifact ``model``."""
        if not self.active:
            return
        if not self.registry:
            self.metrics(metrics, step=step)
            self.artifact(folder, "model")
            return
        self._call(self._register, folder, name, metrics, metric, goal, step)

    def _register(self, folder: Path, name: str, metrics: dict[str, float], metric: str, goal: str,
                  step: int) -> None:
        from mlflow.entities import LoggedModelOutput, Metric  # lazy: mlflow loads only when a stage tracks
        from mlflow.exceptions import MlflowException  # lazy: as above

        c = self.client
        resumed, earlier = self._registered_by_resumed_run(name)
        if earlier:  # a finished training run again (resumed at its end): the same weights, the same version
            self.metrics(metrics, step=step)
            c.set_tag(self.run_id, "lmcore.model_version", earlier)
            print(f"lmcore: {earlier} already holds this model (registered by run {resumed}); "
                  "not registered again", file=sys.stderr, flush=True)
            return
        lm = c.create_logged_model(self.experiment_id, name=name, source_run_id=self.run_id,
                                   model_type="lmcore", tags={"lmcore.registered_name": name})
        c.log_model_artifacts(lm.model_id, str(folder))
        c.finalize_logged_model(lm.model_id, "READY")
        now = int(time.time() * 1000)
        c.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step, model_id=lm.model_id)
                                          for k, v in metrics.items() if v is not None], synchronous=True)
        c.log_outputs(self.run_id, [LoggedModelOutput(lm.model_id, step)])  # the run's "Logged models"
        try:
            c.create_registered_model(name, tags={"lmcore.metric": metric, "lmcore.goal": goal})
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            # the metric promotion compares on is the one of the latest settings (tracking.registry)
            c.set_registered_model_tag(name, "lmcore.metric", metric)
            c.set_registered_model_tag(name, "lmcore.goal", goal)
        mv = c.create_model_version(name, source=lm.artifact_location, run_id=self.run_id, model_id=lm.model_id,
                                    # the sql registry keeps no model_id of its own: a tag holds it
                                    tags={metric: str(metrics.get(metric)), "lmcore.model_id": lm.model_id})
        c.set_registered_model_alias(name, "candidate", mv.version)
        c.set_tag(self.run_id, "lmcore.model_version", f"models:/{name}/{mv.version}")
        print(f"lmcore: registered {name} version {mv.version} (alias candidate; {metric} {metrics.get(metric)}); "
              f"lmcore promote {name} compares it with the champion", file=sys.stderr, flush=True)

    def _registered_by_resumed_run(self, name: str) -> tuple[str, str]:
        """The finished run this run resumes (``lmcore.resumes_run``) and the ``models:/<name>/<version>``
        it registered; ``""`` for the version where it registered none under ``name`` (or is gone)."""
        from mlflow.exceptions import MlflowException  # lazy: mlflow loads only when a stage tracks

        resumed = self.client.get_run(self.run_id).data.tags.get("lmcore.resumes_run", "")
        if not resumed:
            return "", ""
        try:
            version = self.client.get_run(resumed).data.tags.get("lmcore.model_version", "")
        except MlflowException:  # that run is no longer in the store
            return resumed, ""
        return resumed, version if version.startswith(f"models:/{name}/") else ""

    def export_model(self, folder: Path, source: Path) -> None:
        """Log ``folder`` (a Hugging Face export of the model in ``source``) as an MLflow logged
        model of this run and attach it to the registered version of ``source`` (found through
        the run that wrote those bytes): tag ``lmcore.hf_model_id`` on the version, so
        ``models:/<name>@<alias>`` downloads as a folder ``transformers`` loads. Without a
        registry, or when ``source`` was registered by no run: a plain run artifact ``export``."""
        if not self.active:
            return
        if not self.registry:
            self.artifact(folder, "export")
            return
        self._call(self._attach_export, Path(folder), Path(source))

    def _attach_export(self, folder: Path, source: Path) -> None:
        from mlflow.entities import LoggedModelOutput  # lazy: mlflow loads only when a stage tracks

        c = self.client
        run = producer_of(c, self.experiment_id, dataset_name(source), data_digest(source)["sha256"][:32])
        version = run.data.tags.get("lmcore.model_version") if run else None
        if not version:
            print(f"lmcore: {dataset_name(source)} was registered by no tracked run: its export is a plain artifact "
                  f"of this run, not attached to a registered model", file=sys.stderr, flush=True)
            self.artifact(folder, "export")
            return
        name, number = version.removeprefix("models:/").rsplit("/", 1)
        lm = c.create_logged_model(self.experiment_id, name=f"{name}-hf", source_run_id=self.run_id,
                                   model_type="transformers-llama", tags={"lmcore.export_of": version})
        c.log_model_artifacts(lm.model_id, str(folder))
        c.finalize_logged_model(lm.model_id, "READY")
        c.log_outputs(self.run_id, [LoggedModelOutput(lm.model_id, 0)])
        c.set_model_version_tag(name, number, "lmcore.hf_model_id", lm.model_id)
        c.set_tag(self.run_id, "lmcore.model_version", version)
        print(f"lmcore: the Hugging Face export of {name} version {number} is attached to it "
              f"(lmcore download {version} DIR --hf)", file=sys.stderr, flush=True)

    def datasets(self, paths: Sequence[str | Path], context: str) -> None:
        """Log files or folders as MLflow datasets of this run (``context``: ``input`` or
        ``output``), each with its content digest (:func:`data_digest`); an output's digest is
        also a tag ``lmcore.output.<name>``, so the run that produced a folder is found by its
        digest (:func:`producer_of`)."""
        if not (self.active and paths):
            return
        from mlflow.entities import DatasetInput, InputTag  # lazy: mlflow loads only when a stage tracks

        found = [dataset_entity(Path(p)) for p in paths if Path(p).exists()]
        inputs = [DatasetInput(d, [InputTag("mlflow.data.context", context)]) for d in found]
        self._call(self.client.log_inputs, self.run_id, datasets=inputs)
        if context == "output":
            for d in found:
                self._call(self.client.set_tag, self.run_id, f"lmcore.output.{d.name}", d.digest)


def dataset_name(path: Path) -> str:
    """A dataset's name: its path relative to the working directory (the project folder) when it
    lies inside it (``data/tokens``), else its absolute path."""
    path = path.absolute()
    try:
        return path.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return path.as_posix()


_FILE_SHA: dict[tuple[str, int, int], str] = {}


def _file_sha(f: Path) -> str:
    """sha256 of a file, remembered by path, size and modification time: a stage that logs a
    folder and a folder inside it (``data/raw``, ``data/raw/corpus``) reads each file once."""
    st = f.stat()
    key = (str(f.absolute()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_SHA:
        _FILE_SHA[key] = sha256_file(f)
    return _FILE_SHA[key]


def data_digest(path: Path) -> dict[str, Any]:
    """The content digest of a file or folder: the sha256 of its files' relative names and
    bytes (the hash :func:`lmcore.core.io.fingerprint` gives), its file count and size."""
    files = sorted(x for x in path.rglob("*") if x.is_file() and "__pycache__" not in x.parts) \
        if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        h.update(_file_sha(f).encode())
    return {"sha256": h.hexdigest(), "files": len(files), "bytes": sum(f.stat().st_size for f in files)}


def dataset_entity(path: Path) -> Any:
    """An MLflow ``Dataset`` for a file or folder: name :func:`dataset_name`, digest the first 32
    hex digits of its sha256 (MLflow keeps 36 characters), profile the whole digest and, where
    ``dvc.lock`` lists it, DVC's md5."""
    from mlflow.entities import Dataset  # lazy: mlflow loads only when a stage tracks

    name = dataset_name(path)
    profile = data_digest(path)
    md5 = dvc_lock_hashes().get(name)
    if md5:
        profile["dvc_md5"] = md5
    return Dataset(name=name, digest=profile["sha256"][:32], source_type="local",
                   source=json.dumps({"uri": path.absolute().as_posix()}), profile=json.dumps(profile))


def dvc_lock_hashes(lock: Path = Path("dvc.lock")) -> dict[str, str]:
    """``{path: md5}`` of every output ``dvc.lock`` records (empty without one)."""
    try:
        data = yaml.safe_load(lock.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}
    out: dict[str, str] = {}
    for entry in (data.get("stages") or {}).values():
        for o in (entry or {}).get("outs") or []:
            if isinstance(o, dict) and o.get("path") and o.get("md5"):
                out[str(o["path"])] = str(o["md5"])
    return out


def record_dvc_lock(client: Any, parent: Any, children: Sequence[Any], lock: Path) -> list[str]:
    """Attach ``dvc.lock``'s entry of each stage that ran in this execution to its MLflow run
    (artifact ``dvc.lock/<stage>.yaml``, tag ``lmcore.dvc_lock_sha256``) and the whole file to the
    parent run. Only a ``dvc.lock`` written during the execution counts (a Prefect run leaves an
    older one as it was). Returns the stages recorded."""
    try:
        if lock.stat().st_mtime * 1000 < parent.info.start_time:
            return []
        entries = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError):
        return []
    done = []
    for run in children:
        tags = run.data.tags
        stage = tags.get("lmcore.stage", "") + (f"@{tags['lmcore.task']}" if "lmcore.task" in tags else "")
        if stage not in entries or run.info.status != "FINISHED":
            continue
        text = yaml.safe_dump({stage: entries[stage]}, sort_keys=False)
        client.log_text(run.info.run_id, text, f"dvc.lock/{stage}.yaml")
        client.set_tag(run.info.run_id, "lmcore.dvc_lock_sha256", hashlib.sha256(text.encode()).hexdigest())
        done.append(stage)
    client.log_text(parent.info.run_id, lock.read_text(encoding="utf-8"), "dvc.lock")
    return done


def producer_of(client: Any, experiment_id: str, name: str, digest: str) -> Any | None:
    """The latest FINISHED stage run that wrote ``name`` with this digest, or None."""
    where = f"tags.`lmcore.output.{name}` = '{digest}' and attributes.status = 'FINISHED'"
    found = client.search_runs([experiment_id], filter_string=where, max_results=1,
                               order_by=["attributes.start_time DESC"])
    return found[0] if found else None


def _param_value(v: Any) -> str:
    s = str(v)
    return s if len(s) <= 6000 else s[:5997] + "..."


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI (None for a server)."""
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def resolved_uri(cfg: TrackingConfig) -> str:
    """The tracking URI with a relative sqlite path made absolute, so subprocesses agree on the
    database: from the DVC repository's root under DVC (``$DVC_ROOT``: ``dvc exp run --temp`` and
    queued experiments run their stages in a copy DVC deletes afterwards, with their database),
    else from the working directory."""
    db = sqlite_file(cfg.tracking_uri)
    if db is None or db.is_absolute():
        return cfg.tracking_uri
    return "sqlite:///" + str((Path(os.environ.get("DVC_ROOT") or ".") / db).resolve())


def _store_lock(uri: str) -> contextlib.AbstractContextManager:
    """A lock that serialises the first use of a sqlite store by several processes (MLflow's
    schema migration is not safe to run twice at once); a server needs none."""
    db = sqlite_file(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        return filelock.FileLock(str(db) + ".lock", timeout=600)
    return contextlib.nullcontext()


def http_settings(cfg: TrackingConfig) -> None:
    """MLflow's HTTP client reads its retry policy from the environment: a failing server is
    given up on after ``request_retries`` retries (waits 1, 2, 4... s), not MLflow's default of
    7 retries over about four minutes."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(cfg.request_retries)
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(cfg.request_timeout)


def artifact_root(uri: str) -> str | None:
    """Where a new experiment of a sqlite store keeps its artifacts: ``mlruns/`` beside the
    database, wherever the process that creates it runs (MLflow's default is ``./mlruns`` of the
    working directory). None for a server, which has its own artifact root."""
    db = sqlite_file(uri)
    return None if db is None else (db.parent / "mlruns").resolve().as_uri()


def _experiment_id(client: Any, name: str) -> str:
    from mlflow.exceptions import MlflowException  # lazy: mlflow loads only when a stage tracks

    exp = client.get_experiment_by_name(name)
    if exp is not None and exp.lifecycle_stage == "deleted":
        raise StageError(f"experiment '{name}' (tracking.experiment) is deleted in the tracking store: restore it "
                         f"(mlflow experiments restore --experiment-id {exp.experiment_id}, or the UI's trash) or "
                         "name another")
    if exp is not None:
        if EXPERIMENT_KIND not in exp.tags:  # made before lmcore set it (or by hand): a user's own choice stays
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND, "custom_model_development")
        return exp.experiment_id
    try:
        # the UI's "Model training" view (runs, charts, models), not the GenAI one (traces, judges)
        return client.create_experiment(name, artifact_location=artifact_root(client.tracking_uri),
                                        tags={EXPERIMENT_KIND: "custom_model_development"})
    except MlflowException as e:  # created by another stage in the meantime
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(name).experiment_id


def _parent_run_id(client: Any, key: str, experiment_id: str, tags: dict[str, str]) -> str:
    """The parent run of execution ``key``, created (RUNNING, with ``tags``) by its first stage."""
    where = f"tags.`{KEY_TAG}` = '{key}' and tags.`lmcore.kind` = 'pipeline'"
    order = ["attributes.start_time ASC"]
    found = client.search_runs([experiment_id], filter_string=where, max_results=1, order_by=order)
    if found:
        return found[0].info.run_id
    tags = {**tags, KEY_TAG: key, "mlflow.runName": f"pipeline {key}", "lmcore.kind": "pipeline"}
    run = client.create_run(experiment_id, tags=tags)
    # two stages of one execution that started at once on a server may both have created one:
    # every stage keeps the earliest, and a later creator deletes its own
    first = client.search_runs([experiment_id], filter_string=where, max_results=1, order_by=order)[0]
    if first.info.run_id != run.info.run_id:
        client.delete_run(run.info.run_id)
    return first.info.run_id


def _continued(client: Any, experiment_id: str, run_id: str, tags: dict[str, str]) -> Any | None:
    """Run ``run_id`` reopened for a resumed stage, or None when the store does not hold it."""
    from mlflow.exceptions import MlflowException  # lazy: mlflow loads only when a stage tracks

    try:
        old = client.get_run(run_id)
    except MlflowException:
        return None
    if old.info.experiment_id != experiment_id or old.info.lifecycle_stage != "active":
        return None
    if old.info.status == "FINISHED":  # that training ended: a rerun from its last checkpoint is a run of its own
        return None
    before = old.data.tags.get("mlflow.parentRunId")
    if before and before != tags.get("mlflow.parentRunId"):
        tags = {**tags, "lmcore.resumed_from_parent": before}
        if client.get_run(before).info.status == "RUNNING":  # the execution it was part of ended there
            client.set_terminated(before, "KILLED")
    for k, v in tags.items():
        client.set_tag(run_id, k, v)
    client.update_run(run_id, status="RUNNING")
    print(f"lmcore: continuing MLflow run {run_id} (the run this stage resumes)", file=sys.stderr, flush=True)
    return client.get_run(run_id)


def _system_monitor(run_id: str, uri: str, interval: int, resumed: bool) -> Any:
    """MLflow's system-metrics monitor on a thread, logging to ``run_id`` every ``interval``
    seconds (a continued run goes on from its last system-metrics step)."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor  # lazy: with mlflow

    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, resume_logging=resumed, tracking_uri=uri)
    monitor.start()
    return monitor


def params_file_tags(cfg: TrackingConfig) -> dict[str, str]:
    """``lmcore.params_file`` and ``lmcore.params_sha256`` of the settings file ``cfg`` was read
    from (:func:`lmcore.config.load`); empty for settings built in code."""
    path = cfg.params_file
    if path is None or not path.is_file():
        return {}
    return {"lmcore.params_file": str(path), "lmcore.params_sha256": sha256_file(path)}


@contextlib.contextmanager
def stage_run(
    stage: str, cfg: TrackingConfig, params: dict[str, Any] | None = None, active: bool = True,
    run_name: str | None = None, tags: dict[str, str] | None = None,
    inputs: Sequence[str | Path] = (), outputs: Sequence[str | Path] = (), resume: str | None = None,
    system_metrics: bool = False,
) -> Iterator[Tracker]:
    """Open the MLflow run of one stage (a child of the pipeline's parent run) and yield a
    :class:`Tracker`. ``inputs`` (files or folders the stage reads) are logged as dataset inputs
    when the run opens, ``outputs`` when the block ends without error. The run is marked FAILED
    if the block raises. A stage that runs once per item (``finetune``: one run per task) passes
    its own ``run_name`` and ``tags``.

    ``resume``: the id of this stage's run that an interrupted execution left (a pretraining run
    resumed from its checkpoint): that run is continued (RUNNING again, moved under this
    execution's parent; params it holds are kept, new ones added, changed ones recorded as
    ``lmcore.resume.<key>`` tags), so one training is one run and one loss curve. A run that the
    store does not hold is not continued: a new run is opened, tagged ``lmcore.resumes_run``.

    ``system_metrics``: MLflow's system-metrics monitor samples the machine every
    ``cfg.system_metrics_interval`` seconds into this run while the block runs (the training
    stages)."""
    if not (cfg.enabled and active):
        yield Tracker(False)
        return
    mlflow = _mlflow()

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = resolved_uri(cfg)
    if uri.startswith(("http://", "https://")):
        http_settings(cfg)
    key = pipeline_key()
    provenance = {**git_tags(), **params_file_tags(cfg)}
    tags = {**(tags or {}), **provenance, **_process_tags(), "lmcore.stage": stage, "lmcore.kind": "stage",
            "mlflow.runName": run_name or stage}
    parent = None
    try:
        with _store_lock(uri):
            client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)  # a new sqlite store is migrated here
            experiment_id = _experiment_id(client, cfg.experiment)
            if key:
                parent = _parent_run_id(client, key, experiment_id, provenance)
                tags["mlflow.parentRunId"] = parent
                tags[KEY_TAG] = key
        run = _continued(client, experiment_id, resume, tags) if resume else None
        if run is None:
            if resume:
                tags["lmcore.resumes_run"] = resume
            run = client.create_run(experiment_id, run_name=run_name or stage, tags=tags)
        close_stale_runs(client, experiment_id)
        if parent:
            client.update_run(parent, status="RUNNING")
    except _errors() as e:
        raise StageError(f"the tracking store {uri} (tracking.tracking_uri) did not answer: {_short(e)}; start it "
                         "(lmcore tracking-server), correct the URI, or set tracking.enabled: false") from e
    tracker = Tracker(True, client, uri)
    tracker.run_id = run.info.run_id
    if resume and run.info.run_id == resume:  # continued: what it logged before the interruption
        tracker._call(lambda: tracker.logged_through.update(
            {k: max((m.step for m in client.get_metric_history(resume, k)), default=-1) for k in run.data.metrics}))
    tracker.experiment_id = experiment_id
    tracker.registry = cfg.registry.enabled
    monitor = _system_monitor(tracker.run_id, uri, cfg.system_metrics_interval, resumed=bool(run.data.params)) \
        if system_metrics and cfg.system_metrics_interval > 0 else None
    status = "FAILED"
    try:
        if params:
            held = run.data.params
            changed = {k: v for k, v in params.items() if k in held and held[k] != _param_value(v)}
            tracker.params({k: v for k, v in params.items() if k not in held})
            for k, v in changed.items():
                tracker._call(client.set_tag, tracker.run_id, f"lmcore.resume.{k}", _param_value(v))
            tracker.json(params, f"config/{stage}.json")
        if not run.data.params:  # a continued run logged its inputs when it opened
            tracker.datasets(inputs, "input")
        yield tracker
        tracker.datasets(outputs, "output")
        status = "FINISHED"
    finally:
        if monitor is not None:
            monitor.finish()
        if tracker.lost is not None:
            _close_after_loss(client, [tracker.run_id, parent], status)
        tracker._call(client.set_terminated, tracker.run_id, status)
        if parent:  # the execution's status and end time follow its stages
            tracker._call(lambda: client.set_terminated(parent, _execution_status(client, experiment_id, parent,
                                                                                  status)))


def _execution_status(client: Any, experiment_id: str, parent: str, status: str) -> str:
    """The status of execution ``parent`` as a stage ends with ``status``: FAILED while the last
    try of any of its stages failed or was killed (``dvc repro --keep-going`` goes on after a
    failed stage: the one after it finishing must not make the execution FINISHED), else
    ``status``."""
    if status != "FINISHED":
        return status
    last: dict[tuple[str, str], Any] = {}
    for r in client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'",
                                max_results=1000):
        key = (r.data.tags.get("lmcore.stage", ""), r.data.tags.get("lmcore.task", ""))
        if key not in last or (r.info.start_time or 0) > (last[key].info.start_time or 0):
            last[key] = r
    return "FAILED" if any(r.info.status in ("FAILED", "KILLED") for r in last.values()) else status


def _close_after_loss(client: Any, run_ids: list[str | None], status: str) -> None:
    """One more try, without retries, to close the runs of a stage whose tracking failed midway
    (the store may answer again): else they stayed RUNNING, to be closed as KILLED by a later stage
    on this machine, or never on a server used from elsewhere."""
    saved = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        for run_id in filter(None, run_ids):
            client.set_terminated(run_id, status)
    except _errors():
        pass  # still down: a later stage closes them (close_stale_runs)
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
        else:
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = saved


@dataclasses.dataclass
class Execution:
    """What :func:`link_execution` found: the execution's parent run and, per output, the run
    that produced it as it is now (None: no run with that digest)."""

    parent_id: str
    created: bool
    """The parent run was created now: no stage of this execution ran (every output reused)."""
    producers: dict[str, Any]
    """``{output name: Run or None}``."""
    uri: str
    current: bool = True
    """The newest execution: the outputs on disk may be recorded as its own. An older one is only
    read (``lmcore summary --pipeline <older key>`` must not rewrite its record with today's files)."""


def open_client(cfg: TrackingConfig, existing: bool = False, experiment: bool = True) -> tuple[Any, str, str]:
    """``(MlflowClient, experiment id, URI)`` of ``cfg``'s store, creating a new store (sqlite)
    or the experiment under the same lock as a stage; with ``existing`` (a command that only reads
    what stages logged) a missing sqlite file, or a missing experiment where ``experiment`` is
    needed, is a :class:`StageError` instead, and nothing is created (the registry is the
    store's, not an experiment's: without ``experiment`` the id is ""). Raises
    :class:`StageError` when the store does not answer."""
    mlflow = _mlflow()
    uri = resolved_uri(cfg)
    if uri.startswith(("http://", "https://")):
        http_settings(cfg)
    nothing_logged = "no stage has logged there yet (or tracking.tracking_uri / --params names another store)"
    db = sqlite_file(uri)
    if existing and db is not None and not db.is_file():
        raise StageError(f"{db}: no tracking database: {nothing_logged}")
    try:
        with _store_lock(uri):
            client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
            if existing and not experiment:
                return client, "", uri
            if existing:
                exp = client.get_experiment_by_name(cfg.experiment)
                if exp is None:
                    raise StageError(f"no experiment '{cfg.experiment}' (tracking.experiment) in the tracking store "
                                     f"{uri}: {nothing_logged}")
                return client, exp.experiment_id, uri
            return client, _experiment_id(client, cfg.experiment), uri
    except _errors() as e:
        raise StageError(f"the tracking store {uri} (tracking.tracking_uri) did not answer: {_short(e)}") from e


def find_parent(client: Any, experiment_id: str, key: str) -> Any | None:
    if "'" in key:  # MLflow's filter strings cannot quote it
        raise StageError(f"pipeline key {key!r}: a key cannot hold a quote (') (--pipeline, ${PIPELINE_ENV})")
    where = f"tags.`{KEY_TAG}` = '{key}' and tags.`lmcore.kind` = 'pipeline'"
    found = client.search_runs([experiment_id], filter_string=where, max_results=1,
                               order_by=["attributes.start_time ASC"])
    return found[0] if found else None


def is_newest_execution(client: Any, experiment_id: str, parent_id: str) -> bool:
    """``parent_id`` is the pipeline parent run started last in the experiment."""
    newest = client.search_runs([experiment_id], filter_string="tags.`lmcore.kind` = 'pipeline'", max_results=1,
                                order_by=["attributes.start_time DESC"])
    return not newest or newest[0].info.run_id == parent_id


def link_execution(cfg: TrackingConfig, key: str, outputs: Sequence[Path]) -> Execution:
    """Give execution ``key`` its parent run even when every stage came from a cache (a no-op
    ``dvc repro``, a Prefect run of cached tasks), and tag it with the run that produced each of
    ``outputs`` as it is now (``lmcore.produced_by.<name>``: a run of this execution or of an
    earlier one, found by the output's digest), so every execution is findable and says where
    its outputs came from."""
    client, experiment_id, uri = open_client(cfg)
    try:
        with _store_lock(uri):
            parent = find_parent(client, experiment_id, key)
            created = parent is None
            parent_id = (_parent_run_id(client, key, experiment_id, {**git_tags(), **params_file_tags(cfg)})
                         if created else parent.info.run_id)
        current = created or is_newest_execution(client, experiment_id, parent_id)
        producers: dict[str, Any] = {}
        for path in outputs:
            if not path.exists():
                continue
            name = dataset_name(path)
            run = producer_of(client, experiment_id, name, data_digest(path)["sha256"][:32])
            producers[name] = run
            if current:
                client.set_tag(parent_id, f"lmcore.produced_by.{name}", run.info.run_id if run else "unknown")
        if created:
            client.set_tag(parent_id, "lmcore.cached", "true")
            client.set_terminated(parent_id, "FINISHED")
    except _errors() as e:
        raise StageError(f"the tracking store {uri} (tracking.tracking_uri) did not answer: {_short(e)}") from e
    return Execution(parent_id, created, producers, uri, current)


def promote(cfg: TrackingConfig, name: str, version: str | None = None) -> tuple[bool, str]:
    """Move the alias ``champion`` of registered model ``name`` to ``version`` (default: the
    ``candidate``) when it beats the current champion on the metric the model was registered
    with (``lmcore.metric``, ``lmcore.goal``), or when there is none; return whether it moved and
    why, in one sentence."""
    from mlflow.exceptions import MlflowException  # lazy: mlflow loads only when a command reads runs

    client, _, uri = open_client(cfg, existing=True, experiment=False)
    try:
        model = client.get_registered_model(name)
        mv = (client.get_model_version(name, version) if version
              else client.get_model_version_by_alias(name, "candidate"))
        champion = client.get_model_version_by_alias(name, "champion") if "champion" in model.aliases else None
    except MlflowException as e:
        raise StageError(f"{name}{' version ' + version if version else '@candidate'}: not in the model registry at "
                         f"{uri} ({_short(e)})") from None
    metric, goal = model.tags.get("lmcore.metric", "val_bpb"), model.tags.get("lmcore.goal", "minimize")

    def value(v: Any) -> float:
        model_id = v.model_id or v.tags.get("lmcore.model_id")
        try:
            linked = {m.key: m.value for m in (client.get_logged_model(model_id).metrics or [])} if model_id else {}
            got = linked[metric] if metric in linked else client.get_run(v.run_id).data.metrics.get(metric)
        except MlflowException as e:  # its run deleted (mlflow gc), say
            raise StageError(f"{name} version {v.version}: its run {v.run_id} cannot be read ({_short(e)})") from None
        if got is None:
            raise StageError(f"{name} version {v.version}: its run {v.run_id} has no metric {metric}")
        return float(got)

    new = value(mv)
    if champion is None and math.isnan(new):
        return False, f"{name} version {mv.version} is not promoted: its {metric} is NaN (a diverged run?)"
    if champion is None:
        client.set_registered_model_alias(name, "champion", mv.version)
        return True, f"{name} version {mv.version} is now champion ({metric} {new:.4f}; there was none)"
    if champion.version == mv.version:
        return False, f"{name} version {mv.version} is already champion ({metric} {new:.4f})"
    old = value(champion)
    # a NaN metric ranks below every number: a diverged champion is replaced, a diverged candidate never wins
    better = not math.isnan(new) and (math.isnan(old) or (new < old if goal == "minimize" else new > old))
    way = "lower" if goal == "minimize" else "higher"
    cmp = f"{metric} {new:.4f} against {old:.4f} of version {champion.version} ({way} is better)"
    if not better:
        held = "stays candidate" if "candidate" in (mv.aliases or []) else "is not promoted"
        return False, f"{name} version {mv.version} {held}: {cmp}"
    client.set_registered_model_alias(name, "champion", mv.version)
    return True, f"{name} version {mv.version} is now champion: {cmp}"


def model_uri_parts(uri: str) -> tuple[str, str, bool]:
    """``(name, alias or version, is an alias)`` of ``models:/<name>@<alias>`` or
    ``models:/<name>/<version>``; anything else is a :class:`StageError`."""
    name, sep, ref = uri.removeprefix("models:/").partition("@")
    if not sep:
        name, _, ref = name.rpartition("/")
    if not uri.startswith("models:/") or not name or not ref:
        raise StageError(f"{uri}: expected models:/<name>@<alias> or models:/<name>/<version>")
    return name, ref, bool(sep)


def download_model(cfg: TrackingConfig, uri: str, dst: Path, hf: bool = False) -> Path:
    """The folder of a registered model, ``models:/<name>@<alias>`` or ``models:/<name>/<version>``,
    downloaded into ``dst``: lmcore's model folder, or with ``hf`` the Hugging Face export the
    export stage attached to that version (``transformers`` loads it; it holds the tokenizer)."""
    name, ref, alias = model_uri_parts(uri)
    try:
        dst.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file where a folder is needed, no permission
        raise StageError(f"{dst}: cannot be the folder to download into ({e.strerror or e})") from None
    mlflow = _mlflow()
    client, _, store = open_client(cfg, existing=True, experiment=False)
    try:
        # the version's files are found through this store's registry here: MLflow's models:/ download
        # asks the process's default registry (./mlflow.db), whatever registry_uri it is given
        mv = client.get_model_version_by_alias(name, ref) if alias else client.get_model_version(name, ref)
        if hf:
            model_id = mv.tags.get("lmcore.hf_model_id")
            if not model_id:
                raise StageError(f"{uri} (version {mv.version}) has no Hugging Face export: run the export stage on "
                                 f"that model (lmcore export) with tracking on")
            source = client.get_logged_model(model_id).artifact_location
        else:
            source = client.get_model_version_download_uri(name, mv.version)
    except _errors() as e:
        raise StageError(f"{uri}: not found in the model registry at {store} ({_short(e)})") from None
    try:
        got = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst), tracking_uri=store))
        if not any(p.is_file() for p in got.rglob("*")):  # MLflow only logs "No artifacts found" and returns
            raise StageError(f"{uri}: registered, but its files are missing from the store's artifacts "
                             f"(nothing downloaded): was the artifact folder deleted or garbage-collected?")
        return got
    except _errors() as e:
        raise StageError(f"{uri}: version {mv.version}'s files could not be downloaded from {source} "
                         f"({_short(e)})") from None
