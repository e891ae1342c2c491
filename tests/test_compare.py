"""`lmcore compare`: pipeline runs logged to a real MLflow store (sqlite in tmp_path) the way the
stages log them, read back into a sorted table and a plot."""

from __future__ import annotations

import os

import pytest
from conftest import mlflow_runs

from lmcore.cli import main
from lmcore.config import TrackingConfig
from lmcore.tracking import PIPELINE_ENV, stage_run

EXPERIMENT = "cmp"


def _pretrain_params(layers: int, width: int, lr: float, steps: int) -> dict:
    return {"pretrain.model.n_layer": layers, "pretrain.model.n_embd": width, "pretrain.model.n_head": 4,
            "pretrain.model.n_kv_heads": None, "pretrain.model.block_size": 256, "pretrain.max_steps": steps,
            "pretrain.lr": lr, "n_params": layers * 790_000, "flops_per_token": 1}


def _pipeline(key: str, tracking: TrackingConfig, *, vocab: int | None = None, pretrain: dict | None = None,
              history: list[float] | None = None, tokens_per_second: float | None = None,
              task_score: float | None = None, evaluate: dict | None = None, evaluate_params: dict | None = None) -> None:
    """One pipeline execution: the stage runs that ran in it, logged as the stages log them."""
    os.environ[PIPELINE_ENV] = key
    try:
        if vocab is not None:
            with stage_run("tokenizer", tracking, {"tokenizer.vocab_size": vocab}) as tr:
                tr.metrics({"vocab_size": vocab, "validation_bytes_per_token": 3.1})
        if pretrain is not None:
            with stage_run("pretrain", tracking, pretrain) as tr:
                for i, v in enumerate(history or [], 1):
                    tr.metrics({"train_loss": v * 0.7, "tokens_per_second": tokens_per_second}, step=i * 50 - 10)
                    tr.metrics({"val_loss": v * 0.69, "val_bpb": v}, step=i * 50)
                tr.metrics({"tokens_per_second_mean": tokens_per_second, "mfu_mean": 0.1, "train_seconds": 9.0})
        if task_score is not None:
            with stage_run("finetune", tracking, {"task": "sst2"}, run_name="finetune sst2",
                           tags={"lmcore.task": "sst2"}) as tr:
                tr.metrics({"accuracy": task_score, "score": task_score, "majority_score": 0.5})
        if evaluate is not None:
            with stage_run("evaluate", tracking, {"evaluate.stride": 128, **(evaluate_params or {})}) as tr:
                tr.metrics(evaluate)
    finally:
        os.environ.pop(PIPELINE_ENV, None)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("compare")
    yield from _store(tmp_path)


def _store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = TrackingConfig(tracking_uri=uri, experiment=EXPERIMENT)
    # A: a full pipeline
    _pipeline("run-a", tracking, vocab=4096, pretrain=_pretrain_params(4, 256, 0.003, 150), history=[3.0, 2.5, 2.2],
              tokens_per_second=9000.0, task_score=0.70,
              evaluate={"lm.val_bpb": 2.25, "lm.story.bpb": 2.6, "sst2.score": 0.70, "glue.score": 0.70})
    # B: better (a lower learning rate), the tokenizer taken from DVC's cache: no tokenizer run
    _pipeline("run-b", tracking, pretrain=_pretrain_params(4, 256, 0.001, 150), history=[2.9, 2.2, 1.9],
              tokens_per_second=8000.0, task_score=0.75,
              evaluate={"lm.val_bpb": 1.95, "lm.story.bpb": 2.3, "sst2.score": 0.75, "glue.score": 0.75})
    # C: only evaluate ran (pretraining cached): what was evaluated comes from its own params
    _pipeline("run-c", tracking, evaluate={"lm.val_bpb": 2.0, "glue.score": 0.72},
              evaluate_params={"model.n_layer": 6, "model.n_embd": 384, "model.n_head": 6, "model.n_kv_heads": 6,
                               "model.block_size": 256, "model.steps": 600, "tokenizer.vocab_size": 8192})
    # D: pretrained, but stopped before evaluate: sorted by pretrain's val_bpb, after the evaluated runs
    _pipeline("run-d", tracking, pretrain=_pretrain_params(2, 64, 0.01, 100), history=[2.0, 1.5],
              tokens_per_second=20000.0)
    # E: a pipeline that only prepared data: not a row
    _pipeline("run-e", tracking, vocab=512)
    yield tmp_path, uri


def _compare(capsys, uri: str, *extra: str) -> tuple[int, str, str]:
    code = main(["compare", "--tracking-uri", uri, "--experiment", EXPERIMENT, *extra])
    out, err = capsys.readouterr()
    return code, out, err


def _rows(table: str) -> list[list[str]]:
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


def test_compare_sorts_runs_by_bits_per_byte_and_plots_their_histories(store, capsys):
    tmp_path, uri = store
    assert len([r for r in mlflow_runs(tmp_path / "mlflow.db", EXPERIMENT)
                if r.data.tags.get("lmcore.kind") == "pipeline"]) == 5
    code, out, err = _compare(capsys, uri, "--out", str(tmp_path / "cmp"))
    assert code == 0, err
    md = (tmp_path / "cmp/compare.md").read_text()
    assert len(_rows(out)) == 5 and _rows(out) == _rows(md)  # the table printed is the table written
    header, *rows = _rows(md)
    col = {name: i for i, name in enumerate(header)}
    assert [r[col["run"]] for r in rows] == ["run-b", "run-c", "run-a", "run-d"]  # run-e prepared data only
    assert [r[col["#"]] for r in rows] == ["1", "2", "3", "4"]
    b, c, a, d = rows
    assert b[col["val bpb"]] == "1.9500" and b[col["pretrain val bpb"]] == "1.9000"
    assert b[col["model"]] == "4x256, 4 heads, ctx 256" and b[col["params"]] == "3.16M"
    assert b[col["lr"]] == "0.001" and b[col["steps"]] == "150" and b[col["tokens/s"]] == "8,000"
    assert b[col["vocab"]] == "" and a[col["vocab"]] == "4,096"  # the tokenizer ran in A's execution only
    assert b[col["story bpb"]] == "2.3000" and b[col["GLUE"]] == "0.7500" and b[col["sst2"]] == "0.7500"
    assert c[col["model"]] == "6x384, 6 heads, ctx 256" and c[col["vocab"]] == "8,192" and c[col["steps"]] == "600"
    assert c[col["lr"]] == "" and c[col["pretrain val bpb"]] == ""
    assert d[col["val bpb"]] == "" and d[col["pretrain val bpb"]] == "1.5000"
    assert all(r[col["status"]] == "FINISHED" for r in rows)
    assert "Sorted by evaluate's `val_bpb` (or `lm.val_bpb`), lower is better first; then the runs without it, " \
           "by pretrain's `val_bpb`" in md

    png = (tmp_path / "cmp/val_bpb.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    from PIL import Image

    with Image.open(tmp_path / "cmp/val_bpb.png") as im:
        im.verify()
    with Image.open(tmp_path / "cmp/val_bpb.png") as im:
        assert im.size == (800, 500)
    assert not [p.name for p in (tmp_path / "cmp").iterdir() if p.name.startswith(".")]  # no temporary files left


def test_compare_plot_has_one_line_per_pretrained_run(store):
    from lmcore.eval.compare import compare

    tmp_path, uri = store
    res = compare(TrackingConfig(tracking_uri=uri, experiment=EXPERIMENT), out=tmp_path / "out")
    assert res.plotted == 3  # A, B and D pretrained; C did not
    assert [r.name for r in res.runs][:2] == ["pipeline run-b", "pipeline run-c"]


def test_compare_other_metrics_and_limits(store, capsys):
    tmp_path, uri = store
    # throughput: higher is better
    code, out, _ = _compare(capsys, uri, "--metric", "pretrain.tokens_per_second_mean", "--out", str(tmp_path / "a"))
    assert code == 0
    header, *rows = _rows(out)
    assert [r[header.index("run")] for r in rows] == ["run-d", "run-a", "run-b", "run-c"]
    # a task score from evaluate's metrics: higher is better
    code, out, _ = _compare(capsys, uri, "--metric", "glue.score", "--out", str(tmp_path / "b"))
    header, *rows = _rows(out)
    assert [r[header.index("run")] for r in rows] == ["run-b", "run-c", "run-a", "run-d"]
    # one task's own run, by its stage key
    code, out, _ = _compare(capsys, uri, "--metric", "finetune:sst2.score", "--out", str(tmp_path / "t"))
    header, *rows = _rows(out)
    assert code == 0 and [r[header.index("run")] for r in rows][:2] == ["run-b", "run-a"]
    # the default order needs no metric from every run: runs that only fine-tuned are listed too
    only = TrackingConfig(tracking_uri=uri, experiment="finetune-only")
    _pipeline("run-f", only, task_score=0.6)
    code = main(["compare", "--tracking-uri", uri, "--experiment", "finetune-only", "--out", str(tmp_path / "f")])
    assert code == 0 and "run-f" in capsys.readouterr().out
    # the two most recent runs (E does not count)
    code, out, _ = _compare(capsys, uri, "--runs", "2", "--out", str(tmp_path / "c"))
    header, *rows = _rows(out)
    assert [r[header.index("run")] for r in rows] == ["run-c", "run-d"]


def test_compare_errors_name_what_is_missing(store, capsys):
    tmp_path, uri = store
    code, _, err = _compare(capsys, uri.replace("mlflow.db", "nothing.db"), "--out", str(tmp_path / "x"))
    assert code == 2 and "nothing.db: no tracking database" in err
    (tmp_path / "afile").write_text("")
    code, _, err = _compare(capsys, uri, "--out", str(tmp_path / "afile/sub"))  # a file where a folder goes
    assert code == 2 and f"--out {tmp_path / 'afile/sub'}: cannot write there" in err and "Traceback" not in err
    code, _, err = _compare(capsys, f"sqlite:///{tmp_path}/", "--out", str(tmp_path / "x"))  # a folder, not a file
    assert code == 2 and "a sqlite URI names a database file" in err
    assert not (tmp_path / "nothing.db").exists()  # not created by asking
    code = main(["compare", "--tracking-uri", uri, "--experiment", "nope"])
    err = capsys.readouterr().err
    assert code == 2 and "no MLflow experiment 'nope'" in err and EXPERIMENT in err
    # a metric no run logged is named, with what they did log (it used to sort by nothing, silently)
    code, _, err = _compare(capsys, uri, "--metric", "nope", "--out", str(tmp_path / "x"))
    assert code == 2 and "--metric nope: none of the" in err and "pretrain.tokens_per_second_mean" in err
    # ... and every name it lists sorts the table
    import mlflow

    from lmcore.eval.compare import logged_metrics, metric_value, pipeline_runs

    runs = pipeline_runs(mlflow.MlflowClient(uri), EXPERIMENT)
    listed = logged_metrics(runs)
    assert "evaluate.lm.val_bpb" in listed or "pretrain.val_bpb" in listed, listed
    assert all(any(metric_value(r, m) is not None for r in runs) for m in listed)
    # a store URI with a scheme MLflow does not know: named, no traceback
    code, _, err = _compare(capsys, "foo://bar", "--out", str(tmp_path / "x"))
    assert code == 2 and "the tracking store foo://bar" in err and "did not answer" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_compare_defaults_come_from_the_params_file(store, capsys, monkeypatch):
    import yaml

    tmp_path, uri = store
    monkeypatch.chdir(tmp_path)  # a relative sqlite path is relative to the working directory
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"tracking": {"tracking_uri": "sqlite:///mlflow.db",
                                                                       "experiment": EXPERIMENT}}))
    assert main(["--params", str(tmp_path / "params.yaml"), "--root", str(tmp_path), "compare"]) == 0
    assert "run-b" in capsys.readouterr().out
    assert (tmp_path / "runs/compare/compare.md").exists() and (tmp_path / "runs/compare/val_bpb.png").exists()


def test_compare_uses_the_params_files_retry_settings_with_a_store_named_on_the_command_line(tmp_path, capsys,
                                                                                             monkeypatch):
    """The store named by --tracking-uri was opened with default settings (4 retries, 30 s), not
    the params file's: a server that does not answer held the command for ~15 s of waits."""
    import socket

    import yaml

    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for var in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.setenv(var, "x")  # recorded, so that the test's end restores the variable (or its absence)
        monkeypatch.delenv(var)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"tracking": {"request_retries": 0, "request_timeout": 3}}))
    code = main(["--params", str(tmp_path / "params.yaml"), "compare", "--tracking-uri", f"http://127.0.0.1:{port}",
                 "--experiment", EXPERIMENT, "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and f"http://127.0.0.1:{port}" in err and "did not answer" in err, err
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0" and os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "3"
    # a bad value on the command line is named as the flag
    code = main(["--params", str(tmp_path / "params.yaml"), "compare", "--tracking-uri", "mlflow.db"])
    err = capsys.readouterr().err
    assert code == 2 and "--tracking-uri 'mlflow.db': a URI with a scheme" in err, err
    # a broken params file in the folder it runs in does not stop a compare that names its store whole
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("tracking: {request_retries: many}\n")
    code = main(["compare", "--tracking-uri", f"http://127.0.0.1:{port}", "--experiment", EXPERIMENT,
                 "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "params.yaml not read" in err and "did not answer" in err, err


def test_accuracies_sort_highest_first_and_a_nan_goes_with_the_runs_without_the_metric():
    """--metric sst2.zeroshot_acc sorted the worst run first ('lower is better'), and a diverged
    run's NaN landed anywhere, first included."""
    import math
    import types

    from lmcore.eval.compare import PipelineRun, sort_runs

    def run(name: str, start: int, **metrics: float) -> PipelineRun:
        evaluated = types.SimpleNamespace(data=types.SimpleNamespace(metrics=metrics, params={}))
        return PipelineRun(name, name, start, "FINISHED", None, {"evaluate": evaluated})

    runs = [run("low", 1, **{"sst2.zeroshot_acc": 0.5, "mc.acc_norm": 0.3, "lm.val_bpb": 2.0}),
            run("nan", 2, **{"sst2.zeroshot_acc": math.nan, "mc.acc_norm": math.nan, "lm.val_bpb": math.nan}),
            run("high", 3, **{"sst2.zeroshot_acc": 0.7, "mc.acc_norm": 0.6, "lm.val_bpb": 1.9}),
            run("none", 4)]
    for metric in ("sst2.zeroshot_acc", "mc.acc_norm"):
        assert [r.name for r in sort_runs(runs, metric)] == ["high", "low", "none", "nan"], metric
    assert [r.name for r in sort_runs(runs, "val_bpb")] == ["high", "low", "none", "nan"]  # lower is better


def test_an_execution_that_reused_every_output_can_be_named_for_a_pair(store):
    """A no-op execution (every stage from a cache) has no stage run: `compare A B` answered "no
    pipeline run" for it, though its parent names the runs that made its outputs."""
    import mlflow

    from lmcore.eval.compare import _find, pipeline_runs
    from lmcore.tracking import link_execution

    tmp_path, uri = store
    made = link_execution(TrackingConfig(tracking_uri=uri, experiment=EXPERIMENT), "all-cached", [])
    client = mlflow.MlflowClient(uri)
    try:
        assert all(r.name != "pipeline all-cached" for r in pipeline_runs(client, EXPERIMENT))  # not a table row
        assert _find(pipeline_runs(client, EXPERIMENT, cached=True), "all-cached").stages == {}
    finally:  # the module's store is shared: the other tests count its five pipelines
        client.delete_run(made.parent_id)
