"""What tracking costs a pretraining run: tracking off, the sqlite default, and an HTTP tracking
server on PostgreSQL (``lmcore tracking-server``), interleaved, same data and settings.

    python benchmarks/tracking_overhead.py --project /path/to/a/project/with/data --steps 200 --rounds 3

``--project`` is a folder where the data stages have run (``data/tokens``, ``data/tokenizer``),
e.g. after ``make pipeline``. Each run is ``lmcore launch pretrain`` from scratch in a scratch
folder that links that data; the stage's own ``tokens_per_second`` and its wall time are compared.
The stage times its steps without the logging calls between them (``tr.metrics`` comes after a
step's clock stops), so its tokens/s cannot show what logging costs: the wall time, start-up
included, is the measure of the overhead. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from lmcore.core.machine import cpu_flags, cpu_name, git_commit  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    (folder / "server.yaml").write_text(yaml.safe_dump(
        {"tracking": {"server": {"port": port, "postgres_port": free_port(), "data": "server"}}}))
    proc = subprocess.Popen([sys.executable, "-m", "lmcore.cli", "--params", "server.yaml", "tracking-server"],
                            cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    for line in proc.stdout:
        print(f"# {line.rstrip()}", file=sys.stderr)
        if "MLflow tracking server at" in line:
            return proc, f"http://127.0.0.1:{port}"
    raise SystemExit(f"the tracking server did not start (exit {proc.wait()})")


def run(work: Path, params: dict, mode: str, url: str) -> tuple[float, float]:
    p = {**params, "tracking": {**params["tracking"], "enabled": mode != "off",
                                "tracking_uri": url if mode == "http" else f"sqlite:///{work / 'mlflow.db'}"}}
    (work / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    shutil.rmtree(work / "runs", ignore_errors=True)  # from scratch, never a resume
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "lmcore.cli", "launch", "pretrain"], cwd=work, capture_output=True,
                         text=True, env={**os.environ, "LMCORE_PIPELINE_RUN": f"overhead-{mode}"})
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"pretrain ({mode}) failed:\n{out.stderr[-3000:]}")
    tps = yaml.safe_load((work / "metrics/pretrain.json").read_text())["tokens_per_second"]
    return tps, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--project", required=True, type=Path)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    project = args.project.resolve()
    work = Path(tempfile.mkdtemp(prefix="lmcore-overhead-", dir="/tmp"))
    work.chmod(0o755)  # PostgreSQL runs as 'nobody' under root and must reach its folder
    (work / "data").symlink_to(project / "data")
    for name in ("configs", "lmcore"):
        (work / name).symlink_to(HERE.parent / name)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["pretrain"].update(max_steps=args.steps, checkpoint_interval=args.steps,
                              warmup_steps=min(params["pretrain"].get("warmup_steps", 0), args.steps // 4))
    server, url = start_server(work)
    results: dict[str, list[tuple[float, float]]] = {"off": [], "sqlite": [], "http": []}
    try:
        modes = list(results)
        run(work, params, "off", url)  # warm-up, not counted: the first run measures and caches the peak
        for r in range(args.rounds):
            for mode in modes[r % 3:] + modes[:r % 3]:  # rotate the order each round
                results[mode].append(run(work, params, mode, url))
                print(f"# round {r + 1} {mode}: {results[mode][-1][0]:,.0f} tokens/s, {results[mode][-1][1]:.1f} s",
                      file=sys.stderr, flush=True)
    finally:
        os.kill(server.pid, signal.SIGTERM)
        server.wait(60)
        shutil.rmtree(work, ignore_errors=True)
    print(f"machine: {cpu_name()} ({cpu_flags()}); commit {git_commit(HERE.parent)}; {os.cpu_count()} CPUs; "
          f"date {datetime.date.today().isoformat()}; command: python benchmarks/tracking_overhead.py "
          f"{' '.join(sys.argv[1:])}")
    m = params["pretrain"]
    print(f"pretrain {args.steps} steps, log_interval {m.get('log_interval')}, eval_interval {m.get('eval_interval')}; "
          f"{args.rounds} rounds, order rotated; medians\n")
    print("| tracking | stage wall s | wall against off | tokens/s (steps only, logging outside) |")
    print("|---|---|---|---|")
    base = statistics.median(w for _, w in results["off"])
    for mode, rows in results.items():
        tps = statistics.median(t for t, _ in rows)
        wall = statistics.median(w for _, w in rows)
        print(f"| {mode} | {wall:.1f} | {wall / base - 1:+.1%} | {tps:,.0f} |")


if __name__ == "__main__":
    main()
