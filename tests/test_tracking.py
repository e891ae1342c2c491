"""Tracking on the default sqlite store: several stages starting at once on a new database, and a
store that does not answer (real MLflow, real processes)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import BIN, mlflow_runs, run_env

from lmcore.tracking import PIPELINE_ENV

WRITER = """
import sys
from lmcore.config import TrackingConfig
from lmcore.tracking import stage_run
cfg = TrackingConfig(tracking_uri=sys.argv[1], experiment=sys.argv[2])
with stage_run(sys.argv[3], cfg, {"which": sys.argv[3]}) as tr:
    tr.metrics({"m": 1.0})
    tr.json({"which": sys.argv[3]}, "which.json")
"""


def start_stages(uri: str, experiment: str, names: list[str], key: str,
                 cwd: Path | None = None) -> list[subprocess.CompletedProcess]:
    """One process per name, all started at once, each opening a stage run of pipeline ``key``."""
    env = {**run_env(), PIPELINE_ENV: key}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, uri, experiment, n], env=env, stdout=subprocess.PIPE, cwd=cwd,
                              stderr=subprocess.PIPE, text=True) for n in names]
    return [subprocess.CompletedProcess(p.args, p.wait(120), *p.communicate()) for p in procs]


def check_one_pipeline_of(runs: list, names: list[str], key: str) -> None:
    parents = [r for r in runs if r.data.tags.get("lmcore.kind") == "pipeline"]
    assert [p.data.tags["lmcore.pipeline_key"] for p in parents] == [key]
    stages = [r for r in runs if r.data.tags.get("lmcore.kind") == "stage"]
    assert sorted(r.data.params["which"] for r in stages) == sorted(names)
    assert {r.data.tags["mlflow.parentRunId"] for r in stages} == {parents[0].info.run_id}
    assert all(r.info.status == "FINISHED" and r.data.metrics == {"m": 1.0} for r in stages)


def test_four_stages_start_at_once_on_a_new_sqlite_store(tmp_path):
    db = tmp_path / "new" / "mlflow.db"
    names = ["prepare", "clean", "tokenizer", "encode"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = start_stages(f"sqlite:///{db}", "lmcore-test", names, "four-at-once", cwd=elsewhere)
    assert [d.returncode for d in done] == [0, 0, 0, 0], [d.stderr[-2000:] for d in done]
    check_one_pipeline_of(mlflow_runs(db), names, "four-at-once")
    # the artifacts sit beside the database, not in ./mlruns of the processes' working directory
    logged = [json.loads(p.read_text())["which"] for p in (db.parent / "mlruns").rglob("which.json")]
    assert sorted(logged) == sorted(names)
    assert list(elsewhere.iterdir()) == []


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on (bound once, closed again)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_tracking_server_that_does_not_answer_stops_the_stage_before_it_writes(tiny_project):
    params = yaml.safe_load((tiny_project / "params.yaml").read_text())
    url = f"http://127.0.0.1:{free_port()}"
    params["tracking"].update(tracking_uri=url, request_retries=0, request_timeout=5)
    (tiny_project / "params.yaml").write_text(yaml.safe_dump(params))
    out = subprocess.run([str(BIN / "lmcore"), "prepare"], cwd=tiny_project, env=run_env(), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith("lmcore prepare: error:")]
    assert len(lines) == 1 and url in lines[0] and "tracking.enabled: false" in lines[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not Path(tiny_project / "data/raw").exists() and not Path(tiny_project / "metrics/prepare.json").exists()


def test_promote_ranks_a_nan_metric_below_every_number(tmp_path):
    """`new < old` is false both ways when one side is NaN: a diverged champion could never be
    replaced, and a diverged first version became champion."""
    import math

    from mlflow import MlflowClient

    from lmcore.config import TrackingConfig
    from lmcore.tracking import promote

    cfg = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/m.db")
    client = MlflowClient(cfg.tracking_uri)
    client.create_registered_model("m")
    exp = client.create_experiment("e", artifact_location=str(tmp_path / "artifacts"))

    def version(val_bpb: float) -> str:
        run = client.create_run(exp)
        client.log_metric(run.info.run_id, "val_bpb", val_bpb)
        client.set_terminated(run.info.run_id)
        return client.create_model_version("m", str(tmp_path), run.info.run_id).version

    first = version(math.nan)
    moved, why = promote(cfg, "m", first)
    assert not moved and "NaN" in why
    second = version(2.0)
    assert promote(cfg, "m", second)[0]
    assert not promote(cfg, "m", version(math.nan))[0]
    client.set_registered_model_alias("m", "champion", first)  # a diverged champion
    assert promote(cfg, "m", version(3.0))[0]
    assert client.get_model_version_by_alias("m", "champion").version != first


def test_promote_compares_on_the_metric_of_the_latest_registration(tmp_path):
    """Changing tracking.registry.base_metric was ignored: the registered model kept the metric
    of its first version, and a version worse on the new metric was promoted."""
    from mlflow import MlflowClient

    from lmcore.config import TrackingConfig
    from lmcore.tracking import promote, stage_run

    cfg = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/m.db", experiment="e")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    for metrics, metric in (({"val_bpb": 2.0, "val_loss": 1.0}, "val_bpb"), ({"val_bpb": 1.9, "val_loss": 1.5}, "val_loss")):
        with stage_run("pretrain", cfg, {}) as tr:
            tr.model(folder, "m-base", metrics, metric, "minimize")
        assert tr.lost is None
    client = MlflowClient(cfg.tracking_uri)
    assert client.get_registered_model("m-base").tags["lmcore.metric"] == "val_loss"
    assert promote(cfg, "m-base", "1")[0]  # the first becomes champion
    moved, why = promote(cfg, "m-base", "2")
    assert not moved and "val_loss" in why  # worse on val_loss, though better on val_bpb


def test_runs_whose_tracking_failed_midway_are_closed_when_the_store_answers_again(tmp_path, monkeypatch):
    """After one failed call the stage went on untracked and left its run and the parent RUNNING."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from lmcore.config import TrackingConfig
    from lmcore.tracking import stage_run

    monkeypatch.setenv(PIPELINE_ENV, "k1")
    cfg = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/m.db", experiment="e")
    with stage_run("prepare", cfg, {}) as tr:
        real = tr.client.log_batch
        calls = []

        def fails_once(*args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                raise MlflowException("the store went away for a moment")
            return real(*args, **kwargs)

        monkeypatch.setattr(tr.client, "log_batch", fails_once)
        tr.metrics({"m": 1.0})
        assert tr.lost is not None and not tr.active
    runs = MlflowClient(cfg.tracking_uri).search_runs([tr.experiment_id])
    assert sorted((r.data.tags["lmcore.kind"], r.info.status) for r in runs) == [
        ("pipeline", "FINISHED"), ("stage", "FINISHED")]


def test_an_execution_stays_failed_while_the_last_try_of_a_stage_failed(tmp_path, monkeypatch):
    """Under dvc repro --keep-going a stage after a failed one finishing set the execution
    FINISHED; a successful retry of the failed stage does make it FINISHED."""
    import pytest
    from mlflow import MlflowClient

    from lmcore.config import TrackingConfig
    from lmcore.tracking import find_parent, stage_run

    monkeypatch.setenv(PIPELINE_ENV, "keep-going")
    cfg = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/m.db", experiment="e")
    client = MlflowClient(cfg.tracking_uri)

    def parent_status() -> str:
        exp = client.get_experiment_by_name("e").experiment_id
        return client.get_run(find_parent(client, exp, "keep-going").info.run_id).info.status

    with pytest.raises(RuntimeError), stage_run("clean", cfg, {}):
        raise RuntimeError("a bad document")
    assert parent_status() == "FAILED"
    with stage_run("export", cfg, {}):  # another branch of the pipeline goes on
        pass
    assert parent_status() == "FAILED"
    with stage_run("clean", cfg, {}):  # the failed stage again, fixed
        pass
    assert parent_status() == "FINISHED"


def test_a_deleted_experiment_is_named_with_how_to_restore_it(tmp_path):
    """Every stage failed with "the tracking store did not answer: ... must be in the 'active' state"."""
    import pytest
    from mlflow import MlflowClient

    from lmcore.config import TrackingConfig
    from lmcore.core.errors import StageError
    from lmcore.tracking import stage_run

    cfg = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/m.db", experiment="gone")
    client = MlflowClient(cfg.tracking_uri)
    client.delete_experiment(client.create_experiment("gone"))
    with pytest.raises(StageError, match=r"experiment 'gone' \(tracking.experiment\) is deleted .* experiments restore"):
        with stage_run("prepare", cfg, {}):
            pass


def test_a_relative_sqlite_store_under_dvc_is_the_repository_s(tmp_path, monkeypatch):
    """dvc exp run --temp (and queued experiments) run stages in a copy DVC deletes afterwards:
    their runs went to a database deleted with it."""
    from lmcore.config import TrackingConfig
    from lmcore.tracking import resolved_uri

    temp = tmp_path / "repo/.dvc/tmp/exps/standalone/tmp1"
    temp.mkdir(parents=True)
    monkeypatch.chdir(temp)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "repo"))
    assert resolved_uri(TrackingConfig()) == f"sqlite:///{tmp_path / 'repo/mlflow.db'}"
    monkeypatch.delenv("DVC_ROOT")
    assert resolved_uri(TrackingConfig()) == f"sqlite:///{temp / 'mlflow.db'}"


def test_an_older_execution_is_read_not_rewritten(tmp_path):
    """`lmcore summary --pipeline <older key>` tagged the older execution with the producers of
    today's outputs (and attached today's dvc.lock and report to it)."""
    from mlflow import MlflowClient

    from lmcore.config import TrackingConfig
    from lmcore.tracking import link_execution

    cfg = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/m.db", experiment="e")
    a, b = tmp_path / "data/a", tmp_path / "data/b"
    a.mkdir(parents=True)
    (a / "x.txt").write_text("a")
    first = link_execution(cfg, "k1", [a])
    b.mkdir()
    (b / "y.txt").write_text("b")
    second = link_execution(cfg, "k2", [a, b])
    again = link_execution(cfg, "k1", [a, b])
    assert first.current and second.current and not again.current and again.parent_id == first.parent_id
    client = MlflowClient(cfg.tracking_uri)
    tags = client.get_run(first.parent_id).data.tags
    assert [t for t in tags if t.startswith("lmcore.produced_by.")] == [f"lmcore.produced_by.{a}"]
    assert f"lmcore.produced_by.{b}" in client.get_run(second.parent_id).data.tags
