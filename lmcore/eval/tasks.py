"""Task metrics of the evaluate stage: what fine-tuning measured, beside its baselines.

:func:`task_results` reads every fine-tuned task's ``runs/finetune/<task>/results.json`` (the best
epoch's validation metrics, its majority-class, bag-of-words and from-scratch baselines) and the GLUE score (mean
of the GLUE task scores); :func:`write_submission` packs the leaderboard prediction files of the
GLUE tasks into ``glue_submission.zip``, ready to upload.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmcore.core.errors import StageError
from lmcore.core.io import read_json
from lmcore.data import glue

SUBMISSION = "glue_submission.zip"


def task_results(finetuned: Path, tasks: Sequence[str]) -> tuple[dict[str, Any], list[tuple], list[Path]]:
    """Metrics of the fine-tuned ``tasks`` (``runs/finetune/<task>/results.json``) as
    ``<task>.<metric>``, ``<task>.majority_<metric>``, ``<task>.bow_<metric>``,
    ``<task>.scratch_<metric>`` (when fine-tuned from random weights too) and ``<task>.score``,
    plus ``glue.score`` (mean of the GLUE task scores) and ``glue.tasks``; report rows; and the
    leaderboard prediction files of the GLUE tasks."""

    m: dict[str, Any] = {}
    rows: list[tuple] = []
    files: list[Path] = []
    scores: dict[str, float] = {}
    for task in tasks:
        folder = Path(finetuned) / task
        res = read_json(folder / "results.json")
        config = read_json(folder / "config.json")
        spec = glue.TaskSpec.from_dict(config.get("task") if isinstance(config, dict) else config,
                                       f"{folder / 'config.json'}: task")
        r = res.get("metrics") if isinstance(res, dict) else None
        r = r if isinstance(r, dict) else {}
        needed = ["score"] + [f"{p}{k}" for k in glue.metric_keys(spec) for p in ("", "majority_", "bow_")]
        missing = [k for k in needed if not isinstance(r.get(k), (int, float))]
        if missing:
            raise StageError(f"{folder / 'results.json'}: no number for metrics.{', metrics.'.join(missing[:4])}: "
                             f"damaged or not written by lmcore's finetune; run finetune@{task} again")
        for k in glue.metric_keys(spec):
            m[f"{task}.{k}"] = r[k]
            m[f"{task}.majority_{k}"] = r[f"majority_{k}"]
            m[f"{task}.bow_{k}"] = r[f"bow_{k}"]
            rows.append((task, k, r[k], r[f"majority_{k}"], "majority class"))
            rows.append((task, k, r[k], r[f"bow_{k}"], "TF-IDF logistic regression" if spec.labels else "TF-IDF ridge"))
            if f"scratch_{k}" in r:  # finetune.defaults.scratch_baseline
                m[f"{task}.scratch_{k}"] = r[f"scratch_{k}"]
                rows.append((task, k, r[k], r[f"scratch_{k}"], "from scratch"))
        m[f"{task}.score"] = scores[task] = r["score"]
        if "score_std" in r:  # finetune.defaults.seeds > 1: the spread of the score over seeds
            n = sum(k.startswith("score_seed_") for k in r)
            m[f"{task}.score_std"] = r["score_std"]
            rows.append((task, f"score std over {n} seeds", r["score_std"], float("nan"), ""))
        if spec.is_glue:
            files += [folder / f for f in res.get("submissions", {}).values()]
    glue_score = glue.glue_score(scores)
    if glue_score is not None:
        n = sum(t in glue.GLUE_TASKS for t in scores)
        m["glue.score"], m["glue.tasks"] = glue_score, n
        rows.append(("GLUE", f"score ({n} of 9 tasks)", glue_score, float("nan"), ""))
    return m, rows, files


def write_submission(files: Sequence[Path], folder: Path) -> int:
    """``folder/glue_submission.zip``: the leaderboard upload (CoLA.tsv, ..., AX.tsv) of the
    prediction ``files``; returns the number of files in it."""
    return len(glue.write_submission_zip(files, Path(folder) / SUBMISSION))
