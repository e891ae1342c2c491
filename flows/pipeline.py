"""The whole pipeline as a Prefect flow: the same stages, in order, one task each.

Run it with ``python -m flows.pipeline [--params params.yaml] [--force]``, or deploy it on a
work pool with ``prefect deploy`` (see ``prefect.yaml`` and the README).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from lmcore.layout import Layout
from lmcore.stages import ORDER, outputs_exist
from lmcore.tracking import PIPELINE_ENV
from tasks import STAGE_TASKS


@flow(name="lmcore-pipeline", log_prints=True)
def pipeline(params_file: str = "params.yaml", root: str = ".", force: bool = False) -> dict[str, Any]:
    """Run every stage; a stage whose inputs and params are unchanged and whose outputs exist is
    taken from Prefect's cache. All stages log under one MLflow parent run."""
    previous = os.environ.get(PIPELINE_ENV)
    os.environ[PIPELINE_ENV] = previous or f"prefect-{flow_run.get_id()}"
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    results: dict[str, Any] = {}
    try:
        for name in ORDER:
            refresh = force or not outputs_exist(name, Layout(Path(root)))
            results[name] = STAGE_TASKS[name].with_options(refresh_cache=refresh)(params_file, root)
    finally:
        if previous is None:
            os.environ.pop(PIPELINE_ENV, None)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description="Run the lmcore pipeline as a Prefect flow.")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--root", default=".")
    ap.add_argument("--force", action="store_true", help="ignore cached stage results")
    args = ap.parse_args()
    pipeline(args.params, args.root, args.force)


if __name__ == "__main__":
    main()
