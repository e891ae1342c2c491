"""Tracking on the default sqlite store: several stages starting at once on a new database, and a
store that does not answer (real MLflow, real processes)."""

from __future__ import annotations

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
"""


def start_stages(uri: str, experiment: str, names: list[str], key: str) -> list[subprocess.CompletedProcess]:
    """One process per name, all started at once, each opening a stage run of pipeline ``key``."""
    env = {**run_env(), PIPELINE_ENV: key}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, uri, experiment, n], env=env, stdout=subprocess.PIPE,
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
    done = start_stages(f"sqlite:///{db}", "lmcore-test", names, "four-at-once")
    assert [d.returncode for d in done] == [0, 0, 0, 0], [d.stderr[-2000:] for d in done]
    check_one_pipeline_of(mlflow_runs(db), names, "four-at-once")


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
