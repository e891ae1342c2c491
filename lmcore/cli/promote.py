"""``lmcore promote``: give a registered model's candidate the alias ``champion`` when it beats
the current champion (not a stage); the rule is :func:`lmcore.tracking.promote`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from lmcore import config
from lmcore.config import ConfigError
from lmcore.core.errors import StageError


def add_parser(sub: Any) -> None:
    """The ``promote`` subcommand of the ``lmcore`` CLI."""
    p = sub.add_parser("promote", help="make a registered model's candidate (or --version) its champion when it "
                                       "beats the champion on the metric it was registered with")
    p.add_argument("name", help="registered model: <prefix>-base (pretrained) or <prefix>-<task> (fine-tuned)")
    p.add_argument("--version", help="the version to promote (default: the one with the alias candidate)")


def main(args: argparse.Namespace) -> int:
    from lmcore.tracking import promote  # lazy: MLflow loads only when a command reads runs

    try:
        moved, why = promote(config.load(args.params).tracking, args.name, args.version)
    except (ConfigError, StageError) as e:
        print(f"lmcore promote: error: {e}", file=sys.stderr)
        return 2
    print(f"lmcore promote: {why}")
    return 0 if moved else 1
