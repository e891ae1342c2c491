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

    # a second run with nothing changed takes every stage from Prefect's cache: no new MLflow runs
    pipeline(str(tiny_project / "params.yaml"), str(tiny_project), launch=two)
    assert len(mlflow_runs(tiny_project / "mlflow.db")) == len(runs)

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

    pipeline(str(tiny_project / "params.yaml"), str(tiny_project))
    before = {p: p.read_bytes() for p in sorted((tiny_project / "data/clean").rglob("*.jsonl"))}
    assert len(before) > 4
    with_dask(workers=2)(str(tiny_project / "params.yaml"), str(tiny_project), force=True)
    after = {p: p.read_bytes() for p in sorted((tiny_project / "data/clean").rglob("*.jsonl"))}
    assert after == before
    import anyio
    from prefect.client.orchestration import get_client

    async def shard_runs():
        async with get_client() as client:
            runs = await client.read_task_runs()
            return [r for r in runs if r.name.startswith("clean-shard")]

    assert len(anyio.run(shard_runs)) == len(before) // 2  # one task run per raw shard
