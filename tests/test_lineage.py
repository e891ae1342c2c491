"""Lineage in MLflow (real MLflow on sqlite, real processes): the parent run spans its
stages, a killed stage is closed as KILLED by the next one, and what a stage reads and writes is
recorded as datasets with digests that link a run to the run that produced its input."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_env

from lmcore.tracking import PIPELINE_ENV

STAGE = """
import os, signal, sys, time
from pathlib import Path
from lmcore import config
from lmcore.tracking import stage_run
cfg = config.load(sys.argv[1]).tracking
name, inp, out, how = sys.argv[2:6]
with stage_run(name, cfg, {"which": name}, inputs=[Path(inp)] if inp != "-" else [],
               outputs=[Path(out)]) as tr:
    tr.metrics({"m": 1.0})
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "part.txt").write_text(name)
    time.sleep(0.3)
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "fail":
        raise SystemExit("failed on purpose")
"""


def stage(proj: Path, key: str, name: str, inp: str, out: str, how: str = "ok") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", STAGE, "params.yaml", name, inp, out, how], cwd=proj,
                          env={**run_env(), PIPELINE_ENV: key}, capture_output=True, text=True, timeout=120)


def project(tmp_path: Path) -> tuple[Path, object]:
    import mlflow

    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "params.yaml").write_text(f"tracking:\n  tracking_uri: sqlite:///{proj / 'mlflow.db'}\n"
                                      "  experiment: lineage\n")
    return proj, mlflow.MlflowClient(tracking_uri=f"sqlite:///{proj / 'mlflow.db'}")


def runs_of(client, key: str) -> dict[str, object]:
    exp = client.get_experiment_by_name("lineage")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`lmcore.pipeline_key` = '{key}'")
    return {r.data.tags.get("lmcore.stage", "pipeline"): r for r in runs}


def test_parent_spans_its_stages_and_records_the_params_file(tmp_path):
    proj, client = project(tmp_path)
    assert stage(proj, "p1", "a", "-", "out/a").returncode == 0
    assert stage(proj, "p1", "b", "out/a", "out/b").returncode == 0
    runs = runs_of(client, "p1")
    parent, a, b = runs["pipeline"], runs["a"], runs["b"]
    assert parent.info.status == "FINISHED"
    assert parent.info.start_time <= a.info.start_time
    assert parent.info.end_time >= b.info.end_time > a.info.end_time  # not milliseconds after its start
    digest = __import__("hashlib").sha256((proj / "params.yaml").read_bytes()).hexdigest()
    assert parent.data.tags["lmcore.params_sha256"] == digest == b.data.tags["lmcore.params_sha256"]
    assert b.data.tags["lmcore.host"] and b.data.tags["lmcore.pid"]

    # a failing stage of another execution leaves that execution FAILED, and this one as it was
    assert stage(proj, "p2", "a", "-", "out/a2", how="fail").returncode != 0
    assert runs_of(client, "p2")["pipeline"].info.status == "FAILED"
    assert runs_of(client, "p1")["pipeline"].info.status == "FINISHED"


def test_a_killed_stage_is_closed_as_killed_by_the_next_stage(tmp_path):
    proj, client = project(tmp_path)
    killed = stage(proj, "k1", "a", "-", "out/a", how="kill")
    assert killed.returncode == -signal.SIGKILL
    assert runs_of(client, "k1")["a"].info.status == "RUNNING"  # what MLflow holds after a SIGKILL
    nxt = stage(proj, "k2", "a", "-", "out/a")
    assert nxt.returncode == 0, nxt.stderr[-2000:]
    assert "closed 1 MLflow run(s) left RUNNING" in nxt.stderr
    old = runs_of(client, "k1")
    assert old["a"].info.status == "KILLED" and old["pipeline"].info.status == "KILLED"
    assert old["a"].info.end_time is not None
    assert runs_of(client, "k2")["a"].info.status == "FINISHED"


def test_inputs_and_outputs_are_datasets_whose_digests_link_producer_and_consumer(tmp_path):
    from lmcore.tracking import data_digest, producer_of

    proj, client = project(tmp_path)
    assert stage(proj, "d1", "a", "-", "out/a").returncode == 0
    assert stage(proj, "d1", "b", "out/a", "out/b").returncode == 0
    runs = runs_of(client, "d1")
    a, b = runs["a"], runs["b"]

    def datasets(run, context):
        return {d.dataset.name: d.dataset for d in run.inputs.dataset_inputs
                if {t.key: t.value for t in d.tags}.get("mlflow.data.context") == context}

    out_a, in_b = datasets(a, "output")["out/a"], datasets(b, "input")["out/a"]
    assert out_a.digest == in_b.digest == data_digest(proj / "out/a")["sha256"][:32]
    profile = json.loads(in_b.profile)
    assert profile["files"] == 1 and profile["bytes"] == 1
    assert json.loads(in_b.source)["uri"] == (proj / "out/a").as_posix()
    exp = client.get_experiment_by_name("lineage").experiment_id
    assert producer_of(client, exp, "out/a", in_b.digest).info.run_id == a.info.run_id
    assert producer_of(client, exp, "out/a", "0" * 32) is None
    assert "lmcore.git_commit" not in a.data.tags  # the folder is no git repository

    # the same bytes written again by a later run: the latest producer is the link
    assert stage(proj, "d2", "a", "-", "out/a").returncode == 0
    again = runs_of(client, "d2")["a"]
    assert producer_of(client, exp, "out/a", in_b.digest).info.run_id == again.info.run_id


def test_lineage_command_follows_the_links_and_names_a_missing_one(tmp_path):
    proj, _ = project(tmp_path)
    assert stage(proj, "l1", "a", "-", "out/a").returncode == 0
    assert stage(proj, "l1", "b", "out/a", "out/b").returncode == 0
    (proj / "untracked").mkdir()
    (proj / "untracked/made-by-hand.txt").write_text("x")
    assert stage(proj, "l1", "c", "untracked", "out/c").returncode == 0

    def lineage(what: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "lmcore.cli", "lineage", what], cwd=proj, env=run_env(),
                              capture_output=True, text=True, timeout=120)

    ok = lineage("out/b")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[0] == "lineage of out/b: 2 run(s)"
    assert "read  out/a " in ok.stdout and "<- a run " in ok.stdout and ok.stdout.endswith("every link found\n")
    bad = lineage("out/c")
    assert bad.returncode == 1 and "read  untracked " in bad.stdout and "MISSING LINK" in bad.stdout
    assert "1 missing link(s)" in bad.stdout
    # from the start of the chain downstream: a's output was read by b
    down = lineage("out/a")
    assert "lineage of out/a: 2 run(s)" in down.stdout
    # a folder no run wrote, and a name that is nothing: one line each, no traceback
    (proj / "out/a/part.txt").write_text("changed")
    changed = lineage("out/a")
    assert changed.returncode == 2 and "no MLflow run in this experiment wrote it as it is now" in changed.stderr
    nothing = lineage("no-such-thing")
    assert nothing.returncode == 2 and "no such file or folder, MLflow run id or pipeline key" in nothing.stderr
    assert "Traceback" not in changed.stderr + nothing.stderr


def test_training_stages_get_mlflow_system_metrics_and_a_continued_run_goes_on_from_its_last_step(tmp_path):
    import time

    import mlflow

    from lmcore.config import TrackingConfig
    from lmcore.tracking import stage_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = TrackingConfig(tracking_uri=uri, experiment="system", system_metrics_interval=1)

    def busy(seconds: float) -> None:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            sum(range(10_000))

    with pytest.raises(RuntimeError):  # stopped before its end (a run that FINISHED is not continued)
        with stage_run("pretrain", cfg, {"a": 1}, system_metrics=True) as tr:
            busy(3.5)  # the monitor's first sample can come a second late on a busy machine
            for step in (10, 20, 30):  # logged, then stopped before the checkpoint of step 30
                tr.metrics({"train_loss": 5.0 - step / 10}, step=step)
            tr.metrics({"val_bpb": 2.5}, step=20)
            raise RuntimeError("stopped")
    with stage_run("pretrain", cfg, {"a": 1}, resume=tr.run_id, system_metrics=True) as again:
        busy(3.5)
        for step in (30, 40):  # resumed from the checkpoint of step 20: step 30 runs again
            again.metrics({"train_loss": 5.0 - step / 10, "val_bpb": 2.4}, step=step)
    with stage_run("pretrain", cfg, {"a": 1}, resume=tr.run_id) as rerun:  # resumed from the end: a run of its own
        pass
    assert rerun.run_id != tr.run_id
    with stage_run("encode", cfg, {"a": 1}) as other:  # not a training stage: no monitor
        busy(1.5)
    client = mlflow.MlflowClient(uri)
    assert again.run_id == tr.run_id
    steps = [m.step for m in client.get_metric_history(tr.run_id, "system/cpu_utilization_percentage")]
    assert len(steps) >= 3 and steps == sorted(set(steps)), steps  # the continued run went on, no step twice
    assert [(m.step, m.value) for m in client.get_metric_history(tr.run_id, "train_loss")] == [
        (10, 4.0), (20, 3.0), (30, 2.0), (40, 1.0)]  # one loss curve, no step logged twice
    assert [m.step for m in client.get_metric_history(tr.run_id, "val_bpb")] == [20, 30, 40]
    assert "system/system_memory_usage_megabytes" in client.get_run(tr.run_id).data.metrics
    assert not any(k.startswith("system/") for k in client.get_run(other.run_id).data.metrics)


def test_the_report_shows_the_pipeline_tasks_not_every_metrics_file_left_behind(tmp_path):
    """DVC leaves the metrics file of a task dropped from prepare.tasks.tasks; the report listed
    it as if it were part of the run."""
    from lmcore.core.layout import Layout
    from lmcore.report import write_report

    for task, score in (("sst2", 0.81), ("cola", 0.12)):
        (tmp_path / "metrics/finetune").mkdir(parents=True, exist_ok=True)
        (tmp_path / f"metrics/finetune/{task}.json").write_text(f'{{"score": {score}, "best_epoch": 2}}')
    page = write_report(Layout(tmp_path), "t", "summary", None, ["sst2", "rte"]).read_text()
    assert "<td>sst2</td>" in page and "cola" not in page and "<td>rte</td>" not in page
    everything = write_report(Layout(tmp_path), "t", "summary", None).read_text()
    assert "<td>sst2</td>" in everything and "<td>cola</td>" in everything


def test_a_summary_where_nothing_ran_records_no_execution(tmp_path):
    """`lmcore summary --pipeline <typo>` (or in the wrong folder) made up an execution, "every
    stage reused", which then counted as the newest and stopped the real one's records."""
    from lmcore import config
    from lmcore.core.layout import Layout
    from lmcore.summary import summarize

    params = config.from_dict({"tracking": {"tracking_uri": f"sqlite:///{tmp_path}/m.db"}})
    text = summarize(params, Layout(tmp_path), "no-such-key")
    assert text.startswith(f"pipeline no-such-key: no stage output in {tmp_path}, nothing recorded")
    assert not (tmp_path / "m.db").exists()  # no store opened, no parent run made up


def test_the_report_colours_a_score_by_which_way_is_better(tmp_path):
    """Bits per byte and perplexity: lower beats the baseline; accuracy: higher."""
    import re

    from lmcore.core.layout import Layout
    from lmcore.report import _scores_section

    (tmp_path / "runs/evaluate").mkdir(parents=True)
    (tmp_path / "runs/evaluate/report.md").write_text(
        "| what | metric | model | baseline | kind |\n|---|---|---|---|---|\n"
        "| language model | validation bits per byte | 2.1 | 3.1 | unigram |\n"
        "| language model | validation perplexity | 40.0 | 30.0 | unigram |\n"
        "| sst2 | accuracy | 0.8 | 0.5 | majority class |\n"
        "| sst2 | f1 | 0.6 | 0.7 | TF-IDF logistic regression |\n")
    html = _scores_section(Layout(tmp_path))
    rows = re.findall(r"<tr><td>([^<]*)</td><td>([^<]*)</td><td class=\"num ([a-z]+)\">", html)
    assert [(metric, cls) for _, metric, cls in rows] == [
        ("validation bits per byte", "better"), ("validation perplexity", "worse"), ("accuracy", "better"),
        ("f1", "worse")]


def test_git_dirty_ignores_the_dvc_lock_the_pipeline_rewrites(tmp_path, monkeypatch):
    from lmcore.tracking import git_tags

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "dvc.lock").write_text("a\n")
    (tmp_path / "params.yaml").write_text("a: 1\n")
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "i")
    monkeypatch.chdir(tmp_path)
    assert git_tags()["lmcore.git_dirty"] == "false"
    (tmp_path / "dvc.lock").write_text("b\n")
    assert git_tags()["lmcore.git_dirty"] == "false"  # the pipeline's own rewrite
    (tmp_path / "params.yaml").write_text("a: 2\n")
    assert git_tags()["lmcore.git_dirty"] == "true"


def test_a_pipelines_start_runs_are_each_walked_down_whatever_the_order_of_their_ids(monkeypatch):
    """A start run first reached upward from another start run (prepare, from clean) was marked
    seen and never walked down: the runs of other executions that read its outputs appeared or not
    by the order of the run ids. Walked in the store's own terms, with the store's answers stubbed."""
    import types

    from lmcore import lineage

    def run(rid: str) -> types.SimpleNamespace:
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id=rid))

    a, b, c = run("a1"), run("b1"), run("c1")  # prepare A; clean B (this execution) and C (another) read A's output
    corpus = lineage.Link("corpus", "d-corpus", {})
    links = {("a1", "output"): [corpus], ("b1", "input"): [lineage.Link("corpus", "d-corpus", {})],
             ("c1", "input"): [lineage.Link("corpus", "d-corpus", {})]}
    monkeypatch.setattr(lineage, "_datasets", lambda r, context: [
        lineage.Link(x.name, x.digest, x.profile) for x in links.get((r.info.run_id, context), [])])
    monkeypatch.setattr(lineage, "producer_of", lambda client, eid, name, digest: a)
    monkeypatch.setattr(lineage, "_consumers", lambda client, eid, link: [b, c] if link.digest == "d-corpus" else [])
    for order in ([a, b], [b, a]):
        monkeypatch.setattr(lineage, "resolve", lambda client, eid, what, order=order: order)
        assert sorted(lineage.trace(None, "0", "pipeline-key").runs) == ["a1", "b1", "c1"], order
