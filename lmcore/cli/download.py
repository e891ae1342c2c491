"""``lmcore download``: a registered model's folder from the MLflow model registry (not a
stage): lmcore's model folder, or with ``--hf`` its Hugging Face export, which ``transformers``
loads. The registry access is :func:`lmcore.tracking.download_model`."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from lmcore import config
from lmcore.config import ConfigError
from lmcore.core.errors import StageError


def add_parser(sub: Any) -> None:
    """The ``download`` subcommand of the ``lmcore`` CLI."""
    p = sub.add_parser("download", help="download a registered model (models:/<name>@<alias> or "
                                        "models:/<name>/<version>) into a folder")
    p.add_argument("uri", help="models:/lmcore-base@champion, models:/lmcore-sst2/3, ...")
    p.add_argument("dest", help="folder to write (must not exist yet)")
    p.add_argument("--hf", action="store_true", help="the Hugging Face export attached to that version by the "
                                                     "export stage (with its tokenizer; transformers loads it)")


def main(args: argparse.Namespace) -> int:
    from lmcore.tracking import download_model  # lazy: MLflow loads only when a command reads the registry

    dest = Path(args.dest)
    try:
        if not args.uri.startswith("models:/"):
            raise StageError(f"{args.uri}: not a registered model URI (models:/<name>@<alias> or "
                             "models:/<name>/<version>)")
        if dest.exists():
            raise StageError(f"{dest}: already exists (give a new folder)")
        cfg = config.load(args.params).tracking
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # a file where a folder should be, no permission
            raise StageError(f"{dest}: cannot be the folder to download into ({e.strerror or e})") from None
        # downloaded beside the destination, then renamed: an interrupted download leaves no half folder
        try:
            with tempfile.TemporaryDirectory(prefix=f".{dest.name}.", dir=dest.parent) as tmp:
                got = download_model(cfg, args.uri, Path(tmp) / "model", hf=args.hf)
                shutil.move(str(got), dest)
        except OSError as e:  # the folder beside the destination cannot be written
            raise StageError(f"{dest}: cannot download there ({e.strerror or e})") from None
    except (ConfigError, StageError) as e:
        print(f"lmcore download: error: {e}", file=sys.stderr)
        return 2
    kind = "Hugging Face folder" if args.hf else "lmcore model folder"
    print(f"lmcore download: {args.uri} -> {dest} ({kind}, {len([f for f in dest.rglob('*') if f.is_file()])} files)")
    return 0
