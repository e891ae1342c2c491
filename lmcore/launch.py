"""Starting the training stages the same way from DVC and from Prefect.

``pretrain`` and ``finetune@<task>`` run under ``accelerate launch``: one process or many, on
one machine or several. :func:`launch_command` builds that command from ``params.yaml``'s
``launch`` section; it is the only place that does:

- ``lmcore launch <stage>`` (what ``dvc.yaml`` runs) replaces itself with the command;
- the Prefect task of the stage runs it as a child process (:func:`run_launched`): the child's
  output streams into the task's log, its exit status decides the task's state, and a SIGTERM or
  cancellation of the flow run reaches every training process, which saves a checkpoint and
  exits; a retry resumes from it.

The Accelerate config file decides the kind of launch (``distributed_type``); ``launch``'s
fields override the per-machine values. On CPUs several processes need
``ACCELERATE_USE_CPU=true`` (from the file's ``use_cpu`` or ``launch.cpu``), which the command
sets.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import psutil
import yaml

from lmcore.config import LaunchConfig, Params
from lmcore.core.errors import MayPass, StageError
from lmcore.core.io import read_json
from lmcore.core.machine import find_tcmalloc
from lmcore.core.layout import Layout
from lmcore.stages import launch_config_file, metrics_path

_MULTI = {"MULTI_GPU", "FSDP", "DEEPSPEED", "MEGATRON_LM"}
"""Accelerate ``distributed_type`` values that already start several processes. ``MULTI_CPU``
(what ``accelerate config`` writes for CPU processes) does only with an ``mpirun_hostfile``
(under ``mpirun_config``): without one, Accelerate starts a single process."""


@dataclasses.dataclass(frozen=True)
class Launch:
    """A built launch: the command line, the environment variables it adds, and what it will
    start (from the config file and the overrides)."""

    argv: list[str]
    env: dict[str, str]
    config_file: Path
    distributed_type: str
    num_processes: int
    num_machines: int
    cpu: bool

    def describe(self) -> str:
        extra = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return f"{extra} {shlex.join(self.argv)}".strip()


def read_accelerate_config(path: Path, value: str | None = None) -> dict[str, Any]:
    """The Accelerate config file ``path`` as a mapping; errors name ``launch.config`` and its
    ``value`` as written in params.yaml."""
    key = f"launch.config = '{value or path}'"
    if not path.is_file():
        raise StageError(f"{key}: no such Accelerate config file ({path}; see configs/accelerate/)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise StageError(f"{key}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise StageError(f"{key}: not valid YAML: {e}") from None
    if not isinstance(data, dict) or "distributed_type" not in data:
        raise StageError(f"{key}: not an Accelerate config file (no distributed_type)")
    for field in ("num_processes", "num_machines"):
        v = data.get(field)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise StageError(f"{key}: {field} = {v!r} in {path}: a whole number of at least 1")
    return data


def config_path(launch: LaunchConfig, root: Path) -> Path:
    """``launch.config`` resolved against the project folder (as DVC resolves it), or the checkout
    where the project folder has no such file (:func:`lmcore.stages.launch_config_file`)."""
    return launch_config_file(launch.config, Layout(Path(root)))


def launch_command(launch: LaunchConfig, stage: str, params_file: str | Path = "params.yaml", root: str | Path = ".",
                   task: str | None = None, python: str = sys.executable) -> Launch:
    """The ``accelerate launch ... -m lmcore.cli --params P --root R <stage>`` command of
    ``launch`` (see the module docstring). ``task``: the item of a ``foreach`` stage."""
    root = Path(root)
    path = config_path(launch, root)
    file = read_accelerate_config(path, launch.config)
    dtype = str(file["distributed_type"]).upper()
    processes = launch.num_processes or int(file.get("num_processes") or 1)
    machines = launch.num_machines or int(file.get("num_machines") or 1)
    mpirun = file.get("mpirun_config") if isinstance(file.get("mpirun_config"), dict) else {}
    multi = dtype in _MULTI or (dtype == "MULTI_CPU" and bool(mpirun.get("mpirun_hostfile")))
    cpu = (bool(file.get("use_cpu")) or dtype == "MULTI_CPU") if launch.cpu is None else launch.cpu
    if dtype == "MULTI_CPU" and not cpu:
        raise StageError(f"launch.cpu = false, but {path} is a MULTI_CPU config: name a GPU config (launch.config)")
    if processes < machines:
        raise StageError(f"launch: {processes} process(es) on {machines} machines: num_processes counts the processes "
                         "of all machines (set launch.num_processes)")
    if processes % machines:  # accelerate starts num_processes // num_machines per machine, silently fewer
        raise StageError(f"launch.num_processes ({processes}) must be a multiple of num_machines ({machines}): each "
                         "machine runs the same number of processes")
    rank = launch.machine_rank if launch.machine_rank is not None else int(file.get("machine_rank") or 0)
    if not 0 <= rank < machines:
        raise StageError(f"launch.machine_rank ({rank}) must be below num_machines ({machines}"
                         f"{'' if launch.num_machines else f', from {path}'})")
    argv = [python, "-m", "accelerate.commands.launch", "--config_file", str(path)]
    if not multi and processes == 1 and machines == 1 and bool(file.get("use_cpu")) != cpu:
        # one process: accelerate's simple launcher sets ACCELERATE_USE_CPU from the file's use_cpu
        if not cpu:
            raise StageError(f"launch.cpu = false, but {path} sets use_cpu: true, which a one-process launch obeys: "
                             "set use_cpu: false there, or name another launch.config")
        argv.append("--cpu")
    if not multi and (processes > 1 or machines > 1):
        # a single-process file asked for more (or MULTI_CPU, which starts one): data parallel
        argv.append("--multi_gpu")
        dtype = "MULTI_CPU" if cpu else "MULTI_GPU"
    elif dtype == "MULTI_GPU" and cpu:
        dtype = "MULTI_CPU"
    for flag, value in (("--num_processes", launch.num_processes), ("--num_machines", launch.num_machines),
                        ("--machine_rank", launch.machine_rank), ("--main_process_ip", launch.main_process_ip),
                        ("--main_process_port", launch.main_process_port)):
        if value is not None:
            argv += [flag, str(value)]
    if machines > 1 and launch.main_process_ip is None and not file.get("main_process_ip"):
        raise StageError(f"launch: {machines} machines need launch.main_process_ip (machine 0's address)")
    argv += ["-m", "lmcore.cli", "--params", str(params_file), "--root", str(root), stage]
    if task is not None:
        argv += ["--task", task]
    env = {"ACCELERATE_USE_CPU": "true"} if cpu else {}
    preload = allocator_library(launch, cpu)
    if preload is not None:
        env["LD_PRELOAD"] = " ".join(filter(None, [preload, os.environ.get("LD_PRELOAD")]))
    return Launch(argv, env, path, dtype, processes, machines, cpu)


def allocator_library(launch: LaunchConfig, cpu: bool) -> str | None:
    """The malloc library to preload into the training processes (``launch.allocator``): with
    ``auto``, tcmalloc where this machine has it and the training runs on CPUs; None for the
    system's allocator."""
    value = launch.allocator
    if value == "system":
        return None
    if value == "auto":
        if cpu:
            return find_tcmalloc()
        import torch  # lazy: 1.3 s to import, which the launching process needs for this one question

        return None if torch.cuda.is_available() else find_tcmalloc()
    if not sys.platform.startswith("linux"):
        raise StageError(f"launch.allocator = '{value}': preloading a malloc library needs Linux (LD_PRELOAD); "
                         "use auto or system here")
    if not Path(value).is_file():
        raise StageError(f"launch.allocator = '{value}': no such file (auto, system, or the path of a malloc "
                         "library such as /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4)")
    return str(Path(value).resolve())


USER_MESSAGE = re.compile(r"^lmcore [\w-]+: (error: |stopped by )")
"""A training process's one-line report of a problem in the user's input, or of a stop by a
signal (``lmcore.cli``). The launcher's traceback that follows it is noise: not shown."""


class _Pump:
    """Streams a launch's output to ``log``, line by line; after the first :data:`USER_MESSAGE`
    only such messages pass (the launcher would add its own traceback of the same failure)."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log, self.tail, self.messages = log, [], []

    def __call__(self, stream: IO[str]) -> None:
        for line in stream:
            line = line.rstrip("\n")
            if USER_MESSAGE.match(line):
                self.messages.append(line)
            elif self.messages:
                continue
            self.log(line)
            self.tail.append(line)
            del self.tail[:-40]


def stop_launch(proc: subprocess.Popen, grace: float) -> None:
    """Stop a launch: SIGTERM to the training processes (the launcher's descendants), which save
    a checkpoint and exit, and then the launcher exits on its own; whatever is left of the
    process group after ``grace`` seconds gets SIGTERM, then SIGKILL. The launcher is not
    signalled first: it would die at once and leave its training processes behind."""
    try:
        trainers = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        trainers = []
    for p in trainers:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGTERM)
    for sig, wait in ((None, grace), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        if sig is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@dataclasses.dataclass(frozen=True)
class LaunchResult:
    returncode: int
    """The training processes' status: 0, 2 (a problem in the input, reported in ``messages``),
    128 + signal (stopped by a signal after a checkpoint), else the launcher's."""
    tail: list[str]
    """The last 40 lines of output shown."""
    messages: list[str]
    """The training processes' one-line error or stop reports (:data:`USER_MESSAGE`)."""


def run_launched(launch: Launch, log: Callable[[str], None] = print, cwd: str | Path | None = None,
                 grace: float = 120.0) -> LaunchResult:
    """Run ``launch`` as a child process group, streaming its output line by line to ``log``.

    An exception while waiting (Prefect's ``TerminationSignal`` when the flow run is cancelled or
    SIGTERMed, ``KeyboardInterrupt``) stops the children first (:func:`stop_launch`: they save a
    checkpoint) and is then raised again."""
    log(f"launch: {launch.describe()}")
    proc = subprocess.Popen(launch.argv, env={**os.environ, **launch.env}, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
    pump = _Pump(log)
    reader = threading.Thread(target=pump, args=(proc.stdout,), daemon=True)
    reader.start()
    try:
        rc = proc.wait()
    except BaseException:
        log(f"launch: stopping the training processes (SIGTERM; the process group's SIGTERM after {grace:.0f} s, "
            f"SIGKILL after {grace + 10:.0f} s)")
        try:
            stop_launch(proc, grace)
        except BaseException:  # a second signal while they stop: no more waiting, and none left behind
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            raise
        raise
    finally:
        reader.join(timeout=10)
    stopped = next((m for m in pump.messages if "stopped by SIG" in m), None)
    if rc != 0 and stopped is not None:
        rc = 128 + next((int(s) for s in signal.Signals if f"stopped by {s.name} " in stopped), signal.SIGTERM)
    elif rc != 0 and pump.messages:
        rc = 2
    return LaunchResult(rc, list(pump.tail), list(pump.messages))


def run_here(launch: Launch) -> int:
    """``lmcore launch``: run ``launch`` in the foreground, output to this process's stdout (the
    training processes' one-line reports to stderr), SIGTERM and SIGINT passed on to the training
    processes; the exit status of :func:`run_launched`."""
    def to_terminal(line: str) -> None:
        print(line, file=sys.stderr if USER_MESSAGE.match(line) else sys.stdout, flush=True)

    received = [signal.SIGINT]  # a KeyboardInterrupt without SIGTERM is Ctrl-C

    def on_term(signum, _frame):
        received[0] = signal.SIGTERM
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        return run_launched(launch, to_terminal).returncode
    except KeyboardInterrupt:
        return 128 + received[0]  # 130 for Ctrl-C, 143 for SIGTERM, as a shell reports them
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_stage_launched(stage: str, params: Params, params_file: str | Path, root: str | Path,
                       item: str | None = None, log: Callable[[str], None] = print, grace: float = 120.0) -> Any:
    """Run a training stage as ``dvc.yaml`` does (:func:`launch_command`, then
    :func:`run_launched`, output to ``log``; ``grace``: the seconds a stop waits for the
    processes' checkpoint); return its metrics, or raise :class:`StageError`
    with the last lines of output when the processes fail (:class:`MayPass` unless they named a
    problem in the input: exit status 2)."""
    result = run_launched(launch_command(params.launch, stage, params_file, root, item), log, grace=grace)
    if result.returncode != 0:
        tail = "\n".join(result.tail[-15:])
        # status 2: lmcore named a problem in the input (the same again on a retry); else a crash or a kill
        error = StageError if result.returncode == 2 else MayPass
        raise error(f"{stage}{'@' + item if item else ''}: the launched processes exited with status "
                    f"{result.returncode}:\n{tail}")
    return read_json(metrics_path(stage, Layout(Path(root)), item))
