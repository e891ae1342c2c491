"""Time the default pipeline, stage by stage, in a fresh clone; print a markdown block for
RESULTS.md with the machine, commit, date, per-stage seconds, the headline metrics and, for every
fine-tuned task, the model's validation score beside the majority-class and bag-of-words baselines.

    python benchmarks/pipeline.py            # the default pipeline, as `make pipeline` runs it
    python benchmarks/pipeline.py --workdir runs/bench/glue-dev \\
        --set prepare.tasks.kind=glue_dir prepare.tasks.glue_dir=$PWD/../shared/data/glue \\
              'prepare.tasks.tasks=[cola, sst2, stsb]'      # the same pipeline on real GLUE files

Uses the current venv's dvc and libraries, and the clone's own lmcore (``PYTHONPATH`` is the
clone, so that every stage runs the code being timed, whatever the venv's editable install points
at). ``--set key=value`` changes params.yaml in the clone (the value is read as YAML);
``--workdir`` keeps the clone (default: a temporary folder). Given
an existing clone, ``--workdir`` runs there again: DVC skips the stages whose inputs did not
change, so after a default run, ``--set`` with GLUE tasks times only what they change.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from lmcore.config import set_key
from lmcore.core.machine import cpu_name, git_commit
from lmcore.stages import ORDER as STAGES

ROOT = Path(__file__).resolve().parent.parent


def apply_sets(params_file: Path, sets: list[str]) -> None:
    """Write ``key.path=value`` settings (values parsed as YAML) into ``params_file``."""
    params = yaml.safe_load(params_file.read_text())
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected key.path=value")
        set_key(params, key, yaml.safe_load(value))
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))


def run(workdir: Path, sets: list[str]) -> tuple[dict[str, float], dict[str, dict], str]:
    """Clone the repository into ``workdir``, apply ``sets`` and run every stage; return the seconds
    per stage (the fine-tune group per task), the metrics files and the clone's commit."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "PYTHONPATH": str(workdir.resolve()),
           "MLFLOW_DISABLE_TELEMETRY": "true", "LMCORE_PIPELINE_RUN": f"bench-{int(time.time())}"}
    if not workdir.exists():
        subprocess.run(["git", "clone", "-q", str(ROOT), str(workdir)], check=True)
    elif not (workdir / ".git").is_dir() or not (workdir / "dvc.yaml").is_file():
        raise SystemExit(f"--workdir {workdir} exists but is not a clone of this project")
    if sets:
        apply_sets(workdir / "params.yaml", sets)
    tasks = yaml.safe_load((workdir / "params.yaml").read_text())["prepare"]["tasks"]["tasks"]
    times: dict[str, float] = {}
    for stage in STAGES:
        for target in [f"finetune@{t}" for t in tasks] if stage == "finetune" else [stage]:
            t0 = time.perf_counter()
            subprocess.run(["dvc", "repro", "-s", target], cwd=workdir, env=env, check=True,
                           stdout=subprocess.DEVNULL)
            times[target] = time.perf_counter() - t0
    metrics = {s: json.loads((workdir / f"metrics/{s}.json").read_text()) for s in ("pretrain", "evaluate")}
    for t in tasks:
        metrics[f"finetune/{t}"] = json.loads((workdir / f"metrics/finetune/{t}.json").read_text())
    return times, metrics, git_commit(workdir)


def report(times: dict[str, float], metrics: dict[str, dict], commit: str, command: str) -> str:
    lines = [f"### {datetime.date.today()}, commit {commit}\n",
             f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch threads default. Command: `{command}`\n",
             "| stage | seconds |", "|---|---|"]
    lines += [f"| {s} | {t:.0f} |" for s, t in times.items()]
    lines.append(f"| **total** | **{sum(times.values()):.0f}** |\n")
    ev, pt = metrics["evaluate"], metrics["pretrain"]
    lines.append(f"- pretraining: {pt['tokens_per_second']:,.0f} tokens/s, {pt['n_params'] / 1e6:.2f}M parameters")
    lines.append(f"- validation bits per byte: {ev['lm.val_bpb']:.3f} (unigram baseline {ev['lm.unigram_val_bpb']:.3f}); "
                 f"perplexity {ev['lm.val_perplexity']:.1f}\n")
    tasks = {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("finetune/")}
    if tasks:
        lines += ["| task (validation) | metric | model | majority class | bag of words | best epoch | fine-tune s |",
                  "|---|---|---|---|---|---|---|"]
        for task, m in tasks.items():
            names = [k for k in m if f"bow_{k}" in m and f"majority_{k}" in m
                     and not k.startswith(("bow_", "majority_")) and k != "score"]
            for k in names + ["score"]:
                lines.append(f"| {task} | {k} | {m[k]:.4f} | {m[f'majority_{k}']:.4f} | {m[f'bow_{k}']:.4f} | "
                             f"{m['best_epoch'] if k == 'score' else ''} | "
                             f"{times.get(f'finetune@{task}', float('nan')):.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="params.yaml changes in the clone")
    p.add_argument("--workdir", default=None,
                   help="keep the clone here, or run again in a clone kept before (default: a temporary folder)")
    args = p.parse_args()
    command = " ".join(["python benchmarks/pipeline.py", *sys.argv[1:]])
    if args.workdir:
        times, metrics, commit = run(Path(args.workdir).resolve(), args.set)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            times, metrics, commit = run(Path(tmp) / "clone", args.set)
    print(report(times, metrics, commit, command))


if __name__ == "__main__":
    main()
