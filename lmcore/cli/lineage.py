"""``lmcore lineage``: the chain from raw corpus to evaluation behind a run, a folder or a
pipeline execution (not a stage); the walk is :mod:`lmcore.lineage`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from lmcore import config
from lmcore.config import ConfigError
from lmcore.core.errors import StageError


def add_parser(sub: Any) -> None:
    """The ``lineage`` subcommand of the ``lmcore`` CLI."""
    p = sub.add_parser("lineage", help="the chain raw corpus -> clean -> tokenizer -> tokens -> pretraining -> "
                                       "fine-tuning -> evaluation behind a run, a registered model, a folder or a pipeline "
                                       "execution")
    p.add_argument("what", help="an MLflow run id, a pipeline key or its parent run id, a registered model "
                                "(models:/lmcore-base@champion, models:/lmcore-sst2/2), or a file or folder "
                                "(runs/pretrain/final: the run that wrote it as it is now)")


def main(args: argparse.Namespace) -> int:
    from lmcore.lineage import render, trace  # lazy: the CLI loads a command's code only when it runs
    from lmcore.tracking import open_client, reading_store  # lazy: as above

    try:
        if not args.what.strip():
            raise StageError("give a run id, a pipeline key, a models:/ URI or an output path (not an empty string)")
        tracking = config.load(args.params).tracking
        if not tracking.enabled:
            raise StageError("tracking.enabled is false: there are no MLflow runs to follow")
        client, experiment_id, uri = open_client(tracking, existing=True)
        with reading_store(uri):  # a store failing now, or a run gone (mlflow gc): named, no traceback
            text = render(trace(client, experiment_id, args.what))
    except (ConfigError, StageError) as e:
        print(f"lmcore lineage: error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0 if "MISSING LINK" not in text else 1
