"""Two CPU processes through `accelerate launch`, and the guard against the silent trap."""

from __future__ import annotations

import subprocess

import pytest
from conftest import BIN, ROOT, run_env


@pytest.fixture
def encoded_project(tiny_project):
    for stage in ("prepare", "clean", "tokenizer", "encode"):
        res = subprocess.run([str(BIN / "lmcore"), stage], cwd=tiny_project, env=run_env(), capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
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
