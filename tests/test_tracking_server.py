"""``lmcore tracking-server``: real PostgreSQL and a real ``mlflow server``, started by the tests
on 127.0.0.1; stages log to them over HTTP, several at once, and survive the server going away."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import BIN, read_json, run_env
from test_tracking import check_one_pipeline_of, free_port, start_stages

from lmcore.core.errors import StageError
from lmcore.tracking_server import Postgres, postgres_bin

# `make setup` installs lmcore[server] (psycopg2-binary, pgserver and its PostgreSQL) with the dev
# extra: a broken install fails here; only a setup without any PostgreSQL skips
try:
    import psycopg2  # noqa: F401
except ImportError:
    pytest.fail("psycopg2 is missing: pip install 'lmcore[server]' (make setup installs it)", pytrace=False)
try:
    postgres_bin()
except StageError as e:
    pytest.skip(f"no PostgreSQL binaries: {e}", allow_module_level=True)


class Server:
    """``lmcore tracking-server`` as a child process, in a folder of its own."""

    def __init__(self) -> None:
        # /tmp, not pytest's 0700 folder: under root PostgreSQL runs as 'nobody', who must reach it
        self.folder = Path(tempfile.mkdtemp(prefix="lmcore-ts-", dir="/tmp"))
        self.folder.chmod(0o755)
        self.port, self.pg_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        params = {"tracking": {"server": {"port": self.port, "postgres_port": self.pg_port, "data": "server",
                                          "allowed_hosts": ["mlflow.example.org"]}}}
        (self.folder / "params.yaml").write_text(yaml.safe_dump(params))
        self.proc = subprocess.Popen([str(BIN / "lmcore"), "tracking-server"], cwd=self.folder, env=run_env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        ready = threading.Event()

        def read() -> None:
            for line in self.proc.stdout:
                self.lines.append(line)
                if "MLflow tracking server at" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        ready.wait(180)
        assert self.proc.poll() is None and any("MLflow tracking server at" in x for x in self.lines), self.lines

    @property
    def postgres(self) -> Postgres:
        return Postgres(self.folder / "server", self.pg_port)

    def stop(self) -> int:
        """One SIGTERM; the exit status."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(60)
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)

    def close(self) -> None:
        self.stop()
        self.postgres.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.close()


def client(url: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=url)


def use_server(project: Path, url: str, **tracking) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["tracking"].update(tracking_uri=url, **tracking)
    (project / "params.yaml").write_text(yaml.safe_dump(params))


def lmcore(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "lmcore"), *args], cwd=project, env=run_env(), capture_output=True, text=True,
                          timeout=300)


def test_stages_log_to_the_server_and_read_back_from_postgresql(server, tiny_project):
    use_server(tiny_project, server.url)
    for stage in ("prepare", "clean"):
        out = lmcore(tiny_project, stage)
        assert out.returncode == 0, out.stderr[-2000:]
    c = client(server.url)
    exp = c.get_experiment_by_name("lmcore-test")
    runs = {r.data.tags["lmcore.stage"]: r for r in c.search_runs([exp.experiment_id])
            if r.data.tags.get("lmcore.kind") == "stage"}
    assert set(runs) == {"prepare", "clean"}
    clean = runs["clean"]
    assert clean.info.status == "FINISHED" and clean.data.params["clean.min_chars"] == "50"
    local = read_json(tiny_project / "metrics/clean.json")
    assert clean.data.metrics["documents_kept"] == local["documents_kept"] > 0
    # artifacts go through the server into its store; they read back byte for byte
    logged = c.download_artifacts(clean.info.run_id, "config/clean.json", str(tiny_project / "back"))
    assert read_json(logged)["clean.min_chars"] == 50
    assert list((server.folder / "server/artifacts").rglob("clean.json"))
    # the runs live in PostgreSQL
    import psycopg2

    with psycopg2.connect(host="127.0.0.1", port=server.pg_port, user="lmcore", dbname="mlflow") as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT name, status FROM runs WHERE experiment_id = %s", (int(exp.experiment_id),))
            rows = dict(cur.fetchall())
    assert rows["clean"] == "FINISHED" and rows["prepare"] == "FINISHED"


WRITER = """
import sys
from pathlib import Path
from lmcore.config import TrackingConfig
from lmcore.tracking import stage_run
url, name, folder = sys.argv[1:4]
with stage_run(name, TrackingConfig(tracking_uri=url, experiment="writers"), {f"p{i}": i for i in range(150)}) as tr:
    for step in range(200):
        tr.metrics({"loss": 1.0 / (step + 1), "lr": step * 1e-4}, step=step)
    for i in range(5):
        f = Path(folder) / f"{name}-{i}.txt"
        f.write_text(name * (i + 1))
        tr.artifact(f, "files")
"""


def test_two_stages_writing_at_once_lose_nothing(server, tmp_path):
    env = {**run_env(), "LMCORE_PIPELINE_RUN": "two-writers"}
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, server.url, n, str(tmp_path)], env=env,
                              stderr=subprocess.PIPE, text=True) for n in ("left", "right")]
    assert [p.wait(300) for p in procs] == [0, 0], [p.stderr.read()[-2000:] for p in procs]
    c = client(server.url)
    exp = c.get_experiment_by_name("writers")
    stages = [r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("lmcore.kind") == "stage"]
    assert sorted(r.data.tags["lmcore.stage"] for r in stages) == ["left", "right"]
    for r in stages:
        name = r.data.tags["lmcore.stage"]
        assert len(r.data.params) == 150
        for key in ("loss", "lr"):
            history = c.get_metric_history(r.info.run_id, key)
            assert sorted(m.step for m in history) == list(range(200))
        assert sorted(a.path for a in c.list_artifacts(r.info.run_id, "files")) == [
            f"files/{name}-{i}.txt" for i in range(5)]


def test_four_stages_start_at_once_on_the_server(server):
    names = ["prepare", "clean", "tokenizer", "encode"]
    done = start_stages(server.url, "four-at-once", names, "four-on-the-server")
    assert [d.returncode for d in done] == [0, 0, 0, 0], [d.stderr[-2000:] for d in done]
    c = client(server.url)
    exp = c.get_experiment_by_name("four-at-once")
    check_one_pipeline_of(c.search_runs([exp.experiment_id]), names, "four-on-the-server")


STEPS = 300  # the server is stopped at step 20


def test_the_server_going_away_mid_stage_leaves_the_stage_and_its_outputs_whole(tiny_project):
    params = yaml.safe_load((tiny_project / "params.yaml").read_text())
    params["tracking"]["enabled"] = False  # the data stages untracked: only pretraining talks to the server
    (tiny_project / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in ("prepare", "clean", "tokenizer", "encode"):
        assert lmcore(tiny_project, stage).returncode == 0
    own = Server()  # this test stops its server
    try:
        params["tracking"].update(enabled=True, tracking_uri=own.url, request_retries=1, request_timeout=5)
        params["pretrain"].update(max_steps=STEPS, log_interval=2, eval_interval=20, checkpoint_interval=STEPS)
        (tiny_project / "params.yaml").write_text(yaml.safe_dump(params))
        proc = subprocess.Popen([str(BIN / "lmcore"), "pretrain"], cwd=tiny_project, env=run_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for line in proc.stdout:  # the first validation: the run is open and logging
            if line.startswith("step 20:"):
                break
        assert own.stop() == 0  # one SIGTERM stops MLflow and PostgreSQL
        assert not own.postgres.running()
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
        warnings = [x for x in stderr.splitlines() if x.startswith("lmcore: warning: tracking at")]
        assert len(warnings) == 1 and own.url in warnings[0] and "untracked" in warnings[0], stderr[-3000:]
        assert "Traceback" not in stderr
        m = read_json(tiny_project / "metrics/pretrain.json")
        assert m["trained_tokens"] == STEPS * 4 * 32
        assert (tiny_project / "runs/pretrain/final/model.safetensors").exists()
    finally:
        own.close()


def test_allowed_hosts_add_to_mlflows_defaults():
    from lmcore.config import TrackingServerConfig
    from lmcore.tracking_server import mlflow_command

    plain = mlflow_command(TrackingServerConfig(), "postgresql://x", "/a")
    assert "--allowed-hosts" not in plain  # MLflow's defaults: localhost and private addresses
    cmd = mlflow_command(TrackingServerConfig(host="0.0.0.0", allowed_hosts=["mlflow.example.org"]), "postgresql://x", "/a")
    hosts = cmd[cmd.index("--allowed-hosts") + 1].split(",")
    assert {"mlflow.example.org", "mlflow.example.org:*", "localhost:*", "10.*"} <= set(hosts)


def test_the_ui_of_a_named_host_may_search_runs_and_another_site_may_not(server):
    """MLflow refuses state-changing requests (the UI's run search is a POST) from any origin but
    localhost unless told: a colleague's browser at the team's name saw no runs (403)."""
    import json
    import urllib.error
    import urllib.request

    def search(origin: str) -> int:
        body = json.dumps({"experiment_ids": ["0"], "max_results": 1}).encode()
        req = urllib.request.Request(f"{server.url}/ajax-api/2.0/mlflow/runs/search", data=body, method="POST",
                                     headers={"Content-Type": "application/json", "Origin": origin})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    assert search(f"http://mlflow.example.org:{server.port}") == 200
    assert search("https://mlflow.example.org") == 200
    assert search("http://10.mlflow.example.org.evil.example") == 403


def test_ui_origins_are_the_machines_addresses_and_the_named_hosts_without_wildcards():
    from lmcore.config import TrackingServerConfig
    from lmcore.tracking_server import ui_origins

    assert ui_origins(TrackingServerConfig()) == []  # localhost only: MLflow allows it itself
    team = ui_origins(TrackingServerConfig(host="0.0.0.0", port=5000, allowed_hosts=["mlflow.example.org"]))
    assert {"http://mlflow.example.org:5000", "https://mlflow.example.org"} <= set(team)
    assert not any("*" in o or "127.0.0.1" in o for o in team)
    assert ui_origins(TrackingServerConfig(host="10.0.0.5", port=5001)) == ["http://10.0.0.5:5001"]
    assert ui_origins(TrackingServerConfig(host="fd00::5", port=5001)) == ["http://[fd00::5]:5001"]
    both = ui_origins(TrackingServerConfig(host="::", port=5000))
    assert all(o.startswith("http://") and not o.startswith(("http://127.", "http://[::1]", "http://[fe80"))
               for o in both)


def test_a_sigterm_while_the_servers_start_stops_them_without_waiting_for_mlflow():
    """The stop request only set a flag that the start did not look at: the command went on
    waiting (up to minutes) for MLflow to answer, then served, and only then stopped."""
    folder = Path(tempfile.mkdtemp(prefix="lmcore-ts-", dir="/tmp"))
    folder.chmod(0o755)
    port, pg_port = free_port(), free_port()
    (folder / "params.yaml").write_text(yaml.safe_dump(
        {"tracking": {"server": {"port": port, "postgres_port": pg_port, "data": "server"}}}))
    proc = subprocess.Popen([str(BIN / "lmcore"), "tracking-server"], cwd=folder, env=run_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    watchdog = threading.Timer(180, lambda: os.killpg(proc.pid, signal.SIGKILL))  # the line never came
    watchdog.start()
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "PostgreSQL at" in line:  # MLflow starts next (seconds)
                os.kill(proc.pid, signal.SIGTERM)
                break
        rest, _ = proc.communicate(timeout=120)
        out = "".join(lines) + rest
        assert proc.returncode == 0, out
        assert "MLflow tracking server at" not in out and "tracking server stopped" in out, out
        assert not Postgres(folder / "server", pg_port).running()
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        Postgres(folder / "server", pg_port).stop()
        shutil.rmtree(folder, ignore_errors=True)
