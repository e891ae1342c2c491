"""``lmcore summary``: what one pipeline execution did, in a few lines (not a stage).

``make pipeline`` runs it after ``dvc repro``; the text is :func:`lmcore.summary.summarize`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from lmcore import config
from lmcore.config import ConfigError
from lmcore.core.errors import StageError
from lmcore.core.layout import Layout
from lmcore.tracking import PIPELINE_ENV


def add_parser(sub: Any) -> None:
    """The ``summary`` subcommand of the ``lmcore`` CLI."""
    p = sub.add_parser("summary", help="each stage's time, the headline numbers and the outputs of one pipeline "
                                       "execution; records it in MLflow even when every stage was cached, and writes its "
                                       "HTML report to runs/report/")
    p.add_argument("--pipeline", help=f"the execution's key (default: ${PIPELINE_ENV}, as make pipeline sets it)")


def main(args: argparse.Namespace) -> int:
    from lmcore.report import report_execution  # lazy: the CLI loads a command's code only when it runs
    from lmcore.summary import summarize  # lazy: as above

    try:
        params = config.load(args.params)
        layout, key = Layout(Path(args.root)), args.pipeline or os.environ.get(PIPELINE_ENV)
        text = summarize(params, layout, key)
        print(text, flush=True)
        page = report_execution(params, layout, key, text)
    except (ConfigError, StageError) as e:
        print(f"lmcore summary: error: {e}", file=sys.stderr)
        return 2
    print(f"report: {page} (open it in a browser)")
    return 0
