"""Time the default pipeline, stage by stage, in a fresh clone; print a markdown block for
RESULTS.md with the machine, commit, date, per-stage seconds and the headline metrics.

    python benchmarks/pipeline.py            # uses the current venv's dvc and lmcore
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lmcore.machine import cpu_name
from lmcore.stages import ORDER as STAGES

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "MLFLOW_DISABLE_TELEMETRY": "true", "LMCORE_PIPELINE_RUN": f"bench-{int(time.time())}"}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["git", "clone", "-q", str(ROOT), tmp], check=True)
        times = {}
        for stage in STAGES:
            t0 = time.perf_counter()
            subprocess.run(["dvc", "repro", "-s", stage], cwd=tmp, env=env, check=True, stdout=subprocess.DEVNULL)
            times[stage] = time.perf_counter() - t0
        metrics = {s: json.loads((Path(tmp) / f"metrics/{s}.json").read_text()) for s in ("pretrain", "evaluate")}
    total = sum(times.values())
    print(f"### Default pipeline, {datetime.date.today()}, commit {commit}\n")
    print(f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch threads default. "
          f"Command: `python benchmarks/pipeline.py`\n")
    print("| stage | seconds |\n|---|---|")
    for s, t in times.items():
        print(f"| {s} | {t:.0f} |")
    print(f"| **total** | **{total:.0f}** |\n")
    ev, pt = metrics["evaluate"], metrics["pretrain"]
    print(f"- pretraining throughput: {pt['tokens_per_second']:,.0f} tokens/s ({pt['n_params'] / 1e6:.2f}M parameters)")
    print(f"- validation bits per byte: {ev['lm.val_bpb']:.3f} (unigram baseline {ev['lm.unigram_val_bpb']:.3f}); "
          f"perplexity {ev['lm.val_perplexity']:.1f}")
    for k, v in ev.items():
        if k.endswith(".accuracy") and not k.endswith("majority_accuracy"):
            task = k.rsplit(".", 1)[0]
            print(f"- {task} accuracy: {v:.4f} (majority class {ev[f'{task}.majority_accuracy']:.4f})")


if __name__ == "__main__":
    main()
