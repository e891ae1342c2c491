"""Prefect tasks: one per lmcore stage, each a thin wrapper of :func:`lmcore.stages.run_stage`."""

from tasks.stages import STAGE_TASKS, launch_overrides, stage_task

__all__ = ["STAGE_TASKS", "launch_overrides", "stage_task"]
