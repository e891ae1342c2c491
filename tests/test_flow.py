"""The same pipeline as a Prefect flow (real Prefect, isolated database and result storage)."""

from __future__ import annotations

import os

import pytest
from conftest import mlflow_runs, read_json

STAGES = ["prepare", "clean", "tokenizer", "encode", "pretrain", "export", "finetune", "evaluate"]


@pytest.fixture(scope="module")
def prefect_harness(tmp_path_factory):
    storage = tmp_path_factory.mktemp("prefect-results")
    os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(storage)
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
    os.environ.pop("PREFECT_RESULTS_LOCAL_STORAGE_PATH", None)


def test_flow_runs_every_stage_then_uses_its_cache(prefect_harness, tiny_project, monkeypatch):
    monkeypatch.chdir(tiny_project)
    monkeypatch.delenv("LMCORE_PIPELINE_RUN", raising=False)
    from flows.pipeline import pipeline

    # the training stages in two CPU processes through the launch setting (child processes)
    two = {"num_processes": 2}
    results = pipeline(str(tiny_project / "params.yaml"), str(tiny_project), launch=two)
    assert list(results) == STAGES
    assert list(results["finetune"]) == ["sst2"]  # one task run per task of prepare.tasks.tasks
    assert (tiny_project / "runs/finetune/sst2/model.safetensors").exists()
    ev = read_json(tiny_project / "metrics/evaluate.json")
    assert ev["lm.val_bpb"] > 0

    runs = mlflow_runs(tiny_project / "mlflow.db")
    parents = [r for r in runs if r.data.tags.get("lmcore.kind") == "pipeline"]
    assert len(parents) == 1 and parents[0].data.tags["lmcore.pipeline_key"].startswith("prefect-")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.tags["lmcore.stage"] for r in children) == sorted(STAGES)
    trained = [r for r in children if r.data.tags["lmcore.stage"] in ("pretrain", "finetune")]
    assert [r.data.params["num_processes"] for r in trained] == ["2", "2"]  # both processes took part
    assert (tiny_project / "runs/pretrain/checkpoints/step-000012/random_states_1.pkl").exists()
    assert results["pretrain"]["val_bpb"] > 0 and results["finetune"]["sst2"]["score"] >= 0  # their metrics

    # a second run with nothing changed takes every stage from Prefect's cache: no new stage run,
    # one parent run for the execution, linked to the runs that produced what it reused
    pipeline(str(tiny_project / "params.yaml"), str(tiny_project), launch=two)
    cached = [r for r in mlflow_runs(tiny_project / "mlflow.db") if r.info.run_id not in {x.info.run_id for x in runs}]
    assert [r.data.tags["lmcore.kind"] for r in cached] == ["pipeline"] and cached[0].data.tags["lmcore.cached"] == "true"
    pre = next(r for r in children if r.data.tags["lmcore.stage"] == "pretrain")
    assert cached[0].data.tags["lmcore.produced_by.runs/pretrain/final"] == pre.info.run_id
    runs += cached

    # a changed evaluate param reruns evaluate only
    import yaml

    params = yaml.safe_load((tiny_project / "params.yaml").read_text())
    params["evaluate"]["max_new_tokens"] = 2
    (tiny_project / "params.yaml").write_text(yaml.safe_dump(params))
    pipeline(str(tiny_project / "params.yaml"), str(tiny_project), launch=two)
    after = mlflow_runs(tiny_project / "mlflow.db")
    new = [r for r in after if r.info.run_id not in {x.info.run_id for x in runs}]
    assert sorted(r.data.tags.get("lmcore.stage", "parent") for r in new) == ["evaluate", "parent"]

    # a changed per-task override reruns that task's fine-tuning (and evaluate) only
    params["finetune"]["tasks"]["sst2"] = {"lr": 0.001}
    (tiny_project / "params.yaml").write_text(yaml.safe_dump(params))
    pipeline(str(tiny_project / "params.yaml"), str(tiny_project), launch=two)
    newer = [r for r in mlflow_runs(tiny_project / "mlflow.db") if r.info.run_id not in {x.info.run_id for x in after}]
    assert sorted(r.data.tags.get("lmcore.stage", "parent") for r in newer) == ["evaluate", "finetune", "parent"]
    assert next(r for r in newer if r.data.tags.get("lmcore.stage") == "finetune").data.tags["lmcore.task"] == "sst2"


def test_clean_shards_spread_over_a_local_two_worker_dask_cluster(prefect_harness, tiny_project, monkeypatch):
    """The same flow on a Dask task runner: clean's shards run on the Dask workers, and every
    output is byte-identical to the default run."""
    monkeypatch.chdir(tiny_project)
    from flows.pipeline import pipeline, with_dask

    results = pipeline(str(tiny_project / "params.yaml"), str(tiny_project), until="clean")
    assert list(results) == ["prepare", "clean"]  # the stages after `until` do not run
    before = {p: p.read_bytes() for p in sorted((tiny_project / "data/clean").rglob("*.jsonl"))}
    assert len(before) > 4
    with_dask(workers=2)(str(tiny_project / "params.yaml"), str(tiny_project), force=True, until="clean")
    after = {p: p.read_bytes() for p in sorted((tiny_project / "data/clean").rglob("*.jsonl"))}
    assert after == before
    import anyio
    from prefect.client.orchestration import get_client

    async def shard_runs():
        async with get_client() as client:
            runs = await client.read_task_runs()
            return [r for r in runs if r.name.startswith("clean-shard")]

    assert len(anyio.run(shard_runs)) == len(before) // 2  # one task run per raw shard

    # the outputs rewritten with other settings outside the flow (dvc repro, lmcore clean), then the
    # first settings back: the flow runs the stage again; its cache held the first result but the
    # files on disk were the other run's
    import yaml

    from lmcore import config
    from lmcore.core.layout import Layout
    from lmcore.stages import run_stage

    first = (tiny_project / "params.yaml").read_text()
    other = yaml.safe_load(first)
    other["clean"]["validation_fraction"] = 0.5
    (tiny_project / "params.yaml").write_text(yaml.safe_dump(other))
    run_stage("clean", config.load(tiny_project / "params.yaml"), Layout(tiny_project))
    assert {p: p.read_bytes() for p in sorted((tiny_project / "data/clean").rglob("*.jsonl"))} != before
    (tiny_project / "params.yaml").write_text(first)
    pipeline(str(tiny_project / "params.yaml"), str(tiny_project), until="clean")
    assert {p: p.read_bytes() for p in sorted((tiny_project / "data/clean").rglob("*.jsonl"))} == before


def _trainers(root) -> list:
    """The training processes of ``root`` (not their launcher)."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "-m lmcore.cli" in cmd and str(root) in cmd and "accelerate.commands.launch" not in cmd:
            found.append(p)
    return found


def _wait_for(path, proc=None, timeout: float = 300) -> None:
    import time

    t0 = time.time()
    while not path.exists():
        assert proc is None or proc.poll() is None, proc.stdout.read()[-3000:] if proc else ""
        assert time.time() - t0 < timeout, f"{path} did not appear"
        time.sleep(0.01)


def test_sigterm_stops_training_with_a_checkpoint_a_crash_is_retried_and_both_resume(prefect_harness, tiny_project,
                                                                                    monkeypatch):
    """A flow run SIGTERMed during pretrain (a cancellation from a worker does this) stops the
    training processes, which save a checkpoint first; the next flow run resumes from it. A
    training process that dies (SIGKILL, as an out-of-memory kill) fails the task, and Prefect's
    retry resumes from the last checkpoint."""
    import signal
    import subprocess
    import sys
    import threading

    import yaml
    from conftest import run_env
    from prefect.settings import PREFECT_API_URL

    from flows.pipeline import pipeline
    from tasks import STAGE_TASKS

    monkeypatch.chdir(tiny_project)
    params_file = tiny_project / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params["pretrain"].update(max_steps=600, checkpoint_interval=100, eval_interval=100, log_interval=50)
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    ckpts = tiny_project / "runs/pretrain/checkpoints"

    env = {**run_env(), "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(tiny_project)}
    flow = subprocess.Popen([sys.executable, "-m", "flows.pipeline", "--params", str(params_file), "--root",
                             str(tiny_project)], cwd=tiny_project, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    _wait_for(ckpts / "step-000100/trainer.json", flow)
    flow.send_signal(signal.SIGTERM)
    out, _ = flow.communicate(timeout=180)
    assert flow.returncode != 0
    assert "stopping the training processes" in out and "stopped by SIGTERM" in out, out[-3000:]
    assert "SIGKILL after 25 s" in out  # within the 30 s Prefect's runner gives a cancelled run's process
    assert _trainers(tiny_project) == []  # nothing left behind
    from lmcore.train.checkpoint import list_checkpoints

    stopped = list_checkpoints(ckpts)[-1][0]
    assert 100 <= stopped < 600 and not (tiny_project / "runs/pretrain/final").exists()

    # the next run resumes; its training process is killed after the next checkpoint, the retry resumes again
    monkeypatch.setattr(STAGE_TASKS["pretrain"], "retry_delay_seconds", 0)
    killed: list[int] = []

    def kill_after_next_checkpoint():
        step = (stopped // 100 + 1) * 100
        _wait_for(ckpts / f"step-{step:06d}/trainer.json")
        for p in _trainers(tiny_project):
            p.kill()
        killed.append(step)

    killer = threading.Thread(target=kill_after_next_checkpoint, daemon=True)
    killer.start()
    pipeline(str(params_file), str(tiny_project))
    killer.join(timeout=5)
    assert killed and (tiny_project / "runs/pretrain/final/model.safetensors").exists()
    runs = [r for r in mlflow_runs(tiny_project / "mlflow.db") if r.data.tags.get("lmcore.stage") == "pretrain"]
    # one training, one MLflow run: stopped, resumed, killed and resumed again, it is continued each
    # time (now under the last flow run's parent) and holds one loss curve over every logged step
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", [(r.info.run_id, r.info.status) for r in runs]
    run = runs[0]
    assert run.data.params["resumed_from_step"] == "0"
    assert int(run.data.tags["lmcore.resume.resumed_from_step"]) >= killed[0] > stopped
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tiny_project / 'mlflow.db'}")
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss"))
    assert steps == list(range(50, 601, 50)), steps  # each step once: those run again after a resume too
    first_parent = client.get_run(run.data.tags["lmcore.resumed_from_parent"])
    assert first_parent.info.status == "FAILED"  # the SIGTERMed flow run's execution
    assert client.get_run(run.data.tags["mlflow.parentRunId"]).info.status == "FINISHED"


def test_a_problem_in_the_input_is_not_retried_a_crash_or_a_download_is():
    """Prefect retried prepare twice (10 s apart) on a corpus path that does not exist, and
    pretrain on a launch config that does not exist: the same error three times. A download, a
    crashed or killed training process, or an error lmcore did not foresee are still retried."""
    from prefect.states import Failed

    from lmcore.config import ConfigError
    from lmcore.core.errors import MayPass, StageError
    from tasks import STAGE_TASKS
    from tasks.stages import _may_pass

    def retried(exc: Exception) -> bool:
        return _may_pass(None, None, Failed(data=exc))

    assert not retried(StageError("texts/a.txt: corpus path not found (prepare.corpus.paths)"))
    assert not retried(ConfigError("pretrain.lr = -1: must be > 0"))
    assert retried(MayPass("pretrain: the launched processes exited with status 1"))
    assert retried(RuntimeError("connection reset"))
    assert all(t.retry_condition_fn is _may_pass for t in STAGE_TASKS.values())


@pytest.mark.parametrize("args, said", [
    (["--until", "nope"], "--until nope: no such stage"),
    (["--launch", "num_processes=0"], "lmcore flow: error: "),
    (["--launch", "config=["], "--launch config=[: the value is not valid YAML"),
])
def test_bad_flow_input_is_one_line_before_the_flow_starts(tmp_path, args, said):
    """Checked inside the flow, a bad --until or --launch value printed Prefect's log of the
    failing flow with its traceback before the one-line error (and --launch config=[ was a bare
    YAML traceback)."""
    import subprocess
    import sys
    from pathlib import Path

    from conftest import run_env

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "params.yaml").write_text((root / "params.yaml").read_text())
    res = subprocess.run([sys.executable, "-m", "flows.pipeline", "--params", str(tmp_path / "params.yaml"),
                          "--root", str(tmp_path), *args], cwd=root, env=run_env(), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode != 0 and said in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr + res.stdout and "Encountered exception" not in res.stderr + res.stdout
    assert not (tmp_path / "data").exists()  # no stage ran
