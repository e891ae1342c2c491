"""One Prefect task per stage. The work is :func:`lmcore.stages.run_stage`; this module only adds
Prefect's retries and caching (keyed on the stage's params sections, input file contents and
lmcore's code), and lets the ``clean`` stage spread its shards over the flow's task runner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.task_runners import ThreadPoolTaskRunner

from lmcore import config
from lmcore.core.layout import Layout
from lmcore.data.clean import clean_shard
from lmcore.stages import ORDER, cache_key, run_stage

RETRIES = {"prepare": 2}  # downloads can fail for passing reasons; training reruns cost too much


@task(name="clean-shard", retries=1, cache_policy=NO_CACHE, persist_result=False)
def clean_shard_task(index: int, source: Path, work: Path, cfg: config.CleanConfig) -> Any:
    """One shard of the clean stage (:func:`lmcore.data.clean.clean_shard`)."""
    return clean_shard(index, source, work, cfg)


def _shard_mapper():
    """Map clean's shards over the flow's task runner when it is a parallel or distributed one
    (Dask, Ray...); with Prefect's default thread pool, lmcore's own process pool is faster."""
    ctx = FlowRunContext.get()
    if ctx is None or isinstance(ctx.task_runner, ThreadPoolTaskRunner):
        return None
    return lambda jobs: [f.result() for f in clean_shard_task.map(*map(list, zip(*jobs)))]


def _key(stage: str):
    def key_fn(context: Any, parameters: dict[str, Any]) -> str:
        params = config.load(parameters["params_file"])
        item = parameters.get("item")
        key = cache_key(stage, params, Layout(Path(parameters["root"])), item)
        return f"{stage}-{item}-{key}" if item else f"{stage}-{key}"

    return key_fn


def stage_task(stage: str):
    """The Prefect task of a stage. A ``foreach`` stage (``finetune``) takes ``item`` (the task
    name): the flow runs it once per item, each run cached on its own inputs and params."""
    def run(params_file: str = "params.yaml", root: str = ".", item: str | None = None) -> Any:
        extra: dict[str, Any] = {"map_shards": _shard_mapper()} if stage == "clean" else {}
        if item is not None:
            extra["task"] = item
        return run_stage(stage, config.load(params_file), Layout(Path(root)), **extra)

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
