"""``lmcore tracking-server``: MLflow on PostgreSQL for a team or a shared machine (not a stage).

Argument parsing and printing; the servers are :mod:`lmcore.tracking_server`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lmcore import config
from lmcore.config import ConfigError
from lmcore.core.errors import StageError


def add_parser(sub: Any) -> None:
    """The ``tracking-server`` subcommand of the ``lmcore`` CLI."""
    sub.add_parser("tracking-server", help="run an MLflow tracking server on a PostgreSQL database, as "
                                           "params.yaml's tracking.server says (until SIGTERM or Ctrl-C)")


def main(args: argparse.Namespace) -> int:
    """Run ``lmcore tracking-server`` from parsed arguments (reads ``args.params`` and ``args.root``)."""
    # lazy: the CLI loads a command's code only when that command runs
    from lmcore.tracking_server import serve

    try:
        cfg = config.load(args.params).tracking.server
        return serve(cfg, Path(args.root), say=lambda line: print(f"lmcore tracking-server: {line}", flush=True))
    except (ConfigError, StageError) as e:
        print(f"lmcore tracking-server: error: {e}", file=sys.stderr)
        return 2
