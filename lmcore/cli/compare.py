"""``lmcore compare``: the pipeline runs of an MLflow experiment side by side (not a stage).

Argument parsing and printing; the table and the plot are :mod:`lmcore.eval.compare`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lmcore import config
from lmcore.config import ConfigError, TrackingConfig
from lmcore.core.errors import StageError


def add_parser(sub: Any) -> None:
    """The ``compare`` subcommand of the ``lmcore`` CLI."""
    p = sub.add_parser("compare", help="compare the pipeline runs of an MLflow experiment (a table and a plot; "
                                       "not a pipeline stage)")
    p.add_argument("--experiment", help="MLflow experiment (default: tracking.experiment in the params file)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: tracking.tracking_uri in the params file)")
    p.add_argument("--metric",
                   help="sort by this metric: a bare name (evaluate's NAME or lm.NAME, else pretrain's NAME) or "
                        "<stage>.<metric>, e.g. pretrain.tokens_per_second_mean, evaluate.glue.score, "
                        "finetune:rotten_tomatoes.score (default: val_bpb)")
    p.add_argument("--out", help="output folder (default: runs/compare under --root)")
    p.add_argument("--runs", type=int, default=20, help="the most recent N runs (default: 20; 0: all)")
    p.add_argument("pair", nargs="*", metavar="RUN",
                   help="two pipeline runs (keys or run ids): say whether B differs from A beyond noise (a paired "
                        "bootstrap over validation windows and examples) instead of the table")
    p.add_argument("--resamples", type=int, default=2000, help="paired bootstrap resamples (default: 2000)")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence of the interval (default: 0.95)")


def main(args: argparse.Namespace) -> int:
    """Run ``lmcore compare`` from parsed arguments (also reads ``args.params`` and ``args.root``)."""
    # lazy: the CLI loads a command's code (MLflow, matplotlib) only when that command runs
    from lmcore.eval.compare import compare, noise, store_settings

    try:
        # the params file's settings (a server's retries and timeout) with the store named here
        try:
            own = config.load_present(args.params, args.params_given).tracking
        except ConfigError as e:
            if args.params_given or not (args.experiment and args.tracking_uri):
                raise
            # the store is named whole on the command line: a broken params file of the folder it runs
            # in does not stop the command, it only loses that file's retry settings
            print(f"lmcore compare: note: {args.params} not read ({e}); the store's default retry settings apply",
                  file=sys.stderr)
            own = TrackingConfig()
        tracking = store_settings(own, args.experiment, args.tracking_uri)
        out = Path(args.out) if args.out else Path(args.root) / "runs/compare"
        if args.runs < 0:
            raise StageError(f"--runs = {args.runs}: give a number of runs, or 0 for all")
        if args.resamples < 100:
            raise StageError(f"--resamples = {args.resamples}: at least 100 (an interval needs many resamples; "
                             "the default is 2000)")
        if not 0 < args.confidence < 1:
            raise StageError(f"--confidence = {args.confidence}: a fraction between 0 and 1 (e.g. 0.95)")
        if out.exists() and not out.is_dir():
            raise StageError(f"--out {out}: a file, not a folder")
        if args.pair:
            if len(args.pair) != 2:
                raise StageError(f"give two runs to test against each other, not {len(args.pair)}")
            print("\n".join(noise(tracking, *args.pair, args.resamples, args.confidence)))
            return 0
        try:
            res = compare(tracking, args.metric, out, args.runs or None)
        except OSError as e:  # the store's own failures are StageErrors: this is writing --out
            raise StageError(f"--out {out}: cannot write there ({e.strerror or e}: {e.filename or out})") from e
    except (ConfigError, StageError) as e:
        print(f"lmcore compare: error: {e}", file=sys.stderr)
        return 2
    print(res.table, end="")
    print(f"lmcore compare: {len(res.runs)} run(s); wrote {res.markdown} and {res.plot}")
    return 0
