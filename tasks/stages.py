"""One Prefect task per stage. The work is :func:`lmcore.stages.run_stage`; this module only adds
Prefect's retries and caching (keyed on the stage's params sections and input file contents)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from lmcore import config
from lmcore.layout import Layout
from lmcore.stages import ORDER, cache_key, run_stage

RETRIES = {"prepare": 2}  # downloads can fail for passing reasons; training reruns cost too much


def _key(stage: str):
    def key_fn(context: Any, parameters: dict[str, Any]) -> str:
        params = config.load(parameters["params_file"])
        return f"{stage}-{cache_key(stage, params, Layout(Path(parameters['root'])))}"

    return key_fn


def stage_task(stage: str):
    def run(params_file: str = "params.yaml", root: str = ".") -> Any:
        return run_stage(stage, config.load(params_file), Layout(Path(root)))

    run.__name__ = run.__qualname__ = stage
    return task(
        run,
        name=stage,
        retries=RETRIES.get(stage, 0),
        retry_delay_seconds=10,
        cache_key_fn=_key(stage),
        persist_result=True,
    )


STAGE_TASKS = {name: stage_task(name) for name in ORDER}
