"""Training throughput under glibc's malloc, tuned as lmcore's training processes tune it
(``lmcore.core.machine.tune_malloc``), against tcmalloc (``launch.allocator``). Entries before
this header said "system malloc" were measured before train_throughput.py tuned glibc by default.

The allocator is chosen when a process starts (``LD_PRELOAD``), so the two cannot share one
process: this script runs ``benchmarks/train_throughput.py`` (same arguments, its own interleaved
rounds of the models inside) once per allocator, alternating, ``--repeats`` times, and gives for
each shape and model the median of the runs' median tokens/s and the peak resident memory.

    python benchmarks/allocator.py --shapes 2x4x256,6x6x384 --models lmcore,plain
    python benchmarks/allocator.py --repeats 3 -- --precision fp32 --batch 8

Arguments after ``--`` go to train_throughput.py unchanged.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from lmcore.core.machine import cpu_flags, cpu_name, find_tcmalloc, git_commit  # noqa: E402

ROW = re.compile(r"^\| (\d+x\d+x\d+) \| (\S+) \|.*?\| ([\d,]+) \| [\d,]+-[\d,]+ \|")


def run(preload: str | None, args: list[str]) -> tuple[dict[tuple[str, str], float], float, str]:
    """One train_throughput.py run: tokens/s per (shape, model), its peak RSS in MB, its header."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if preload:
        env["LD_PRELOAD"] = preload
    cmd = ["/usr/bin/time", "-f", "maxrss_kb %M", sys.executable, str(HERE / "train_throughput.py"), *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"train_throughput.py failed:\n{res.stderr[-3000:]}")
    rates = {}
    for line in res.stdout.splitlines():
        m = ROW.match(line)
        if m:
            rates[(m.group(1), m.group(2))] = float(m.group(3).replace(",", ""))
    rss = next(float(line.split()[1]) / 1024 for line in res.stderr.splitlines() if line.startswith("maxrss_kb"))
    header = "\n".join(line for line in res.stdout.splitlines() if line.startswith(("batch", "matmul peak")))
    return rates, rss, header


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="2x4x256,6x6x384")
    ap.add_argument("--models", default="lmcore,plain")
    ap.add_argument("--repeats", type=int, default=2, help="runs per allocator, alternating")
    ap.add_argument("rest", nargs="*", help="more train_throughput.py arguments (after --)")
    args = ap.parse_args()
    tcmalloc = find_tcmalloc()
    if tcmalloc is None:
        raise SystemExit("no tcmalloc on this machine (Debian: apt-get install libtcmalloc-minimal4)")
    # --malloc tuned: without tcmalloc, lmcore's training processes tune glibc (tune_malloc), and that,
    # not glibc's defaults, is what tcmalloc replaces
    tt_args = ["--shapes", args.shapes, "--models", args.models, "--rounds", "3", "--steps", "3", "--batch", "8",
               "--malloc", "tuned", *args.rest]
    runs: dict[str, list[dict[tuple[str, str], float]]] = {"system": [], "tcmalloc": []}
    rss: dict[str, list[float]] = {"system": [], "tcmalloc": []}
    header = ""
    for i in range(args.repeats):
        for name, preload in (("system", None), ("tcmalloc", tcmalloc)) if i % 2 == 0 else \
                (("tcmalloc", tcmalloc), ("system", None)):
            rates, mb, header = run(preload, tt_args)
            runs[name].append(rates)
            rss[name].append(mb)
            print(f"# {name} run {len(runs[name])}: " + ", ".join(f"{s} {m} {v:,.0f}" for (s, m), v in rates.items()),
                  file=sys.stderr, flush=True)
    print(f"machine: {cpu_name()} ({cpu_flags()}); commit {git_commit(HERE.parent)}; tcmalloc {tcmalloc}; "
          f"date {datetime.date.today().isoformat()}; command: python benchmarks/allocator.py {' '.join(sys.argv[1:])}")
    print(header)
    print(f"train_throughput.py {' '.join(tt_args)}; {args.repeats} runs per allocator, alternating\n")
    print("| shape | model | glibc malloc (tuned) tokens/s | tcmalloc tokens/s | tcmalloc / glibc |")
    print("|---|---|---|---|---|")
    for key in runs["system"][0]:
        a = statistics.median(r[key] for r in runs["system"])
        b = statistics.median(r[key] for r in runs["tcmalloc"])
        print(f"| {key[0]} | {key[1]} | {a:,.0f} | {b:,.0f} | {b / a:.2f}x |")
    print(f"\npeak resident memory of a run (MB): system {max(rss['system']):,.0f}, "
          f"tcmalloc {max(rss['tcmalloc']):,.0f}")


if __name__ == "__main__":
    main()
