"""``lmcore offline-plots``: make ``dvc plots show`` render without a network (not a stage); the
template is :func:`lmcore.plots.install_offline_template`. ``make setup`` runs it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lmcore.core.errors import StageError


def add_parser(sub: Any) -> None:
    """The ``offline-plots`` subcommand of the ``lmcore`` CLI."""
    sub.add_parser("offline-plots", help="write a DVC plots page template with Vega inlined and select it in "
                                         ".dvc/config.local, so `dvc plots show` needs no CDN")


def main(args: argparse.Namespace) -> int:
    from lmcore.plots import install_offline_template  # lazy: the CLI loads a command's code only when it runs

    try:
        path = install_offline_template(Path(args.root))
    except StageError as e:
        print(f"lmcore offline-plots: error: {e}", file=sys.stderr)
        return 2
    print(f"lmcore offline-plots: {path} ({path.stat().st_size / 1e6:.1f} MB, Vega inlined); "
          "`dvc plots show` uses it (plots.html_template in .dvc/config.local)")
    return 0
