"""The team topology for real: a ``prefect server`` process, a process work pool, the
deployment of ``prefect.yaml`` and a ``prefect worker`` process that starts the flow runs (no
test harness, no mocks). One full tiny pipeline run; a second run submitted meanwhile waits for
the deployment's concurrency slot, then fails in pretrain with pretrain's message (a problem in
the input: not retried).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import psutil
import pytest
from conftest import BIN, ROOT, mlflow_runs, run_env

STAGES = ["prepare", "clean", "tokenizer", "encode", "pretrain", "export", "finetune", "evaluate"]
POOL = "lmcore-process"  # prefect.yaml's pool: the server is this test's own, so the real name is used
MISSING = "configs/accelerate/missing.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """Stop ``proc`` (a session leader), its process group and every process it started (a
    worker's training processes run in sessions of their own): SIGTERM, then SIGKILL."""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in family:
            try:
                group = os.getpgid(p.pid)
                if group != os.getpgrp():  # never the test's own group
                    os.killpg(group, sig)
            except (ProcessLookupError, PermissionError):
                pass
        _, family = psutil.wait_procs(family, timeout=grace)
        if not family:
            break
    proc.poll()


@pytest.fixture
def started():
    """Processes the test starts; all of them are stopped at the end, whatever happened."""
    procs: list[subprocess.Popen] = []
    yield procs
    for p in reversed(procs):
        _stop(p)


def _default_sigint() -> None:
    # a process started from a non-interactive shell with `&` inherits SIGINT ignored (POSIX);
    # the worker then ignores its first SIGTERM (see README). Start it the way a terminal would.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _cli(env: dict, *args: str, cwd: Path | None = None) -> str:
    res = subprocess.run([str(BIN / "prefect"), *args], env=env, cwd=cwd, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, f"prefect {' '.join(args)}: {res.stdout[-3000:]}{res.stderr[-3000:]}"
    return res.stdout


def _run_id(out: str) -> uuid.UUID:
    m = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
    assert m, out
    return uuid.UUID(m.group(1))


def _stage(task_run) -> str:
    """The stage of a task run: its name without Prefect's 3-hex-digit suffix (finetune's runs
    are named finetune-<task>)."""
    return re.sub(r"-[0-9a-f]{3}$", "", task_run.name)


def _log(path: Path) -> str:
    return path.read_text(errors="replace")[-4000:] if path.exists() else ""


def test_worker_runs_the_deployment_queues_a_second_run_and_reports_a_failing_stage(tiny_project, tmp_path, started):
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, TaskRunFilter, TaskRunFilterFlowRunId
    from prefect.client.schemas.objects import StateType

    home = tmp_path / "prefect-home"
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    base = {k: v for k, v in run_env().items() if not k.startswith("PREFECT_")}  # nothing from another setup
    env = {**base, "PREFECT_HOME": str(home), "PREFECT_API_URL": url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    t_start = time.monotonic()

    # the server: its own database and files in PREFECT_HOME. A run refused a concurrency slot is
    # retried after this many seconds (default 30; shorter here to keep the test short)
    server_log = tmp_path / "server.log"
    server_env = {**env, "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "2"}
    with server_log.open("w") as out:
        started.append(subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                                         str(port), "--no-ui"], env=server_env, cwd=tmp_path, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True))
    server = started[-1]
    deadline = time.monotonic() + 120
    while True:
        assert server.poll() is None, f"the server exited: {_log(server_log)}"
        assert time.monotonic() < deadline, f"no answer on {url}/health: {_log(server_log)}"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        time.sleep(0.25)
    t_ready = time.monotonic()
    assert (home / "prefect.db").exists()  # the server's database

    # the pool, then the deployment from the project's prefect.yaml (only `cpu`: `gpu` names a pool
    # that does not exist here, and `prefect deploy --all` would exit 1 on it)
    _cli(env, "work-pool", "create", POOL, "--type", "process")
    t_pool = time.monotonic()
    shutil.copy(ROOT / "prefect.yaml", tiny_project / "prefect.yaml")
    _cli(env, "deploy", "--name", "cpu", "--no-prompt", cwd=tiny_project)
    t_deploy = time.monotonic()

    # the worker, started elsewhere: LMCORE_ROOT alone says where the code and the data are
    worker_log = tmp_path / "worker.log"
    worker_env = {**env, "LMCORE_ROOT": str(tiny_project), "PREFECT_WORKER_QUERY_SECONDS": "2"}
    with worker_log.open("w") as out:
        started.append(subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", POOL], env=worker_env,
                                        cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                        preexec_fn=_default_sigint))
    worker = started[-1]

    # run A: the whole pipeline. Run B, submitted at once: it waits for A's concurrency slot, then
    # fails in pretrain (a launch config that does not exist); the stages before it come from A's cache
    first = _run_id(_cli(env, "deployment", "run", "lmcore-pipeline/cpu"))
    t_submit = time.monotonic()
    second = _run_id(_cli(env, "deployment", "run", "lmcore-pipeline/cpu", "-p", f'launch={{"config": "{MISSING}"}}'))

    client = SyncPrefectClient(url)
    seen_while_first_ran: set[tuple[str, str]] = set()
    deadline = time.monotonic() + 420
    while True:
        a, b = client.read_flow_run(first), client.read_flow_run(second)
        if a.state.type == StateType.RUNNING:
            seen_while_first_ran.add((b.state.type.value, b.state.name))
        if a.state.is_final() and b.state.is_final():
            break
        assert worker.poll() is None, f"the worker exited: {_log(worker_log)}"
        assert time.monotonic() < deadline, f"A {a.state.name}, B {b.state.name}: {_log(worker_log)}"
        time.sleep(0.5)
    t_done = time.monotonic()

    # A: every stage, each a task run of its own, each with its MLflow run under one parent
    assert a.state.type == StateType.COMPLETED, f"{a.state.message}\n{_log(worker_log)}"
    tasks_a = client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[first])))
    assert sorted(_stage(t) for t in tasks_a) == sorted(STAGES[:6] + ["finetune-sst2", "evaluate"])
    assert {t.state.name for t in tasks_a} == {"Completed"}  # nothing cached yet
    runs = mlflow_runs(tiny_project / "mlflow.db")
    parents = [r for r in runs if r.data.tags.get("lmcore.pipeline_key") == f"prefect-{first}"
               and r.data.tags.get("lmcore.kind") == "pipeline"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.tags["lmcore.stage"] for r in children) == sorted(STAGES)
    assert (tiny_project / "runs/finetune/sst2/model.safetensors").exists()
    # the stages' results, which are their cache records, in the flow-run process's PREFECT_HOME/storage
    stored = {p.name.rsplit("-", 1)[0] for p in (home / "storage").iterdir()}
    assert set(STAGES[:6] + ["finetune-sst2", "evaluate"]) <= stored, stored

    # the concurrency limit: B was refused a slot while A ran, and started after A ended
    assert ("SCHEDULED", "AwaitingConcurrencySlot") in seen_while_first_ran, seen_while_first_ran
    assert not {s for s in seen_while_first_ran if s[0] in ("PENDING", "RUNNING")}, seen_while_first_ran
    b_running = [s.timestamp for s in client.read_flow_run_states(second) if s.type == StateType.RUNNING]
    assert b_running and min(b_running) >= a.end_time

    # B: Failed with pretrain's message; pretrain ran once (a problem in the input is not retried,
    # though pretrain has a retry for crashes), the stages after it did not run
    assert b.state.type == StateType.FAILED
    assert "no such Accelerate config file" in b.state.message and MISSING in b.state.message, b.state.message
    tasks_b = {_stage(t): t for t in client.read_task_runs(
        task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[second])))}
    assert sorted(tasks_b) == sorted(STAGES[:5])
    assert {tasks_b[s].state.name for s in STAGES[:4]} == {"Cached"}
    assert tasks_b["pretrain"].state.type == StateType.FAILED and tasks_b["pretrain"].run_count == 1
    logs = " ".join(entry.message for entry in client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(
        any_=[second]))))
    assert "no such Accelerate config file" in logs and "Retry 1/1" not in logs, logs[-3000:]
    assert not [r for r in mlflow_runs(tiny_project / "mlflow.db") if r.data.tags.get("lmcore.stage") == "pretrain"
                and r.info.run_id not in {c.info.run_id for c in children}]  # a failed launch logs no stage run

    # one SIGTERM stops the worker cleanly
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0, _log(worker_log)
    assert "stopped!" in _log(worker_log)

    t_stopped = time.monotonic()
    a_start = min(s.timestamp for s in client.read_flow_run_states(first) if s.type == StateType.RUNNING)
    print(f"\nserver ready {t_ready - t_start:.1f} s, pool {t_pool - t_ready:.1f} s, deploy {t_deploy - t_pool:.1f} s; "
          f"A: created -> Running {(a_start - a.created).total_seconds():.1f} s, ran {a.total_run_time.total_seconds():.1f}"
          f" s; B Running {(min(b_running) - a.end_time).total_seconds():.1f} s after A ended, ran "
          f"{b.total_run_time.total_seconds():.1f} s; submit -> both final {t_done - t_submit:.1f} s; worker stop "
          f"{t_stopped - t_done:.1f} s (with the checks); total {t_stopped - t_start:.1f} s\nB: {b.state.message}")
