"""The guard against the silent trap of two processes that each think they are alone (two CPU
processes training together: tests/test_launch.py, the DVC and Prefect tests)."""

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


def test_two_processes_that_each_think_they_are_alone_are_refused(encoded_project):
    res = launch(encoded_project, {"ACCELERATE_USE_CPU": "false"})
    assert res.returncode != 0
    assert "Accelerate sees 1" in res.stderr and "ACCELERATE_USE_CPU=true" in res.stderr
    assert not (encoded_project / "runs/pretrain/final").exists()
