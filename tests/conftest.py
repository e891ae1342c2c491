"""Shared fixtures: offline, telemetry-free settings and tiny data written by the tests."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

os.environ.update({
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "TOKENIZERS_PARALLELISM": "false",
})
os.environ.pop("LMCORE_PIPELINE_RUN", None)

WORDS = ("the a of and to in is was he she it that for on with as his her they at by this had not but from "
         "king queen night day love war sword crown river stone light dark old young good ill fair foul heart "
         "hand eye word time world life death house field city sea ship wind fire water land").split()


# the longest test files (minutes each, measured): collected first, so that under pytest-xdist's
# --dist loadfile (make test) no worker starts one of them while the other is nearly done
HEAVIEST_FIRST = ("test_pipeline_dvc.py", "test_pretrain.py", "test_flow.py", "test_launch.py", "test_lineage.py",
                  "test_prefect_worker.py", "test_tracking_server.py", "test_errors.py")


def pytest_configure(config: pytest.Config) -> None:
    # pytest-xdist >= 3.7 reorders --dist loadfile's files by their number of tests (many quick
    # tests first), which undid HEAVIEST_FIRST: the longest file then started last and the suite
    # took minutes longer (benchmarks/RESULTS.md)
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return HEAVIEST_FIRST.index(name) if name in HEAVIEST_FIRST else len(HEAVIEST_FIRST)

    items.sort(key=rank)  # stable: the order within a file and among the others is kept


def make_text(rng: random.Random, n_words: int) -> str:
    lines, line = [], []
    for _ in range(n_words):
        line.append(rng.choice(WORDS))
        if len(line) >= rng.randint(6, 12):
            lines.append(" ".join(line).capitalize() + rng.choice([".", ",", ";", "!", "?"]))
            line = []
    return "\n".join(lines) + "\n"


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    """Twelve small text documents plus one exact duplicate and one too-short document."""
    rng = random.Random(0)
    d = tmp_path / "corpus"
    d.mkdir()
    texts = [make_text(rng, 400) for _ in range(12)]
    for i, t in enumerate(texts):
        (d / f"doc{i:02d}.txt").write_text(t)
    (d / "dup.txt").write_text(texts[3])
    (d / "short.txt").write_text("Too short.\n")
    return d


def write_sst2_like(folder: Path, n_train: int = 120, n_dev: int = 40) -> Path:
    """An SST-2 folder in the GLUE layout; the label is whether the sentence says 'good'."""
    rng = random.Random(1)
    task = folder / "SST-2"
    task.mkdir(parents=True)

    def rows(n: int) -> list[str]:
        out = []
        for i in range(n):
            label = i % 2
            word = "good" if label else "ill"
            out.append(f"{make_text(rng, 6).strip()} {word} {make_text(rng, 4).strip()}\t{label}")
        return out

    (task / "train.tsv").write_text("sentence\tlabel\n" + "\n".join(rows(n_train)) + "\n")
    (task / "dev.tsv").write_text("sentence\tlabel\n" + "\n".join(rows(n_dev)) + "\n")
    return folder


def tiny_params(corpus: Path, glue_dir: Path, tracking_uri: str) -> dict:
    """Settings that run the whole pipeline in seconds."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["prepare"] = {"corpus": {"kind": "files", "paths": [str(corpus)], "shard_mb": 0.01},  # several shards
                         "tasks": {"kind": "glue_dir", "tasks": ["sst2"], "glue_dir": str(glue_dir)}}
    params["clean"].update(min_chars=50, validation_fraction=0.25, filters={})
    params["tokenizer"]["vocab_size"] = 400
    params["pretrain"].update(model={"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32},
                              max_steps=12, warmup_steps=2, batch_size=4, eval_interval=6, eval_batches=2,
                              log_interval=3, mixed_precision="no")
    params["finetune"]["defaults"].update(epochs=1, batch_size=16, max_length=32,
                                          scratch_baseline=False)  # tests/test_glue.py covers the twin
    params["finetune"]["mixed_precision"] = "no"
    params["evaluate"].update(max_tokens=600, stride=16, max_new_tokens=4, prompts=["The king"])
    params["tracking"] = {"tracking_uri": tracking_uri, "experiment": "lmcore-test"}
    return params


@pytest.fixture
def tiny_project(tmp_path: Path, corpus_dir: Path) -> Path:
    """A copy of the repository's pipeline files in a fresh git + DVC repo, with tiny params."""
    proj = tmp_path / "proj"
    proj.mkdir()
    for name in ("dvc.yaml", "lmcore", "configs", "tasks", "flows"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, proj / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, proj / name)
    glue = write_sst2_like(tmp_path / "glue")
    params = tiny_params(corpus_dir, glue, f"sqlite:///{proj / 'mlflow.db'}")
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (proj / ".gitignore").write_text((ROOT / ".gitignore").read_text())
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    for cmd in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"]):
        subprocess.run(cmd, cwd=proj, check=True, env=env)
    return proj


def run_env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def mlflow_runs(db: Path, experiment: str = "lmcore-test") -> list:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id], max_results=1000)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
