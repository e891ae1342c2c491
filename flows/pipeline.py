"""The whole pipeline as a Prefect flow: the same stages, in order, one task each.

Run it with ``python -m flows.pipeline [--params params.yaml] [--force]``, or deploy it on a
work pool with ``prefect deploy`` (see ``prefect.yaml`` and the README).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import yaml
from prefect import flow
from prefect.runtime import flow_run

from lmcore import config
from lmcore.config import ConfigError
from lmcore.core.errors import StageError
from lmcore.core.layout import Layout
from lmcore.report import report_execution
from lmcore.stages import ORDER, outputs_current, stage_items
from lmcore.summary import summarize
from lmcore.tracking import PIPELINE_ENV
from tasks import STAGE_TASKS, launch_overrides


@flow(name="lmcore-pipeline", log_prints=True)
def pipeline(params_file: str = "params.yaml", root: str = ".", force: bool = False,
             launch: dict[str, Any] | None = None, until: str | None = None,
             launch_defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run every stage; a stage whose inputs, params and code are unchanged and whose outputs are
    still the ones this flow wrote for them is taken from Prefect's cache
    (:func:`lmcore.stages.outputs_current`). ``finetune`` runs as one task run per task of
    ``prepare.tasks.tasks`` (like DVC's ``finetune@<task>`` stages), one after the other: each
    uses every core. All stages log under one MLflow parent run; the flow ends by printing
    :func:`lmcore.summary.summarize` (which also gives an execution of cached tasks its parent
    run, linked to the runs it reused).

    ``launch``: values replacing those of ``params.yaml``'s ``launch`` section for this run (e.g.
    ``{"config": "configs/accelerate/multi-gpu.yaml"}`` on a GPU worker, ``{"num_processes": 2}``):
    pretrain and finetune run under ``accelerate launch`` as it says, in child processes.

    ``until``: stop after this stage (the stages before it run or come from the cache), e.g.
    ``"encode"`` to prepare the token shards only.

    ``launch_defaults``: a deployment's own ``launch`` values for its machines (``prefect.yaml``'s
    ``gpu`` deployment: the multi-GPU config, not the CPU); ``launch`` goes over them key by key.
    Prefect replaces a parameter given on a run whole, so a run's ``-p launch='{"num_processes":
    4}'`` would otherwise drop the deployment's GPU settings and train on the CPU."""
    previous = os.environ.get(PIPELINE_ENV)
    os.environ[PIPELINE_ENV] = previous or f"prefect-{flow_run.get_id()}"
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    results: dict[str, Any] = {}
    layout = Layout(Path(root))
    launch = {**(launch_defaults or {}), **(launch or {})} or None
    try:
        params = config.load(params_file, launch_overrides(launch))  # a bad value fails before any stage runs
        if until is not None and until not in ORDER:
            raise StageError(f"until = '{until}': no such stage ({', '.join(ORDER)})")
        for name in ORDER[: ORDER.index(until) + 1] if until else ORDER:
            items = stage_items(name, params)
            if items is None:
                refresh = force or not outputs_current(name, params, layout)
                results[name] = STAGE_TASKS[name].with_options(refresh_cache=refresh)(params_file, root, launch=launch)
                continue
            results[name] = {}
            for item in items:
                refresh = force or not outputs_current(name, params, layout, item)
                task = STAGE_TASKS[name].with_options(refresh_cache=refresh, task_run_name=f"{name}-{item}")
                results[name][item] = task(params_file, root, item, launch=launch)
        if until is None:  # recorded in MLflow even when every task came from the cache
            text = summarize(params, layout, os.environ[PIPELINE_ENV])
            print(text)
            print(f"report: {report_execution(params, layout, os.environ[PIPELINE_ENV], text)}")
    finally:
        if previous is None:
            os.environ.pop(PIPELINE_ENV, None)
    return results


def with_dask(address: str | None = None, workers: int | None = None):
    """The pipeline flow on a Dask task runner: an existing cluster (``address``, e.g.
    ``tcp://scheduler:8786``) or a local cluster of ``workers`` processes. The clean stage then
    spreads its shards over the Dask workers (which need the same code and a shared filesystem)."""
    from prefect_dask import DaskTaskRunner

    if address:
        runner = DaskTaskRunner(address=address)
    else:
        runner = DaskTaskRunner(cluster_kwargs={"n_workers": workers or 2, "threads_per_worker": 1, "processes": True})
    return pipeline.with_options(task_runner=runner)


def main() -> None:
    ap = argparse.ArgumentParser(description="Run the lmcore pipeline as a Prefect flow.")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--root", default=".")
    ap.add_argument("--force", action="store_true", help="ignore cached stage results")
    ap.add_argument("--launch", action="append", default=[], metavar="KEY=VALUE",
                    help="replace a value of params.yaml's launch section for this run (num_processes=2, "
                         "config=configs/accelerate/gpu.yaml); repeatable")
    ap.add_argument("--until", metavar="STAGE", help="stop after this stage")
    ap.add_argument("--dask-address", help="run on this Dask scheduler (tcp://host:8786)")
    ap.add_argument("--dask-workers", type=int, help="run on a local Dask cluster of this many worker processes")
    args = ap.parse_args()
    flow = with_dask(args.dask_address, args.dask_workers) if (args.dask_address or args.dask_workers) else pipeline
    launch = {}
    for item in args.launch:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--launch {item}: expected KEY=VALUE")
        try:
            launch[key.removeprefix("launch.")] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            ap.error(f"--launch {item}: the value is not valid YAML ({str(e).splitlines()[0]})")
    if args.until is not None and args.until not in ORDER:
        ap.error(f"--until {args.until}: no such stage ({', '.join(ORDER)})")
    try:
        # checked before the flow starts: Prefect logs a failing flow's exception with its traceback
        config.load(args.params, launch_overrides(launch or None))
        flow(args.params, args.root, args.force, launch or None, args.until)
    except (ConfigError, StageError) as e:  # a problem in the user's input: one line, no traceback
        raise SystemExit(f"lmcore flow: error: {e}") from None


if __name__ == "__main__":
    main()
