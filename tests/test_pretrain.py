"""Pretraining: the sampler, loss normalisation, schedules, golden losses, exact resume after a
kill or a signal, NaN steps. Several processes and machines against one: tests/test_launch.py."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import BIN, run_env

from lmcore import config
from lmcore.core.errors import StageError
from lmcore.model.decoder import Decoder, DecoderConfig
from lmcore.train.checkpoint import list_checkpoints
from lmcore.train.sampler import WindowSampler, micro_batches
from lmcore.train.schedule import lr_factor
from lmcore.train.step import accumulate

GOLDEN = Path(__file__).parent / "golden" / "pretrain_tiny.json"
VOCAB = 64


def markov_tokens(n: int, seed: int) -> np.ndarray:
    """Tokens from a fixed sparse Markov chain: learnable structure, no files needed."""
    rng = np.random.default_rng(1234)
    nxt = rng.integers(0, VOCAB, size=(VOCAB, 3))
    out = np.empty(n, dtype=np.uint16)
    r = np.random.default_rng(seed)
    t = 0
    for i in range(n):
        t = int(nxt[t, r.integers(0, 3)]) if r.random() < 0.9 else int(r.integers(0, VOCAB))
        out[i] = t
    return out


def write_tokens(folder: Path, n_train: int = 30_000, n_val: int = 4_000) -> Path:
    """A token folder in the encode stage's format (one shard per split)."""
    folder.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, n, seed in (("train", n_train, 1), ("validation", n_val, 2)):
        toks = markov_tokens(n, seed)
        toks.tofile(folder / f"{split}.bin")
        np.array([0, n], dtype="<u8").tofile(folder / f"{split}.idx")
        splits[split] = {"tokens": n, "documents": 1, "bytes": 2 * n, "sources": {},
                         "shards": [{"file": f"{split}.bin", "index": f"{split}.idx", "source": "synthetic",
                                     "source_sha256": "0", "tokens": n, "documents": 1, "bytes": 2 * n}]}
    manifest = {"format": 1, "dtype": "uint16", "index_dtype": "uint64", "vocab_size": VOCAB, "eot_id": 0,
                "tokenizer_sha256": "synthetic", "splits": splits}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


TINY = {"model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32}, "batch_size": 4, "max_steps": 20,
        "warmup_steps": 4, "lr": 0.01, "eval_interval": 10, "eval_batches": 2, "log_interval": 1,
        "checkpoint_interval": 10, "mixed_precision": "no", "threads": 1, "seed": 7}


def make_project(root: Path, tracking: dict | None = None, **pretrain) -> Path:
    """A project folder with token shards and a params.yaml holding ``TINY`` updated by ``pretrain``
    (tracking off unless ``tracking`` gives the section)."""
    write_tokens(root / "data/tokens")
    settings = {**TINY, **pretrain, "model": {**TINY["model"], **pretrain.get("model", {})}}
    params = {"pretrain": settings, "evaluate": {"stride": 16},
              "tracking": tracking or {"enabled": False}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def run_cli(root: Path, *, wait: bool = True, launcher: list[str] | None = None, env: dict | None = None):
    cmd = (launcher or [str(BIN / "lmcore")]) + ["--params", str(root / "params.yaml"), "--root", str(root), "pretrain"]
    if launcher:  # accelerate launch -m lmcore.cli ...
        cmd = launcher + ["--params", str(root / "params.yaml"), "--root", str(root), "pretrain"]
    full_env = {**run_env(), **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, cwd=root, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, cwd=root, env=full_env, capture_output=True, text=True, timeout=600)


def train_losses(root: Path) -> list[tuple[int, str]]:
    with open(root / "metrics/plots/pretrain_train.csv") as f:
        return [(int(r["step"]), r["train_loss"]) for r in csv.DictReader(f)]


def final_weights(root: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(root / "runs/pretrain/final/model.safetensors")


# ---------------------------------------------------------------------------------------------
# pieces


def test_sampler_visits_every_window_once_per_epoch_and_resumes_from_its_position():
    tokens = np.arange(1000)
    s = WindowSampler(len(tokens), block=32, seed=5)
    assert s.n_windows == (1000 - 32) // 32
    epoch0 = s.starts(0, s.n_windows)
    offset = epoch0.min() % 32
    assert sorted(epoch0 - offset) == [k * 32 for k in range(s.n_windows)]  # a permutation of the windows
    assert not np.array_equal(epoch0, s.starts(s.n_windows, s.n_windows))  # the next epoch differs
    assert (epoch0 + 33 <= len(tokens)).all()
    a = WindowSampler(len(tokens), 32, seed=5)
    first = [a.next_step(tokens, 7) for _ in range(5)]
    b = WindowSampler(len(tokens), 32, seed=5)
    b.load_state_dict({**a.state_dict(), "pos": 14})
    assert np.array_equal(b.next_step(tokens, 7), first[2])
    assert not np.array_equal(WindowSampler(len(tokens), 32, seed=6).starts(0, 10), s.starts(0, 10))
    with pytest.raises(StageError, match="at least 2 x block_size"):
        WindowSampler(50, 32, seed=1)


def test_one_process_with_double_accumulation_sees_the_windows_of_two_processes():
    windows = np.arange(2 * 2 * 3 * 9).reshape(12, 9)
    one = micro_batches(windows, batch=3, accum=4, rank=0)
    two = micro_batches(windows, batch=3, accum=2, rank=0) + micro_batches(windows, batch=3, accum=2, rank=1)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(one, two))


def test_accumulated_loss_is_normalised_by_all_target_tokens_of_the_step():
    from accelerate import Accelerator

    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=16, block_size=16))
    x = torch.randint(0, VOCAB, (6, 16))
    y = torch.randint(0, VOCAB, (6, 16))
    y[0, :13] = -100  # micro-batches with very different numbers of target tokens
    y[3:, 5:] = -100
    acc = Accelerator(cpu=True)

    def grads():
        g = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        return g

    loss_sum, n = accumulate(model, [(x[:1], y[:1]), (x[1:3], y[1:3]), (x[3:], y[3:])], acc)
    loss_micro = float(loss_sum) / n
    g_micro = grads()
    _, big = model(x, y)  # mean over all target tokens of one big batch
    big.backward()
    g_big = grads()
    assert n == int((y != -100).sum())
    assert math.isclose(loss_micro, float(big.detach()), rel_tol=1e-5)
    for a, b in zip(g_micro, g_big):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # the naive mean of per-micro-batch means is a different gradient
    for xb, yb in ((x[:1], y[:1]), (x[1:3], y[1:3]), (x[3:], y[3:])):
        (model(xb, yb)[1] / 3).backward()
    assert any(not torch.allclose(a, b, rtol=1e-3) for a, b in zip(grads(), g_big))


def test_schedules():
    cos = config.PretrainConfig(max_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    wsd = config.PretrainConfig(max_steps=100, warmup_steps=10, min_lr_ratio=0.1, schedule="wsd", decay_fraction=0.2)
    for cfg in (cos, wsd):
        assert lr_factor(0, cfg) < lr_factor(5, cfg) < lr_factor(9, cfg) <= 1.0
        assert math.isclose(lr_factor(99, cfg), 0.1, abs_tol=1e-3)
    assert [lr_factor(s, wsd) for s in (10, 50, 79)] == [1.0, 1.0, 1.0]
    assert 0.1 < lr_factor(90, wsd) < 1.0
    assert lr_factor(50, cos) < 1.0 and lr_factor(10, cos) == 1.0


# ---------------------------------------------------------------------------------------------
# whole runs


@pytest.mark.parametrize("attention", ["auto", "sdpa", "matmul"])
def test_golden_loss_trajectory(tmp_path, attention):
    """The first 20 losses of a fixed tiny run, with each attention kernel (``auto`` is whichever
    is faster here). A change to the model, the data order, the loss or the optimizer shows here;
    if it is intended, regenerate with LMCORE_UPDATE_GOLDEN=1."""
    root = make_project(tmp_path, attention=attention)
    res = run_cli(root)
    assert res.returncode == 0, res.stderr[-3000:]
    chosen = re.search(r"attention (sdpa|matmul)", res.stdout + res.stderr)
    assert chosen and (attention == "auto" or chosen.group(1) == attention), res.stdout[-2000:]
    losses = [float(v) for _, v in train_losses(root)]
    assert len(losses) == 20
    if os.environ.get("LMCORE_UPDATE_GOLDEN") and attention == "sdpa":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"settings": TINY, "train_loss": losses}, indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert golden["settings"] == TINY
    np.testing.assert_allclose(losses, golden["train_loss"], rtol=0, atol=2e-4)
    assert losses[-1] < losses[0] - 0.5  # it learns
    # the learning rate logged at step k is the one step k trained with (factor of step k - 1, 0-based)
    with open(root / "metrics/plots/pretrain_train.csv") as f:
        logged = [(int(r["step"]), float(r["lr"])) for r in csv.DictReader(f)]
    cfg = config.PretrainConfig(**TINY)
    assert logged == [(k, pytest.approx(cfg.lr * lr_factor(k - 1, cfg), rel=1e-6)) for k in range(1, 21)]


# long enough (tens of ms per step) for a test to interrupt it after a checkpoint
RESUMABLE = {"max_steps": 40, "checkpoint_interval": 10, "model": {"n_embd": 96, "n_head": 4}, "batch_size": 16}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = make_project(tmp_path_factory.mktemp("straight"), **RESUMABLE)
    res = run_cli(root)
    assert res.returncode == 0, res.stderr[-3000:]
    return root


def _wait_for(proc, path: Path, timeout: float = 120) -> None:
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, "the run ended before it could be interrupted"
        assert time.time() - t0 < timeout
        time.sleep(0.005)


def _assert_same_run(a: Path, b: Path) -> None:
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k  # bitwise
    assert train_losses(a) == train_losses(b)


def test_killed_run_resumes_bitwise_identically(straight, tmp_path):
    db = tmp_path / "mlflow.db"
    root = make_project(tmp_path, tracking={"tracking_uri": f"sqlite:///{db}", "experiment": "resume"}, **RESUMABLE)
    proc = run_cli(root, wait=False)
    _wait_for(proc, root / "runs/pretrain/checkpoints/step-000020")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (root / "runs/pretrain/final").exists()
    steps = [s for s, _ in list_checkpoints(root / "runs/pretrain/checkpoints")]
    assert 20 in steps and 40 not in steps
    ckpt = root / "runs/pretrain/checkpoints/step-000020"
    assert (ckpt / "model.safetensors").exists() and not list(ckpt.glob("custom_checkpoint*"))  # no pickles of ours
    assert json.loads((ckpt / "trainer.json").read_text())["sampler"]["pos"] == 20 * 16
    res = run_cli(root)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from step" in res.stdout + res.stderr
    _assert_same_run(straight, root)
    # the last 2 checkpoints plus the best by validation loss are kept
    kept = [s for s, _ in list_checkpoints(root / "runs/pretrain/checkpoints")]
    assert kept[-2:] == [30, 40] and len(kept) <= 3
    # MLflow: the killed run is continued, not doubled: one run, one loss curve over every step
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert run.info.status == "FINISHED" and "continuing MLflow run" in res.stderr
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert set(steps) == set(range(1, 41))  # steps after the checkpoint and before the kill are logged twice
    assert run.data.params["resumed_from_step"] == "0" and run.data.tags["lmcore.resume.resumed_from_step"] == "20"
    # the finished run run again: it resumes at its end and trains, validates and registers nothing new
    val_rows = (root / "metrics/plots/pretrain_val.csv").read_text()
    metrics = json.loads((root / "metrics/pretrain.json").read_text())
    versions = client.search_model_versions(f"run_id = '{run.info.run_id}'")
    val_history = client.get_metric_history(run.info.run_id, "val_loss")
    assert len(versions) == 1
    res = run_cli(root)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from step 40" in res.stdout + res.stderr and "not registered again" in res.stderr
    assert (root / "metrics/plots/pretrain_val.csv").read_text() == val_rows
    again = json.loads((root / "metrics/pretrain.json").read_text())
    assert again["val_loss"] == metrics["val_loss"] and again["train_loss"] == metrics["train_loss"]
    assert len(client.search_model_versions("name = 'lmcore-base'")) == 1
    assert client.get_metric_history(run.info.run_id, "val_loss") == val_history
    (rerun,) = [r for r in client.search_runs([run.info.experiment_id]) if r.info.run_id != run.info.run_id]
    assert rerun.data.tags["lmcore.resumes_run"] == run.info.run_id
    assert rerun.data.tags["lmcore.model_version"] == run.data.tags["lmcore.model_version"] == "models:/lmcore-base/1"
    assert rerun.data.metrics["val_loss"] == pytest.approx(metrics["val_loss"])


def test_sigterm_saves_a_checkpoint_and_the_rerun_finishes_identically(straight, tmp_path):
    root = make_project(tmp_path, **RESUMABLE)
    proc = run_cli(root, wait=False)
    _wait_for(proc, root / "runs/pretrain/checkpoints/step-000010")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out[-2000:]
    assert "stopped by SIGTERM" in out and "run again to resume" in out
    said = re.search(r"stopped by SIGTERM at step (\d+); checkpoint saved in \S*step-(\d+)", out)
    assert said and said.group(1) == str(int(said.group(2))), out[-2000:]
    stopped_at = int(said.group(1))  # the step it stopped at is the newest checkpoint, saved then
    assert list_checkpoints(root / "runs/pretrain/checkpoints")[-1][0] == stopped_at and 10 <= stopped_at < 40
    saved = root / f"runs/pretrain/checkpoints/step-{stopped_at:06d}/trainer.json"
    trainer = json.loads(saved.read_text())
    assert trainer["step"] == stopped_at
    # what `auto` resolved to is recorded; a resume where it resolves otherwise (another machine
    # kind) is said, not silent (here the record is changed: the run itself goes on as before)
    assert trainer["resolved"]["mixed_precision"] == "no" and trainer["resolved"]["attention"] in ("sdpa", "matmul")
    saved.write_text(json.dumps({**trainer, "resolved": {"mixed_precision": "bf16", "attention": "matmul"}}))
    res = run_cli(root)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resuming from step {stopped_at}" in res.stdout + res.stderr
    assert "resuming a run that trained with {'mixed_precision': 'bf16'" in res.stdout + res.stderr
    _assert_same_run(straight, root)


def test_changed_settings_start_afresh(straight, tmp_path):
    import shutil

    root = tmp_path / "p"
    shutil.copytree(straight, root)
    ckpts = root / "runs/pretrain/checkpoints"
    before = {p.name: (p / "trainer.json").read_text() for _, p in list_checkpoints(ckpts)}
    # new settings that fail before their first checkpoint: the old run's checkpoints are all kept
    make_project(root, **RESUMABLE, lr=1e30)
    res = run_cli(root)
    assert res.returncode == 2 and "starting afresh" in res.stdout + res.stderr, res.stderr[-3000:]
    assert {p.name: (p / "trainer.json").read_text() for _, p in list_checkpoints(ckpts)} == before
    make_project(root, **RESUMABLE, lr=0.005)
    res = run_cli(root)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "starting afresh" in res.stdout + res.stderr and "resuming" not in res.stdout + res.stderr
    # ... and once the new run has checkpoints, the old run's are gone
    hashes = {json.loads((p / "trainer.json").read_text())["config_hash"] for _, p in list_checkpoints(ckpts)}
    assert len(hashes) == 1 and hashes.isdisjoint(json.loads(t)["config_hash"] for t in before.values())


def test_under_muon_the_logged_lr_is_adamws_and_muons_is_its_own(tmp_path):
    """The lr column (and curve) showed Muon's rate (muon_lr) under optimizer: muon, not the
    pretrain.lr it is documented as."""
    root = make_project(tmp_path, optimizer="muon", lr=0.001, muon_lr=0.05, max_steps=8, warmup_steps=2,
                        eval_interval=8, checkpoint_interval=8)
    res = run_cli(root)
    assert res.returncode == 0, res.stderr[-3000:]
    with open(root / "metrics/plots/pretrain_train.csv") as f:
        rates = [float(r["lr"]) for r in csv.DictReader(f)]
    assert len(rates) == 8 and 0 < max(rates) <= 0.001 and rates[2] == pytest.approx(0.001)  # after warm-up


def test_an_unfinished_run_is_not_dropped_for_changed_settings(straight, tmp_path):
    """Changed settings (here lr) over an unfinished run started afresh, and the run's first
    checkpoint deleted the unfinished one's: its steps were lost without a question."""
    import shutil

    root = tmp_path / "p"
    shutil.copytree(straight, root)
    ckpts = root / "runs/pretrain/checkpoints"
    newest = list_checkpoints(ckpts)[-1][1]
    trainer = json.loads((newest / "trainer.json").read_text())
    assert trainer["max_steps"] == RESUMABLE.get("max_steps", TINY["max_steps"]) == trainer["step"]  # finished
    (newest / "trainer.json").write_text(json.dumps({**trainer, "max_steps": trainer["step"] + 100}))  # unfinished
    before = {p.name: (p / "trainer.json").read_text() for _, p in list_checkpoints(ckpts)}
    make_project(root, **RESUMABLE, lr=0.005)
    res = run_cli(root)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert f"{newest} is step {trainer['step']} of {trainer['step'] + 100} of an unfinished run of other settings" \
        in res.stderr and f"remove {ckpts} to start afresh" in res.stderr
    assert {p.name: (p / "trainer.json").read_text() for _, p in list_checkpoints(ckpts)} == before


def test_a_finished_run_of_other_code_trains_again(straight, tmp_path):
    """A code change makes DVC and Prefect run pretrain again; its finished checkpoint (same
    settings) was resumed at its end, so the stage wrote the old code's weights as the new ones."""
    import shutil

    root = tmp_path / "p"
    shutil.copytree(straight, root)
    ckpts = root / "runs/pretrain/checkpoints"
    step, newest = list_checkpoints(ckpts)[-1]
    trainer = json.loads((newest / "trainer.json").read_text())
    assert len(trainer["code"]) == 64  # the code's hash, recorded with every checkpoint
    (newest / "trainer.json").write_text(json.dumps({**trainer, "code": "0" * 64}))
    res = run_cli(root)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert "a finished run of other code" in out and "resuming" not in out
    assert json.loads((list_checkpoints(ckpts)[-1][1] / "trainer.json").read_text())["code"] == trainer["code"]


@pytest.mark.parametrize("damage", ["trainer_empty", "trainer_not_json", "weights_truncated"])
def test_a_corrupt_newest_checkpoint_is_named_and_nothing_is_removed(straight, tmp_path, damage):
    import shutil

    root = tmp_path / "p"
    shutil.copytree(straight, root)
    ckpts = root / "runs/pretrain/checkpoints"
    kept = [p.name for _, p in list_checkpoints(ckpts)]
    newest = ckpts / kept[-1]
    if damage == "trainer_empty":
        (newest / "trainer.json").write_text("{}")
    elif damage == "trainer_not_json":
        (newest / "trainer.json").write_text("{not json")
    else:
        with open(newest / "model.safetensors", "r+b") as f:
            f.truncate(1000)
    res = run_cli(root)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert f"{newest}" in res.stderr and "corrupt checkpoint" in res.stderr and "to start afresh" in res.stderr
    assert [p.name for _, p in list_checkpoints(ckpts)] == kept


def test_nonfinite_losses_skip_steps_then_stop(tmp_path, monkeypatch):
    """A forward pass that returns NaN (as a numerical blow-up would): each such step is skipped
    and counted; too many in a row stop the run with a message naming what to change."""
    from accelerate.state import AcceleratorState

    from lmcore.train import pretrain as pt

    root = make_project(tmp_path)
    real_forward = Decoder.forward
    calls = {"n": 0}

    def flaky(self, idx, targets=None, reduction="mean", return_logits=True):
        logits, loss = real_forward(self, idx, targets, reduction, return_logits)
        if self.training and targets is not None:
            calls["n"] += 1
            if calls["n"] in (3, 4, -990, -989) or calls["n"] >= 12:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(Decoder, "forward", flaky)
    AcceleratorState._reset_state(True)
    cfg = config.load(root / "params.yaml").pretrain
    with pytest.raises(StageError, match="not finite for 5 steps in a row.*pretrain.lr"):
        pt.pretrain(cfg, root / "data/tokens", root / "runs/pretrain", root / "m.json",
                    tracking=config.TrackingConfig(enabled=False))
    assert not (root / "runs/pretrain/final").exists()
    AcceleratorState._reset_state(True)
    calls["n"] = -1000  # now only two steps fail, far from each other's limit
    res = pt.pretrain(cfg, root / "data/tokens", tmp_path / "out2", root / "m2.json",
                      tracking=config.TrackingConfig(enabled=False))
    AcceleratorState._reset_state(True)
    assert res.skipped_steps == 2 and math.isfinite(res.val_loss)
    assert json.loads((root / "m2.json").read_text())["skipped_steps"] == 2


def test_auto_precision_trains(tmp_path):
    """The default ``auto`` resolves to bf16 or fp32 by a measured probe, then trains."""
    root = make_project(tmp_path, mixed_precision="auto", max_steps=4, warmup_steps=2, checkpoint_interval=4,
                        eval_interval=4)
    res = run_cli(root)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (root / "runs/pretrain/final/model.safetensors").exists()


def test_compile_on_a_cpu_without_a_cxx_compiler_is_refused_before_training(tmp_path):
    root = make_project(tmp_path, compile=True)
    res = run_cli(root, env={"CXX": str(tmp_path / "no-g++")})  # what inductor looks for, read at its import
    assert res.returncode == 2, res.stderr
    assert "pretrain.compile = true: torch.compile builds its CPU kernels with a C++ compiler" in res.stderr
    assert "Traceback" not in res.stderr and not (root / "runs/pretrain/final").exists()


def test_fp16_is_refused_on_cpu(tmp_path):
    root = make_project(tmp_path, mixed_precision="fp16")
    res = run_cli(root)
    assert res.returncode == 2
    assert "fp16" in res.stderr and "refused on CPU" in res.stderr and "bf16" in res.stderr
    assert not (root / "runs/pretrain/final").exists()
