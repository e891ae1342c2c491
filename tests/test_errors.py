"""Bad input gives one clear error line, exit status 2, and leaves earlier outputs intact."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml
from conftest import BIN, run_env


def lmcore(proj, stage):
    return subprocess.run([str(BIN / "lmcore"), stage], cwd=proj, env=run_env(), capture_output=True, text=True)


def one_error_line(res, *needles):
    assert res.returncode == 2, res.stderr
    log_line = re.compile(r"^(\d{4}/\d\d/\d\d [\d:]+ )?(INFO|WARNING) ")
    lines = [line for line in res.stderr.strip().splitlines() if not log_line.match(line)]
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def set_params(proj, fn):
    params = yaml.safe_load((proj / "params.yaml").read_text())
    fn(params)
    (proj / "params.yaml").write_text(yaml.safe_dump(params))


def test_wrong_type_in_params(tiny_project):
    set_params(tiny_project, lambda p: p["clean"].update(min_chars="many"))
    one_error_line(lmcore(tiny_project, "clean"), "clean.min_chars", "'many'")


def test_missing_input_file(tiny_project):
    one_error_line(lmcore(tiny_project, "clean"), "data/raw/corpus", "not found")


def test_missing_corpus_path_keeps_earlier_output(tiny_project, tmp_path):
    assert lmcore(tiny_project, "prepare").returncode == 0
    before = (tiny_project / "data/raw/corpus/00000.jsonl").read_bytes()
    set_params(tiny_project, lambda p: p["prepare"]["corpus"].update(paths=[str(tmp_path / "nowhere")]))
    one_error_line(lmcore(tiny_project, "prepare"), "nowhere", "not found")
    assert (tiny_project / "data/raw/corpus/00000.jsonl").read_bytes() == before


def test_invalid_utf8_is_skipped_counted_and_reported_by_file_and_line(tiny_project, tmp_path):
    src = tmp_path / "mixed"
    src.mkdir()
    (src / "a.txt").write_bytes(b"fine line one\nsecond \xff\xfe line\nthird line is fine too\n")
    (src / "b.jsonl").write_bytes(b'{"text": "a good record that is long enough to keep around"}\n\xff\n{broken\n')
    (src / "c.txt").write_bytes(b"\x00\x01binary\x00")
    set_params(tiny_project, lambda p: p["prepare"]["corpus"].update(paths=[str(src)]))
    res = lmcore(tiny_project, "prepare")
    assert res.returncode == 0, res.stderr
    assert "a.txt: skipped 1 invalid utf8 line (line 2)" in res.stderr
    assert "b.jsonl: skipped 1 invalid json line (line 3); 1 invalid utf8 line (line 2)" in res.stderr
    assert "c.txt: skipped 1 binary file" in res.stderr
    m = json.loads((tiny_project / "metrics/prepare.json").read_text())
    assert m["documents"] == 2 and m["skipped.invalid_utf8_line"] == 2 and m["skipped.binary_file"] == 1
    docs = [json.loads(line) for line in (tiny_project / "data/raw/corpus/00000.jsonl").open()]
    assert docs[0]["text"] == "fine line one\nthird line is fine too\n"


def test_unreadable_corpus_is_an_error(tiny_project, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.txt").write_bytes(b"\xff\xfe\xfd")
    set_params(tiny_project, lambda p: p["prepare"]["corpus"].update(paths=[str(bad)]))
    one_error_line(lmcore(tiny_project, "prepare"), "no documents", "a.txt", "invalid utf8 line (line 1)")
    assert not (tiny_project / "data/raw").exists()


def test_empty_corpus(tiny_project, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "nothing.jsonl").write_text("")
    set_params(tiny_project, lambda p: p["prepare"]["corpus"].update(paths=[str(empty)]))
    one_error_line(lmcore(tiny_project, "prepare"), "no documents")


def _cli(cwd, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "lmcore"), *args], cwd=cwd, capture_output=True, text=True, env=run_env(),
                          timeout=120)


def test_what_review_found_in_the_commands_is_an_error_naming_the_input(tmp_path):
    """Each of these was a Python traceback (or a false verdict) before."""
    store = ["--experiment", "e", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"]
    (tmp_path / "acc.yaml").write_text("distributed_type: 'NO'\nnum_processes: abc\n")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"launch": {"config": "acc.yaml"},
                                                          "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/m.db"}}))
    for flag, value, needle in (("--resamples", "0", "--resamples = 0: at least 100"),
                                ("--resamples", "1", "--resamples = 1: at least 100"),
                                ("--confidence", "1.5", "--confidence = 1.5: a fraction")):
        res = _cli(tmp_path, "compare", *store, "A", "B", flag, value)
        assert res.returncode == 2 and needle in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]
    res = _cli(tmp_path, "download", "models:/lmcore-base", str(tmp_path / "dl"), "--hf")
    assert res.returncode == 2 and "expected models:/<name>@<alias> or models:/<name>/<version>" in res.stderr
    (tmp_path / "afile").write_text("x")
    res = _cli(tmp_path, "download", "models:/x@champion", str(tmp_path / "afile/dest"))
    assert res.returncode == 2 and "cannot be the folder to download into" in res.stderr, res.stderr[-2000:]
    res = _cli(tmp_path, "launch", "pretrain", "--dry-run")
    assert res.returncode == 2 and "num_processes = 'abc'" in res.stderr and "Traceback" not in res.stderr


def test_empty_paths_and_keys_are_refused_by_name(tmp_path):
    from lmcore import config
    from lmcore.core.errors import StageError
    from lmcore.tracking import find_parent
    from lmcore.tracking_server import port_is_free

    with pytest.raises(config.ConfigError, match=r"prepare.corpus.paths.0 = '' .*empty path"):
        config.from_dict({"prepare": {"corpus": {"kind": "files", "paths": [""]}}})
    with pytest.raises(config.ConfigError, match=r"evaluate.multiple_choice.0.path = ' '"):
        config.from_dict({"evaluate": {"multiple_choice": [{"name": "m", "path": " "}]}})
    with pytest.raises(config.ConfigError, match=r"tracking.experiment = ''"):
        config.from_dict({"tracking": {"experiment": ""}})
    (tmp_path / "list.yaml").write_text("- a\n")
    with pytest.raises(config.ConfigError, match="list.yaml"):
        config.load(tmp_path / "list.yaml", {"launch.num_processes": 2})
    with pytest.raises(StageError, match="cannot hold a quote"):
        find_parent(None, "0", "it's")
    with pytest.raises(StageError, match="not an IPv4 address or a name"):
        port_is_free("nosuch.invalid", 5999)


def test_a_sqlite_uri_without_a_database_file_and_odd_arguments_are_refused(tmp_path):
    from lmcore import config

    for uri in ("sqlite:///", f"sqlite:///{tmp_path}", f"sqlite:///{tmp_path}/"):
        with pytest.raises(config.ConfigError, match=r"tracking.tracking_uri = .*names a database file"):
            config.from_dict({"tracking": {"tracking_uri": uri}})
    assert config.from_dict({"tracking": {"tracking_uri": f"sqlite:///{tmp_path}/m.db"}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"tracking": {"tracking_uri": f"sqlite:///{tmp_path}/m.db"}}))
    res = _cli(tmp_path, "launch", "pretrain", "--task", "sst2", "--dry-run")
    assert res.returncode == 2 and "--task sst2: pretrain is one stage" in res.stderr, res.stderr[-2000:]
    res = _cli(tmp_path, "launch", "finetune", "--task", "bogus", "--dry-run")
    assert res.returncode == 2 and "--task bogus: not a task of prepare.tasks.tasks" in res.stderr
    res = _cli(tmp_path, "lineage", "")
    assert res.returncode == 2 and "not an empty string" in res.stderr and not (tmp_path / "m.db").exists()


def test_reading_commands_name_a_missing_store_or_experiment_and_create_nothing(tmp_path, monkeypatch, capsys):
    """lmcore lineage, promote and download on a project where no stage has logged created an
    empty mlflow.db (and an experiment) and then reported that nothing was found in it."""
    from lmcore.cli.main import main
    from lmcore.config import TrackingConfig
    from lmcore.tracking import open_client

    monkeypatch.chdir(tmp_path)
    db = tmp_path / "m.db"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"tracking": {"tracking_uri": f"sqlite:///{db}",
                                                                       "experiment": "e"}}))
    commands = (["lineage", "runs/evaluate"], ["promote", "lmcore-base"],
                ["download", "models:/lmcore-base@champion", str(tmp_path / "dl")])
    for command in commands:
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert f"{db}: no tracking database: no stage has logged there yet" in err, (command, err)
    assert [p.name for p in tmp_path.iterdir()] == ["params.yaml"]
    open_client(TrackingConfig(tracking_uri=f"sqlite:///{db}", experiment="other"))  # a store, another experiment
    assert main(commands[0]) == 2
    assert "no experiment 'e' (tracking.experiment) in the tracking store" in capsys.readouterr().err
    for command in commands[1:]:  # the registry is the store's: any experiment's models
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert "lmcore-base" in err and "in the model registry" in err, (command, err)


def test_download_of_a_version_whose_files_are_gone_is_an_error_not_an_empty_folder(tmp_path, monkeypatch, capsys):
    """MLflow only logs "No artifacts found" when a registered version's files were deleted (the
    artifact folder removed, `mlflow gc`): lmcore download moved the empty folder into place and
    said it had downloaded 0 files, exit 0."""
    import shutil

    import mlflow

    from lmcore.cli.main import main

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"tracking": {"tracking_uri": uri, "experiment": "e"}}))
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    exp = client.create_experiment("e", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(exp)
    (tmp_path / "model").mkdir()
    (tmp_path / "model/config.json").write_text("{}")
    client.log_artifacts(run.info.run_id, str(tmp_path / "model"), artifact_path="model")
    client.create_registered_model("lmcore-base")
    # registered as lmcore registers: the source is where the files are
    client.create_model_version("lmcore-base", f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    assert main(["download", "models:/lmcore-base/1", str(tmp_path / "ok")]) == 0
    assert (tmp_path / "ok/config.json").exists()
    capsys.readouterr()
    model_files = next((tmp_path / "artifacts").rglob("config.json")).parent
    shutil.rmtree(model_files)
    model_files.mkdir()  # the folder there, its files gone: MLflow downloads nothing and says so in its log only
    assert main(["download", "models:/lmcore-base/1", str(tmp_path / "dl")]) == 2
    assert "registered, but its files are missing" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "artifacts")  # the folder gone too
    assert main(["download", "models:/lmcore-base/1", str(tmp_path / "dl")]) == 2
    assert "version 1's files could not be downloaded from" in capsys.readouterr().err
    assert not (tmp_path / "dl").exists()
