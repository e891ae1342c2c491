"""One Prefect task per stage. The work is :func:`lmcore.stages.run_stage`; this module only adds
Prefect's retries and caching (keyed on the stage's params sections, input file contents and
lmcore's code), and lets the ``clean`` stage spread its shards over the flow's task runner.

The training stages (``launched`` in :data:`lmcore.stages.STAGE_IO`: pretrain, finetune) run the
same ``accelerate launch`` command as ``dvc.yaml`` as a child process group
(:func:`lmcore.launch.run_stage_launched`): its output goes to the task's log, a non-zero exit fails the task (a retry
of pretrain resumes from its last checkpoint), and a cancelled or SIGTERMed flow run stops the
training processes, which save a checkpoint first. The task returns the stage's metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.task_runners import ThreadPoolTaskRunner

from lmcore import config
from lmcore.config import ConfigError
from lmcore.core.errors import MayPass, StageError
from lmcore.core.layout import Layout
from lmcore.data.clean import clean_shard
from lmcore.launch import run_stage_launched
from lmcore.stages import ORDER, STAGE_IO, cache_key, record_produced, run_stage

# downloads can fail for passing reasons; pretrain's retry resumes from its last checkpoint; a
# problem in the user's input is not retried (_may_pass)
RETRIES = {"prepare": 2, "pretrain": 1}
# a cancelled flow run's process is killed 30 s after Prefect's SIGTERM (its runner's fixed grace):
# the training processes get 15 s to save their checkpoint, then SIGTERM and 10 s, then SIGKILL,
# so that none is left running unsupervised beside the next run
STOP_GRACE = 15.0


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
    # absolute paths: a worker of an external cluster resolves relative ones against its own folder
    return lambda jobs: [f.result() for f in clean_shard_task.map(
        *map(list, zip(*[(i, Path(src).resolve(), Path(work).resolve(), cfg) for i, src, work, cfg in jobs])))]


def launch_overrides(launch: dict[str, Any] | None) -> dict[str, Any]:
    """A flow's ``launch`` parameter (fields of ``params.yaml``'s ``launch`` section) as
    overrides of ``params.yaml``."""
    return {f"launch.{k}": v for k, v in (launch or {}).items()}


def _params(parameters: dict[str, Any]) -> config.Params:
    return config.load(parameters["params_file"], launch_overrides(parameters.get("launch")))


def _may_pass(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry condition: retry what a second try may not meet (a download, a training
    process that crashed or was killed: :class:`~lmcore.core.errors.MayPass`, or an error lmcore
    did not foresee), not a problem in the user's input (the same error again, after a wait)."""
    try:
        state.result()
    except MayPass:
        return True
    except (StageError, ConfigError):
        return False
    except Exception:  # noqa: BLE001 - anything else may be passing
        return True
    return True


def _key(stage: str):
    def key_fn(context: Any, parameters: dict[str, Any]) -> str:
        params = _params(parameters)
        item = parameters.get("item")
        key = cache_key(stage, params, Layout(Path(parameters["root"])), item)
        return f"{stage}-{item}-{key}" if item else f"{stage}-{key}"

    return key_fn


def stage_task(stage: str):
    """The Prefect task of a stage. A ``foreach`` stage (``finetune``) takes ``item`` (the task
    name): the flow runs it once per item, each run cached on its own inputs and params."""
    def run(params_file: str = "params.yaml", root: str = ".", item: str | None = None,
            launch: dict[str, Any] | None = None) -> Any:
        params = config.load(params_file, launch_overrides(launch))
        key = cache_key(stage, params, Layout(Path(root)), item)  # the inputs and code this run starts from
        if STAGE_IO[stage].launched:
            result = run_stage_launched(stage, params, params_file, root, item, get_run_logger().info,
                                        grace=STOP_GRACE)
        else:
            extra: dict[str, Any] = {"map_shards": _shard_mapper()} if stage == "clean" else {}
            if item is not None:
                extra["task"] = item
            result = run_stage(stage, params, Layout(Path(root)), **extra)
        record_produced(stage, params, Layout(Path(root)), item, key)  # what the flow's cache may stand for
        return result

    run.__name__ = run.__qualname__ = stage
    return task(
        run,
        name=stage,
        retries=RETRIES.get(stage, 0),
        retry_delay_seconds=10,
        retry_condition_fn=_may_pass,
        cache_key_fn=_key(stage),
        persist_result=True,
    )


STAGE_TASKS = {name: stage_task(name) for name in ORDER}
