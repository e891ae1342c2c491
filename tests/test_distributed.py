"""Two CPU processes through `accelerate launch`, and the guard against the silent trap."""

from __future__ import annotations

import subprocess

import pytest
from conftest import BIN, ROOT, run_env


@pytest.fixture
def encoded_project(tiny_project):
    """The stages before pretrain, run in this process (the same entry functions the CLI calls,
    without four interpreter start-ups); only the launches below go through subprocesses."""
    from lmcore import config
    from lmcore.core.layout import Layout
    from lmcore.stages import run_stage

    params = config.load(tiny_project / "params.yaml", {"tracking.enabled": False})
    for stage in ("prepare", "clean", "tokenizer", "encode"):
        run_stage(stage, params, Layout(tiny_project))
    assert (tiny_project / "data/tokens/manifest.json").exists()
    return tiny_project


def launch(proj, env_extra):
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "configs/accelerate/cpu-2proc.yaml"),
           "-m", "lmcore.cli", "pretrain"]
    return subprocess.run(cmd, cwd=proj, env={**run_env(), **env_extra}, capture_output=True, text=True, timeout=300)


def test_two_cpu_processes_train_together(encoded_project):
    res = launch(encoded_project, {"ACCELERATE_USE_CPU": "true"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "2 process(es)" in res.stdout + res.stderr
    state = encoded_project / "runs/pretrain/checkpoints/step-000012"
    assert (state / "random_states_0.pkl").exists() and (state / "random_states_1.pkl").exists()
    assert (encoded_project / "runs/pretrain/final/model.safetensors").exists()


def test_two_processes_that_each_think_they_are_alone_are_refused(encoded_project):
    res = launch(encoded_project, {"ACCELERATE_USE_CPU": "false"})
    assert res.returncode != 0
    assert "Accelerate sees 1" in res.stderr and "ACCELERATE_USE_CPU=true" in res.stderr
    assert not (encoded_project / "runs/pretrain/final").exists()
