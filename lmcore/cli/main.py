"""``lmcore <stage>``: load ``params.yaml``, run one stage, print a one-line summary.

Errors a user can fix (a bad param, a missing or malformed input) print one line naming the
file, line or key, and exit with status 2; nothing already written is touched.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

from lmcore import config
from lmcore.cli import compare, download, generate, lineage, offline_plots, promote, score, summary, tracking_server
from lmcore.config import ConfigError
from lmcore.core.errors import Interrupted, StageError
from lmcore.core.layout import Layout
from lmcore.launch import launch_command, run_here
from lmcore.stages import ORDER, STAGE_IO, run_stage


def _summary(result: object) -> str:
    if dataclasses.is_dataclass(result):
        parts = []
        for f in dataclasses.fields(result):
            v = getattr(result, f.name)
            if isinstance(v, float):
                v = f"{v:.4g}"
            elif isinstance(v, dict) and len(str(v)) > 200:
                v = "{...}"
            parts.append(f"{f.name}={v}")
        return ", ".join(parts)
    return str(result)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmcore", description="Small language models, from raw text to evaluation.")
    parser.add_argument("--params", help="settings file (default: params.yaml; commands that can do without one "
                                         "use the built-in defaults where params.yaml is absent)")
    parser.add_argument("--root", default=".", help="project folder holding data/, runs/, metrics/")
    sub = parser.add_subparsers(dest="stage", required=True)
    for name in ORDER:
        stage = sub.add_parser(name, help=f"run the {name} stage")
        if STAGE_IO[name].foreach:
            stage.add_argument("--task", help=f"run for this item of {STAGE_IO[name].foreach} only "
                                              "(what each DVC stage finetune@<task> runs); default: every one")
    launched = [n for n in ORDER if STAGE_IO[n].launched]
    launch = sub.add_parser("launch", help=f"run a training stage ({', '.join(launched)}) under accelerate launch "
                                           "as params.yaml's launch section says (what dvc.yaml runs)")
    launch.add_argument("launched_stage", choices=launched, metavar="STAGE", help=" | ".join(launched))
    launch.add_argument("--task", help="the item of a foreach stage (finetune: the task)")
    launch.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    compare.add_parser(sub)  # not a stage: a table and a plot of the runs in MLflow
    generate.add_parser(sub)  # not a stage either: text from a model folder
    tracking_server.add_parser(sub)  # a server for a team: MLflow on PostgreSQL
    summary.add_parser(sub)  # what one pipeline execution did
    lineage.add_parser(sub)  # the chain behind a run or a folder
    promote.add_parser(sub)  # the registry's champion
    download.add_parser(sub)  # a registered model's folder
    offline_plots.add_parser(sub)  # dvc plots show without a CDN
    score.add_parser(sub)  # any model folder on held-out text, as lm-evaluation-harness scores it
    args = parser.parse_args(argv)
    args.params_given = args.params is not None  # a file named on the command line must exist
    args.params = args.params or "params.yaml"

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("mlflow", "alembic", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    commands = {"compare": compare.main, "generate": generate.main, "tracking-server": tracking_server.main,
                "summary": summary.main, "lineage": lineage.main, "promote": promote.main, "download": download.main,
                "offline-plots": offline_plots.main, "score": score.main}
    if args.stage in commands:
        try:
            return commands[args.stage](args)
        except KeyboardInterrupt:  # Ctrl-C: one line, the shell's status, as for the stages
            print(f"lmcore {args.stage}: interrupted", file=sys.stderr)
            return 130
    if args.stage == "launch":
        return _launch(args)
    try:
        params = config.load(args.params)
        options = {"task": args.task} if getattr(args, "task", None) is not None else {}
        result = run_stage(args.stage, params, Layout(Path(args.root)), **options)
    except (ConfigError, StageError) as e:
        print(f"lmcore {args.stage}: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"lmcore {args.stage}: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print(f"lmcore {args.stage}: interrupted", file=sys.stderr)
        return 130
    print(f"lmcore {args.stage}: done: {_summary(result)}")
    return 0


def _launch(args: argparse.Namespace) -> int:
    """``lmcore launch <stage>``: build the launch command (:func:`lmcore.launch.launch_command`)
    and run it in the foreground (:func:`lmcore.launch.run_here`); DVC's signals reach the
    training processes, and their exit status is DVC's."""
    try:
        params = config.load(args.params)
        foreach = STAGE_IO[args.launched_stage].foreach
        if args.task is None and foreach:
            raise StageError(f"lmcore launch {args.launched_stage} needs --task (one of "
                             f"{', '.join(params.prepare.tasks.tasks)})")
        if args.task is not None and not foreach:
            raise StageError(f"--task {args.task}: {args.launched_stage} is one stage, not one per task")
        if args.task is not None and args.task not in params.prepare.tasks.tasks:
            raise StageError(f"--task {args.task}: not a task of prepare.tasks.tasks "
                             f"({', '.join(params.prepare.tasks.tasks)})")
        launch = launch_command(params.launch, args.launched_stage, args.params, args.root, args.task)
    except (ConfigError, StageError) as e:
        print(f"lmcore launch: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(launch.describe())
        return 0
    return run_here(launch)


if __name__ == "__main__":
    sys.exit(main())
