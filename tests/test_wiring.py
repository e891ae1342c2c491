"""dvc.yaml, the Prefect tasks and the CLI describe the same stages; lmcore stays orchestrator-free."""

from __future__ import annotations

import ast

import yaml
from conftest import ROOT

from lmcore.stages import ORDER, STAGE_IO


def test_dvc_yaml_declares_the_same_stages_inputs_and_outputs():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(dvc) == ORDER
    for name, io in STAGE_IO.items():
        st = dvc[name]
        assert st["cmd"].endswith(f"lmcore {name}") or st["cmd"].endswith(f"lmcore.cli {name}")
        assert tuple(st["deps"]) == io.deps, name
        plain = tuple(o for o in st["outs"] if isinstance(o, str))
        kept = tuple(next(iter(o)) for o in st["outs"] if isinstance(o, dict))
        assert plain == io.outs, name
        assert kept == io.persist, name
        for o in st["outs"]:
            if isinstance(o, dict):
                assert next(iter(o.values())) == {"persist": True, "cache": False}, name
        assert tuple(st["params"]) == io.params, name


def test_one_prefect_task_per_stage():
    from tasks import STAGE_TASKS

    assert list(STAGE_TASKS) == ORDER
    assert [t.name for t in STAGE_TASKS.values()] == ORDER


def test_lmcore_imports_neither_prefect_nor_dvc():
    for path in (ROOT / "lmcore").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
                assert n.split(".")[0] not in {"prefect", "dvc"}, f"{path} imports {n}"


def test_prefect_yaml_deploys_the_pipeline_flow_on_a_process_pool():
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    (dep,) = spec["deployments"]
    flow = load_flow_from_entrypoint(str(ROOT / dep["entrypoint"]))
    assert flow.name == "lmcore-pipeline"
    assert set(dep["parameters"]) <= set(flow.parameters.properties)
    assert dep["work_pool"]["name"] == "lmcore-process"
    assert dep["schedules"][0]["cron"] and dep["schedules"][0]["active"] is False
