"""dvc.yaml, the Prefect tasks and the CLI describe the same stages; lmcore stays orchestrator-free."""

from __future__ import annotations

import ast

import pytest
import yaml
from conftest import ROOT

from lmcore import config
from lmcore.stages import LAUNCH_PARAMS, ORDER, STAGE_IO, code_deps


def test_dvc_yaml_declares_the_same_stages_inputs_and_outputs():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(dvc) == ORDER
    for name, io in STAGE_IO.items():
        st = dvc[name]
        if io.foreach:  # one stage per item: `foreach: ${key}` and the template under `do`
            assert st["foreach"] == "${" + io.foreach + "}", name
            st = st["do"]
            assert st["cmd"].split("#")[0].strip() == f"lmcore launch {name} --task ${{item}}", name
        else:
            assert "foreach" not in st, name
            want_cmd = f"lmcore launch {name}" if io.launched else f"lmcore {name}"
            assert st["cmd"].split("#")[0].strip() == want_cmd, name
        want = [*code_deps(name), *io.deps]
        assert st["deps"] == want, (f"dvc.yaml: stage {name} must list its code (the import closure of its entry "
                                    "module, lmcore.stages.code_deps) then its data; expected deps:\n"
                                    + "\n".join(f"  - {d}" for d in want))
        plain = tuple(o for o in st["outs"] if isinstance(o, str))
        options = {next(iter(o)): next(iter(o.values())) for o in st["outs"] if isinstance(o, dict)}
        assert plain == io.outs, name
        assert tuple(o for o, v in options.items() if v == {"persist": True, "cache": False}) == io.persist, name
        assert tuple(o for o, v in options.items() if v == {"cache": False}) == io.plots, name
        assert len(options) == len(io.persist) + len(io.plots), name
        assert tuple(st["params"]) == io.params, name
        metrics = tuple(next(iter(m)) for m in st["metrics"])
        assert metrics == (io.metrics or (f"metrics/{name}.json",)), name


def test_dvc_params_keys_exist_in_params_yaml_for_every_item():
    """DVC refuses a stage whose params key is missing from params.yaml: every key a stage lists
    (per item for finetune) exists, and lmcore resolves it the same way (the Prefect cache key)."""
    from lmcore import config
    from lmcore.stages import param_value, stage_io, stage_items

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = config.load(ROOT / "params.yaml")
    for name in ORDER:
        for item in stage_items(name, params) or [None]:
            for key in stage_io(name, item).params:
                node = raw
                for part in key.split("."):
                    assert isinstance(node, dict) and part in node, f"{name}: {key} missing from params.yaml"
                    node = node[part]
                param_value(params, key)


def test_finetune_depends_on_every_shared_setting_and_its_own_overrides_only():
    from lmcore.config import FinetuneConfig

    io = STAGE_IO["finetune"]
    shared = {f"finetune.{k}" for k in FinetuneConfig.model_fields if k != "tasks"}
    assert set(io.params) == shared | {"finetune.tasks.${item}"} | set(LAUNCH_PARAMS)
    assert "finetune.tasks.cola" in io.expand("cola").params
    assert "data/raw/tasks/cola" in io.expand("cola").deps and io.expand("cola").outs == ("runs/finetune/cola",)


def test_cli_takes_a_task_for_foreach_stages_only(capsys):
    import pytest

    from lmcore.cli import main

    with pytest.raises(SystemExit):
        main(["clean", "--task", "x"])
    assert "unrecognized arguments: --task" in capsys.readouterr().err


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


def test_prefect_yaml_deploys_the_pipeline_flow_on_a_cpu_and_a_gpu_pool():
    from prefect.flows import load_flow_from_entrypoint

    from lmcore.launch import read_accelerate_config

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in spec["deployments"]}
    assert set(deps) == {"cpu", "gpu"}
    for dep in deps.values():
        flow = load_flow_from_entrypoint(str(ROOT / dep["entrypoint"]))
        assert flow.name == "lmcore-pipeline"
        assert set(dep["parameters"]) <= set(flow.parameters.properties)
        for key in ("launch", "launch_defaults"):
            config.from_dict({"launch": dep["parameters"].get(key) or {}})  # valid launch values
    assert deps["cpu"]["work_pool"]["name"] == "lmcore-process" and deps["gpu"]["work_pool"]["name"] == "lmcore-gpu"
    gpu = read_accelerate_config(ROOT / deps["gpu"]["parameters"]["launch_defaults"]["config"])
    assert gpu["distributed_type"] == "MULTI_GPU" and gpu["use_cpu"] is False
    assert deps["cpu"]["schedules"][0]["cron"] and deps["cpu"]["schedules"][0]["active"] is False


def test_a_runs_launch_override_on_the_gpu_deployment_keeps_its_gpu_settings():
    """Prefect replaces a parameter given on a run whole: the documented
    `-p launch='{"num_processes": 4}'` dropped the gpu deployment's multi-GPU config and
    cpu: false, and trained 4 CPU processes on the GPU machine, silently."""
    from flows.pipeline import pipeline
    from lmcore.config import ConfigError
    from lmcore.core.errors import StageError
    from lmcore.launch import launch_command
    from tasks import launch_overrides

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    gpu = next(d for d in spec["deployments"] if d["name"] == "gpu")["parameters"]
    assert gpu["launch"] is None and gpu["launch_defaults"]["cpu"] is False
    # the flow itself merges them (its body fails on until='nope' before any stage runs, after the
    # merged settings were loaded): the deployment's values count, and the run's win key by key
    params_file = str(ROOT / "params.yaml")
    with pytest.raises(ConfigError, match="launch.num_processes = 0"):
        pipeline.fn(params_file, str(ROOT), launch={}, launch_defaults={"num_processes": 0}, until="nope")
    with pytest.raises(StageError, match="until = 'nope'"):
        pipeline.fn(params_file, str(ROOT), launch={"num_processes": 2}, launch_defaults={"num_processes": 0},
                    until="nope")
    # what the documented run gets: the deployment's GPU settings with 4 processes
    merged = {**gpu["launch_defaults"], "num_processes": 4}
    built = launch_command(config.load(params_file, launch_overrides(merged)).launch, "pretrain", params_file, ROOT)
    assert built.distributed_type == "MULTI_GPU" and built.num_processes == 4 and not built.cpu
    assert "ACCELERATE_USE_CPU" not in built.env and "--cpu" not in built.argv
    assert built.config_file.name == "multi-gpu.yaml"


def test_a_relative_launch_config_is_found_in_the_checkout_when_the_project_folder_is_elsewhere(tmp_path):
    """A flow run with root= elsewhere (README: -p root=/abs/out) looked for
    configs/accelerate/cpu.yaml under that root and failed at pretrain, after four stages; the
    clean stage's data file lmcore/data/clean/fineweb2.json was hashed as missing."""
    from lmcore.core.layout import Layout
    from lmcore.launch import launch_command
    from lmcore.stages import data_deps

    params = config.load(ROOT / "params.yaml")
    built = launch_command(params.launch, "pretrain", ROOT / "params.yaml", tmp_path)
    assert built.config_file == ROOT / params.launch.config
    (tmp_path / "configs/accelerate").mkdir(parents=True)  # the project folder's own file comes first
    (tmp_path / params.launch.config).write_text((ROOT / params.launch.config).read_text())
    assert launch_command(params.launch, "pretrain", ROOT / "params.yaml", tmp_path).config_file == \
        tmp_path / params.launch.config
    assert all(p.exists() for p in data_deps("clean", params, Layout(tmp_path)) if "lmcore" in p.parts)
    assert ROOT / "lmcore/data/clean/fineweb2.json" in data_deps("clean", params, Layout(tmp_path))
