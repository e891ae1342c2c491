"""The launch section: one command for DVC and Prefect, several processes and "machines" on this
machine, and resuming a checkpoint on another number of processes."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import BIN, ROOT, make_text, mlflow_runs, run_env
from test_pretrain import final_weights, make_project, train_losses

from lmcore import config
from lmcore.config import ConfigError, LaunchConfig
from lmcore.core.errors import StageError
from lmcore.core.machine import find_tcmalloc
from lmcore.launch import launch_command
from lmcore.train.checkpoint import list_checkpoints

CPU = str(ROOT / "configs/accelerate/cpu.yaml")
ELASTIC = {"max_steps": 30, "checkpoint_interval": 10, "eval_interval": 10, "warmup_steps": 4}


def set_launch(root: Path, name: str = "params.yaml", **launch) -> Path:
    """Write ``launch`` (and any ``pretrain`` changes under the key ``pretrain``) into a copy of
    the project's params file named ``name``."""
    params = yaml.safe_load((root / "params.yaml").read_text())
    pretrain = launch.pop("pretrain", {})
    params["pretrain"].update(pretrain)
    params["launch"] = {"config": CPU, **launch}
    path = root / name
    path.write_text(yaml.safe_dump(params))
    return path


def lmcore_launch(root: Path, params: Path | None = None, wait: bool = True, **kw):
    cmd = [str(BIN / "lmcore"), "--params", str(params or root / "params.yaml"), "--root", str(root),
           "launch", "pretrain"]
    if not wait:
        return subprocess.Popen(cmd, cwd=root, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True, **kw)
    return subprocess.run(cmd, cwd=root, env=run_env(), capture_output=True, text=True, timeout=600, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_close_runs(a: Path, b: Path) -> None:
    """Same steps, losses within 1e-5 relative, weights within 1e-4 / 1e-5: the same run up to
    the order of floating-point sums (all-reduce against accumulation)."""
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
    la, lb = train_losses(a), train_losses(b)
    assert [s for s, _ in la] == [s for s, _ in lb]
    np.testing.assert_allclose([float(v) for _, v in la], [float(v) for _, v in lb], rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# the command


def test_the_command_follows_the_launch_section(tmp_path):
    one = launch_command(LaunchConfig(config=CPU, allocator="system"), "pretrain", "p.yaml", tmp_path)
    assert one.argv[1:] == ["-m", "accelerate.commands.launch", "--config_file", CPU, "-m", "lmcore.cli",
                            "--params", "p.yaml", "--root", str(tmp_path), "pretrain"]
    assert one.env == {"ACCELERATE_USE_CPU": "true"} and one.num_processes == 1
    two = launch_command(LaunchConfig(config=CPU, num_processes=2), "finetune", task="sst2")
    assert "--multi_gpu" in two.argv and two.argv[two.argv.index("--num_processes") + 1] == "2"
    assert two.argv[-3:] == ["finetune", "--task", "sst2"] and two.distributed_type == "MULTI_CPU"
    node = launch_command(LaunchConfig(config=CPU, num_processes=4, num_machines=2, machine_rank=1,
                                       main_process_ip="10.0.0.1", main_process_port=29501), "pretrain")
    flags = dict(zip(node.argv[::2], node.argv[1::2]))
    assert (flags["--num_machines"], flags["--machine_rank"], flags["--main_process_ip"]) == ("2", "1", "10.0.0.1")
    gpus = launch_command(LaunchConfig(config=str(ROOT / "configs/accelerate/multi-gpu.yaml"), allocator="system"),
                          "pretrain")
    assert gpus.env == {} and gpus.num_processes == 8 and "--multi_gpu" not in gpus.argv  # the file says it


def test_launch_cpu_is_obeyed_by_a_one_process_launch(tmp_path):
    """Accelerate's one-process launcher takes use_cpu from the config file and overwrote the
    ACCELERATE_USE_CPU lmcore set: launch.cpu was ignored (a GPU file trained on the GPU)."""
    gpu = tmp_path / "gpu.yaml"
    gpu.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\nnum_processes: 1\nuse_cpu: false\n")
    on_cpu = launch_command(LaunchConfig(config=str(gpu), cpu=True, allocator="system"), "pretrain")
    assert "--cpu" in on_cpu.argv[: on_cpu.argv.index("-m", 2)] and on_cpu.env == {"ACCELERATE_USE_CPU": "true"}
    assert "--cpu" not in launch_command(LaunchConfig(config=str(gpu), allocator="system"), "pretrain").argv
    with pytest.raises(StageError, match=r"launch.cpu = false, but .*cpu.yaml sets use_cpu: true"):
        launch_command(LaunchConfig(config=CPU, cpu=False), "pretrain")


def test_a_multi_cpu_config_of_accelerate_config_starts_every_process(tmp_path):
    """`accelerate config` writes distributed_type MULTI_CPU for CPU processes, which Accelerate
    launches as one process without an mpirun hostfile: lmcore reported 2 processes and trained
    one on half the global batch. Run for real, with a script printing each process's rank."""
    import subprocess
    import sys

    from conftest import run_env

    file = tmp_path / "multi-cpu.yaml"
    file.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nnum_processes: 2\n"
                    "num_machines: 1\nmachine_rank: 0\nuse_cpu: false\nmixed_precision: 'no'\n")
    built = launch_command(LaunchConfig(config=str(file), allocator="system"), "pretrain")
    assert built.cpu and built.distributed_type == "MULTI_CPU" and built.num_processes == 2
    (tmp_path / "ranks.py").write_text("import os; print('rank', os.environ['RANK'], 'of', os.environ['WORLD_SIZE'])")
    argv = built.argv[: built.argv.index("-m", 2)] + [str(tmp_path / "ranks.py")]
    res = subprocess.run(argv, env={**run_env(), **built.env}, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(line for line in res.stdout.splitlines() if line.startswith("rank")) == ["rank 0 of 2", "rank 1 of 2"]
    with pytest.raises(StageError, match="is a MULTI_CPU config"):
        launch_command(LaunchConfig(config=str(file), cpu=False), "pretrain")
    # with an mpirun hostfile (accelerate config writes it under mpirun_config) Accelerate's mpirun
    # starts them all: no torchrun flag
    mpi = tmp_path / "mpi.yaml"
    mpi.write_text(file.read_text().replace("num_machines: 1", "num_machines: 2").replace("num_processes: 2",
                   "num_processes: 4") + "mpirun_config:\n  mpirun_hostfile: /etc/hosts\nmain_process_ip: 10.0.0.1\n")
    assert "--multi_gpu" not in launch_command(LaunchConfig(config=str(mpi)), "pretrain").argv


def test_the_allocator_is_preloaded_where_asked(tmp_path, monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert "LD_PRELOAD" not in launch_command(LaunchConfig(config=CPU, allocator="system"), "pretrain").env
    auto = launch_command(LaunchConfig(config=CPU), "pretrain").env
    assert auto.get("LD_PRELOAD") == find_tcmalloc()  # None (absent) on a machine without tcmalloc
    with pytest.raises(StageError, match="launch.allocator = '/no/such/libmalloc.so': no such file"):
        launch_command(LaunchConfig(config=CPU, allocator="/no/such/libmalloc.so"), "pretrain")
    with monkeypatch.context() as m:  # how the preload is composed, on any machine
        m.setattr("lmcore.launch.find_tcmalloc", lambda: "/lib/libtcmalloc_minimal.so.4")
        m.setenv("LD_PRELOAD", "libm.so.6")  # a preload of the user's own is kept
        assert launch_command(LaunchConfig(config=CPU), "pretrain").env["LD_PRELOAD"] == \
            "/lib/libtcmalloc_minimal.so.4 libm.so.6"
        assert "LD_PRELOAD" not in launch_command(LaunchConfig(config=CPU, allocator="system"), "pretrain").env
    if find_tcmalloc() is None:
        pytest.skip("no tcmalloc on this machine (Debian: apt-get install libtcmalloc-minimal4)")
    monkeypatch.setenv("LD_PRELOAD", "libm.so.6")  # a preload of the user's own is kept
    env = launch_command(LaunchConfig(config=CPU), "pretrain").env
    assert env["LD_PRELOAD"] == f"{find_tcmalloc()} libm.so.6"
    probe = "from lmcore.core.machine import allocator; print(allocator())"
    for preload, name in ((env["LD_PRELOAD"], "tcmalloc"), ("", "system")):
        out = subprocess.run([sys.executable, "-c", probe], env={**run_env(), "LD_PRELOAD": preload},
                             capture_output=True, text=True, check=True).stdout.strip()
        assert out == name


def test_bad_launch_values_name_the_key(tmp_path):
    with pytest.raises(StageError, match="launch.config = 'nowhere.yaml': no such Accelerate config file"):
        launch_command(LaunchConfig(config="nowhere.yaml"), "pretrain", root=tmp_path)
    with pytest.raises(StageError, match="main_process_ip"):
        launch_command(LaunchConfig(config=CPU, num_processes=2, num_machines=2), "pretrain")
    with pytest.raises(ConfigError, match="launch.num_processes = 0"):
        config.from_dict({"launch": {"num_processes": 0}})
    # accelerate would start 3 // 2 = 1 process on each of the 2 machines, silently
    with pytest.raises(StageError, match=r"launch.num_processes \(3\) must be a multiple of num_machines \(2\)"):
        launch_command(LaunchConfig(config=CPU, num_processes=3, num_machines=2, main_process_ip="10.0.0.1"), "pretrain")
    multi_node = str(ROOT / "configs/accelerate/multi-node.yaml")  # num_machines: 2 in the file
    with pytest.raises(StageError, match=r"launch.machine_rank \(2\) must be below num_machines \(2, from .*multi-node"):
        launch_command(LaunchConfig(config=multi_node, machine_rank=2, main_process_ip="10.0.0.1"), "pretrain")
    with pytest.raises(ConfigError, match="machine_rank .2. must be below num_machines .2."):
        config.from_dict({"launch": {"num_machines": 2, "machine_rank": 2}})
    (tmp_path / "params.yaml").write_text("launch:\n  config: nowhere.yaml\n")
    res = subprocess.run([str(BIN / "lmcore"), "launch", "pretrain"], cwd=tmp_path, env=run_env(),
                         capture_output=True, text=True)
    assert res.returncode == 2 and "launch.config = 'nowhere.yaml'" in res.stderr and "Traceback" not in res.stderr


# ---------------------------------------------------------------------------------------------
# several processes, several machines, another number of processes on resume


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One process with twice the accumulation, uninterrupted: what every launch below must match."""
    root = make_project(tmp_path_factory.mktemp("reference"), grad_accum=2, **ELASTIC)
    set_launch(root)
    res = lmcore_launch(root)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "1 process(es)" in res.stdout + res.stderr
    # tcmalloc preloaded where installed; else glibc's malloc, tuned in the process (machine.tune_malloc)
    assert f"allocator {'glibc (tuned)' if find_tcmalloc() is None else 'tcmalloc'}" in res.stdout + res.stderr
    return root


def _kill_after_checkpoint(proc: subprocess.Popen, root: Path, step: int = 10) -> int:
    """SIGKILL the whole launch once checkpoint ``step`` is complete; the newest complete step."""
    ckpt = root / f"runs/pretrain/checkpoints/step-{step:06d}/trainer.json"
    t0 = time.time()
    while not ckpt.exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() - t0 < 300
        time.sleep(0.005)
    import os

    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    steps = [s for s, _ in list_checkpoints(root / "runs/pretrain/checkpoints")]
    assert steps and steps[-1] < ELASTIC["max_steps"], steps
    return steps[-1]


def test_ctrl_c_stops_the_training_at_a_checkpoint_and_exits_130(tmp_path):
    """Ctrl-C (SIGINT to the launcher's process group, as a terminal sends it) was reported as
    143, SIGTERM's status; the training processes still stop at a checkpoint."""
    import os

    root = make_project(tmp_path, max_steps=5000, checkpoint_interval=10, eval_interval=5000, warmup_steps=4)
    set_launch(root)
    proc = lmcore_launch(root, wait=False)
    ckpt = root / "runs/pretrain/checkpoints/step-000010/trainer.json"
    t0 = time.time()
    while not ckpt.exists():
        assert proc.poll() is None and time.time() - t0 < 300, proc.stdout.read()[-3000:]
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-3000:]
    assert "stopping the training processes" in out and "stopped by SIGTERM" in out, out[-3000:]
    assert "Traceback" not in out


def test_two_processes_resume_on_one_and_a_changed_global_batch_is_refused(reference, tmp_path):
    root = make_project(tmp_path, grad_accum=1, **ELASTIC)
    set_launch(root, num_processes=2)
    stopped = _kill_after_checkpoint(lmcore_launch(root, wait=False), root)
    saved = json.loads((root / f"runs/pretrain/checkpoints/step-{stopped:06d}/trainer.json").read_text())
    assert saved["layout"] == {"processes": 2, "grad_accum": 1, "batch_size": 4}
    # one process with the same accumulation would halve the global batch: refused, nothing lost
    refused = lmcore_launch(root, set_launch(root, "half.yaml"))
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "must keep the global batch" in refused.stderr and "8 windows per step (2 process(es)" in refused.stderr
    assert "Traceback" not in refused.stdout + refused.stderr  # the launcher's own report is not shown
    assert [s for s, _ in list_checkpoints(root / "runs/pretrain/checkpoints")][-1] == stopped
    res = lmcore_launch(root, set_launch(root, "one.yaml", pretrain={"grad_accum": 2}))
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert f"resuming from step {stopped}" in out and "1 process(es)" in out
    assert "written as 8 windows per step (2 process(es) x grad_accum 1" in out
    assert_close_runs(reference, root)


def test_one_process_resumes_on_two(reference, tmp_path):
    root = make_project(tmp_path, grad_accum=2, **ELASTIC)
    set_launch(root)
    stopped = _kill_after_checkpoint(lmcore_launch(root, wait=False), root)
    res = lmcore_launch(root, set_launch(root, "two.yaml", num_processes=2, pretrain={"grad_accum": 1}))
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert f"resuming from step {stopped}" in out and "2 process(es)" in out
    assert_close_runs(reference, root)


def test_two_machines_of_one_process_match_one_process_and_only_rank_0_writes(reference, tmp_path):
    """Two "machines" (two launches, machine_rank 0 and 1, rendezvous on 127.0.0.1 over gloo) on
    a shared project folder, each with its own MLflow database: only rank 0 logs and writes."""
    root = make_project(tmp_path, grad_accum=1, **ELASTIC)
    port = free_port()
    procs = []
    for rank in (0, 1):
        params = set_launch(root, f"node{rank}.yaml", num_processes=2, num_machines=2, machine_rank=rank,
                            main_process_ip="127.0.0.1", main_process_port=port)
        raw = yaml.safe_load(params.read_text())
        raw["tracking"] = {"enabled": True, "tracking_uri": f"sqlite:///{tmp_path / f'node{rank}.db'}",
                           "experiment": "lmcore-test"}
        params.write_text(yaml.safe_dump(raw))
        procs.append(lmcore_launch(root, params, wait=False))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    assert "2 process(es)" in outs[0]
    assert "--num_machines 2 --machine_rank 1 --main_process_ip 127.0.0.1" in outs[1]
    assert_close_runs(reference, root)
    runs = mlflow_runs(tmp_path / "node0.db")
    assert [r.data.params["num_processes"] for r in runs] == ["2"]
    assert mlflow_runs(tmp_path / "node1.db") == []


def test_fsdp_on_two_cpu_processes_shards_and_resumes_from_its_sharded_checkpoint(reference, tmp_path):
    """configs/accelerate/fsdp.yaml on two CPU processes trains with FSDP2 (Accelerate alone would
    fall back to plain data parallelism there, lmcore.train.accel): sharded checkpoints, one shard
    per process, a resume from one after a kill, and the same run as one process."""
    root = make_project(tmp_path, grad_accum=1, **ELASTIC)
    set_launch(root, config=str(ROOT / "configs/accelerate/fsdp.yaml"), num_processes=2, cpu=True)
    stopped = _kill_after_checkpoint(lmcore_launch(root, wait=False), root)
    ckpt = root / f"runs/pretrain/checkpoints/step-{stopped:06d}"
    assert sorted(p.name for p in (ckpt / "pytorch_model_fsdp_0").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (ckpt / "model.safetensors").exists()  # not one whole copy: a shard per process
    res = lmcore_launch(root)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert f"resuming from step {stopped}" in out and "Saving FSDP model" in out
    assert_close_runs(reference, root)  # the final model is gathered into one whole safetensors file


def test_a_launch_asking_for_fsdp_that_lmcore_cannot_shard_on_cpu_is_refused(tmp_path):
    """FSDP1 on CPU processes: Accelerate would train plain data parallel; lmcore stops instead."""
    root = make_project(tmp_path, max_steps=4, warmup_steps=2)
    fsdp1 = yaml.safe_load((ROOT / "configs/accelerate/fsdp.yaml").read_text())
    fsdp1["fsdp_config"]["fsdp_version"] = 1
    (root / "fsdp1.yaml").write_text(yaml.safe_dump(fsdp1))
    set_launch(root, config=str(root / "fsdp1.yaml"), num_processes=2, cpu=True)
    res = lmcore_launch(root)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "asks for FSDP version 1" in res.stderr and "fsdp_version: 2" in res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    assert not (root / "runs/pretrain/final").exists()


def test_finetune_on_two_processes_with_an_odd_number_of_batches_finishes(tmp_path):
    """50 examples in batches of 4 are 13 batches an epoch: over 2 processes each takes 7 steps
    (one batch is repeated). Before, one process took a step more, a collective the other never
    joined: the launch hung."""
    import random

    from lmcore.config import TokenizerConfig
    from lmcore.core.io import write_json, write_jsonl
    from lmcore.data import glue
    from lmcore.data.tokenizer import save as save_tokenizer
    from lmcore.data.tokenizer import train
    from lmcore.model.decoder import Decoder, DecoderConfig
    from lmcore.model.folder import save_decoder

    rng = random.Random(0)
    tcfg = TokenizerConfig(vocab_size=300)
    save_tokenizer(train(tcfg, [make_text(rng, 80) for _ in range(20)]), tcfg, tmp_path / "data/tokenizer")
    torch.manual_seed(0)
    save_decoder(Decoder(DecoderConfig(vocab_size=300, n_layer=1, n_head=2, n_embd=32, block_size=32)),
                 tmp_path / "runs/pretrain/final")
    task = tmp_path / "data/raw/tasks/sst2"
    for split, n in (("train", 50), ("validation", 12)):
        write_jsonl(task / f"{split}.jsonl", [{"idx": i, "text_a": make_text(rng, 8), "label": i % 2} for i in range(n)])
    write_json(task / "task.json", glue.TASKS["sst2"].to_dict())
    params = {"prepare": {"tasks": {"kind": "glue_dir", "glue_dir": str(tmp_path / "glue"), "tasks": ["sst2"]}}, "tracking": {"enabled": False},
              "finetune": {"mixed_precision": "no", "threads": 1, "tasks": {"sst2": {}},
                           "defaults": {"epochs": 2, "batch_size": 4, "max_length": 32, "scratch_baseline": False}},
              "launch": {"config": CPU, "num_processes": 2}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    res = subprocess.run([str(BIN / "lmcore"), "--params", str(tmp_path / "params.yaml"), "--root", str(tmp_path),
                          "launch", "finetune", "--task", "sst2"], cwd=tmp_path, env=run_env(), capture_output=True,
                         text=True, timeout=120)  # ~10 s here
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "--num_processes 2" in res.stdout
    history = json.loads((tmp_path / "runs/finetune/sst2/results.json").read_text())["history"]
    # 5 of the 50 held out to choose the epoch on: 45 examples, 6 steps of 2 x 4 an epoch
    assert [h["step"] for h in history] == [6, 12] and all("holdout_score" in h for h in history)
