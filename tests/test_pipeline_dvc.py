"""The whole pipeline through the real `dvc repro`, on tiny data, in a temporary repository."""

from __future__ import annotations

import configparser
import csv
import hashlib
import json
import re
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import yaml
from conftest import BIN, ROOT, mlflow_runs, read_json, run_env

from lmcore.data.encode import load_tokens
from lmcore.plots import install_offline_template

STAGES = ["prepare", "clean", "tokenizer", "encode", "pretrain", "export", "finetune", "evaluate"]


def ran(out: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", out)


def dvc(proj, *args, check=True):
    res = subprocess.run([str(BIN / "dvc"), *args], cwd=proj, env=run_env(), capture_output=True, text=True)
    if check and res.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}")
    return res


def lmcore(proj, *args) -> str:
    res = subprocess.run([str(BIN / "lmcore"), *args], cwd=proj, env=run_env(), capture_output=True, text=True)
    assert res.returncode == 0, f"lmcore {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}"
    return res.stdout


GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]


def run_git(cwd, *args) -> str:
    return subprocess.run([*GIT, *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def objects(store: Path) -> set[str]:
    """The content hashes a DVC cache or local remote holds (files/md5/ab/cdef..., '.dir' for a folder)."""
    return {p.parent.name + p.name for p in (store / "files/md5").glob("*/*")}


def tree(folder: Path) -> dict[str, str]:
    """md5 of every file under a folder, by relative path (DVC 3 hashes the raw bytes)."""
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_repository_names_a_default_remote():
    """.dvc/config names the team remote as the default: a folder beside the project folder (a
    relative url there is relative to the .dvc folder), overridden per machine in config.local."""
    conf = configparser.ConfigParser()
    conf.read(ROOT / ".dvc/config")
    assert conf["core"]["remote"] == "team"
    assert conf['\'remote "team"\'']["url"] == "../../lmcore-dvc-remote"
    # as DVC itself reads the project file alone (a config.local of this checkout is left out)
    listed = dvc(ROOT, "remote", "list", "--project").stdout.split()
    assert listed == ["team", str(ROOT.parent / "lmcore-dvc-remote"), "(default)"], listed


def check_push_and_pull(proj: Path) -> None:
    """The team workflow on the reproduced project: `dvc push` to the shared remote, a second git
    clone configures the same remote, `dvc pull`s and has nothing to reproduce; the resumable
    checkpoints (persist, cache: false) go neither to the cache nor to the remote."""
    tmp = proj.parent
    storage = tmp / "storage"
    # the default remote exactly as the repository's .dvc/config has it, then a per-machine override
    dvc(proj, "remote", "add", "-d", "team", "../lmcore-dvc-remote")
    conf = configparser.ConfigParser()
    conf.read(proj / ".dvc/config")
    assert conf['\'remote "team"\'']["url"] == "../../lmcore-dvc-remote"
    dvc(proj, "remote", "modify", "--local", "team", "url", str(storage))
    pushed = dvc(proj, "push")
    assert not (tmp / "lmcore-dvc-remote").exists() and storage.is_dir(), pushed.stdout
    assert "in sync" in dvc(proj, "status", "--cloud").stdout

    # what the remote holds: the cache, less the copies of the `cache: false` metrics that the run
    # cache keeps (push leaves the run cache out), and no checkpoint in either
    cache = proj / ".dvc/cache"
    assert objects(storage) == objects(cache) - set(tree(proj / "metrics").values())
    assert f"{len(objects(storage))} files pushed" in pushed.stdout
    lock = yaml.safe_load((proj / "dvc.lock").read_text())
    ckpt = next(o for o in lock["stages"]["pretrain"]["outs"] if o["path"] == "runs/pretrain/checkpoints")
    assert ckpt["md5"].endswith(".dir") and ckpt["md5"] not in objects(storage) | objects(cache)
    ckpt_files = tree(proj / "runs/pretrain/checkpoints")
    # the weights of the last checkpoint are the final ones; the optimizer and trainer state are its own
    only_ckpt = set(ckpt_files.values()) - set(tree(proj / "runs/pretrain/final").values())
    assert any(f.endswith("trainer.json") for f in ckpt_files) and only_ckpt
    assert not only_ckpt & (objects(storage) | objects(cache))

    # the metrics are `cache: false` outputs, that is git's to carry: the repository's .gitignore
    # leaves /metrics/ out, so they are added by force here
    run_git(proj, "add", "-A")
    run_git(proj, "add", "-f", "metrics")
    run_git(proj, "commit", "-qm", "pipeline run")
    clone = tmp / "clone"
    subprocess.run(["git", "clone", "-q", str(proj), str(clone)], check=True)
    assert ".dvc/config.local" not in run_git(clone, "ls-files")  # the override stays on its machine
    dvc(clone, "remote", "modify", "--local", "team", "url", str(storage))
    pulled = dvc(clone, "pull")
    assert "fetched" in pulled.stdout, pulled.stdout
    for out in ("data/raw", "data/clean", "data/tokenizer", "data/tokens", "runs/pretrain/final", "runs/export",
                "runs/finetune/sst2", "runs/evaluate"):
        assert tree(clone / out) == tree(proj / out), out
    assert not (clone / "runs/pretrain/checkpoints").exists()

    # every stage is unchanged but the one whose checkpoints stayed behind; `--allow-missing` runs nothing
    assert json.loads(dvc(clone, "status", "--json").stdout) == {
        "pretrain": [{"changed outs": {"runs/pretrain/checkpoints": "deleted"}}]}
    assert ran(dvc(clone, "repro", "--dry").stdout) == ["pretrain"]
    n_runs = len(mlflow_runs(proj / "mlflow.db"))
    again = dvc(clone, "repro", "--allow-missing")
    assert ran(again.stdout) == [] and "Data and pipelines are up to date." in again.stdout, again.stdout
    assert len(mlflow_runs(proj / "mlflow.db")) == n_runs
    assert not (clone / "runs/pretrain/checkpoints").exists()
    shown = [json.loads(dvc(p, "metrics", "show", "--json").stdout) for p in (proj, clone)]
    assert shown[0] == shown[1] and shown[0][""]["data"]["metrics/evaluate.json"]["data"]["lm.val_bpb"] > 0


def test_dvc_repro_end_to_end(tiny_project, tmp_path):
    proj = tiny_project
    # an unlabelled test split: predicted in the leaderboard format and zipped by evaluate
    (proj.parent / "glue/SST-2/test.tsv").write_text("index\tsentence\n0\tthe good king .\n1\tan ill wind .\n")
    first = dvc(proj, "repro")
    assert "finetune@sst2" in ran(first.stdout)

    # every stage's outputs exist and hold what the next stage needs
    manifest = read_json(proj / "data/tokens/manifest.json")
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == 400
    train = np.asarray(load_tokens(proj / "data/tokens", "train"))
    assert train.dtype == np.uint16 and len(train) == manifest["splits"]["train"]["tokens"] > 0
    assert (train == manifest["eot_id"]).sum() == manifest["splits"]["train"]["documents"]
    assert (proj / "runs/pretrain/final/model.safetensors").exists()
    assert (proj / "runs/pretrain/checkpoints/step-000012/trainer.json").exists()
    assert (proj / "runs/finetune/sst2/model.safetensors").exists()
    ft = read_json(proj / "metrics/finetune/sst2.json")
    assert {"accuracy", "score", "majority_accuracy", "bow_accuracy", "best_epoch"} <= set(ft)
    assert (proj / "runs/finetune/sst2/submission/SST-2.tsv").read_text().startswith("index\tprediction\n0\t")
    with zipfile.ZipFile(proj / "runs/evaluate/glue_submission.zip") as z:
        assert z.namelist() == ["SST-2.tsv"]
    clean = read_json(proj / "metrics/clean.json")
    assert clean["dedup.dropped_docs.exact_duplicate"] == 1 and read_json(proj / "data/clean/stats.json")["shards"] > 1
    assert clean["min_length.dropped_docs.too_short"] == 1
    ev = read_json(proj / "metrics/evaluate.json")
    assert 0 < ev["lm.val_bpb"] < ev["lm.unigram_val_bpb"] * 1.5
    # per document as lm-evaluation-harness scores it, and the same from the export through transformers
    assert ev["lm.val_doc_documents"] == ev["lm.val_documents"]  # the same whole documents within max_tokens
    scored = json.loads(lmcore(proj, "score", "runs/export", "--json", "--limit", str(ev["lm.val_doc_documents"])))
    assert scored["backend"] == "transformers" and scored["documents"] == ev["lm.val_doc_documents"]
    assert abs(scored["bits_per_byte"] - ev["lm.val_doc_bpb"]) < 1e-5 * ev["lm.val_doc_bpb"]
    assert abs(scored["word_perplexity"] - ev["lm.val_word_perplexity"]) < 1e-4 * ev["lm.val_word_perplexity"]
    # the pretrained model zero-shot on the task, beside the fine-tuned score; the export gives the same
    assert 0 <= ev["sst2.zeroshot_acc"] <= 1 and 0 <= ev["sst2.zeroshot_acc_norm"] <= 1
    assert "zero-shot, pretrained model" in (proj / "runs/evaluate/report.md").read_text()
    zs = json.loads(lmcore(proj, "score", "runs/export", "--task", "data/raw/tasks/sst2", "--json"))
    assert zs["backend"] == "transformers" and zs["acc"] == ev["sst2.zeroshot_acc"]
    assert 0.0 <= ev["sst2.accuracy"] <= 1.0
    assert ev["glue.score"] == ev["sst2.score"] == ft["score"] and ev["glue.tasks"] == 1
    assert ev["sst2.bow_accuracy"] == ft["bow_accuracy"] and ev["glue.submission_files"] == 1

    # one MLflow parent run for this execution, one child per stage
    runs = mlflow_runs(proj / "mlflow.db")
    parents = [r for r in runs if r.data.tags.get("lmcore.kind") == "pipeline"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.tags["lmcore.stage"] for r in children) == sorted(STAGES)
    tuned = next(r for r in children if r.data.tags["lmcore.stage"] == "finetune")
    assert tuned.data.tags["lmcore.task"] == "sst2" and tuned.data.tags["mlflow.runName"] == "finetune sst2"
    assert "bow_accuracy" in tuned.data.metrics and "majority_accuracy" in tuned.data.metrics
    pre = next(r for r in children if r.data.tags["lmcore.stage"] == "pretrain")
    assert pre.data.params["pretrain.max_steps"] == "12"
    assert "val_bpb" in pre.data.metrics and "tokens_per_second" in pre.data.metrics
    import mlflow

    history = mlflow.MlflowClient(f"sqlite:///{proj / 'mlflow.db'}").get_metric_history(pre.info.run_id, "train_loss")
    assert [m.step for m in history] == [3, 6, 9, 12]
    assert all(r.info.status == "FINISHED" for r in children)

    # lineage: the parent spans its stages; what a stage read is what the stage before it wrote
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.info.end_time >= max(r.info.end_time for r in children)
    by_stage = {r.data.tags["lmcore.stage"]: r for r in children}

    def datasets(run, context):
        return {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs
                if {t.key: t.value for t in d.tags}["mlflow.data.context"] == context}

    tokens = datasets(by_stage["encode"], "output")["data/tokens"]
    assert datasets(by_stage["pretrain"], "input")["data/tokens"] == tokens
    assert set(datasets(by_stage["evaluate"], "input")) == {"data/clean", "data/raw/tasks/sst2", "data/tokens",
                                                           "data/tokenizer", "runs/pretrain/final",
                                                           "runs/finetune/sst2"}
    assert by_stage["pretrain"].data.tags["lmcore.params_sha256"] == hashlib.sha256(
        (proj / "params.yaml").read_bytes()).hexdigest()

    # the summary of that execution: each stage's time, the headline numbers, the outputs
    key = parent.data.tags["lmcore.pipeline_key"]
    summary = lmcore(proj, "summary", "--pipeline", key)
    assert re.search(r"^  pretrain +[0-9.]+ s +finished$", summary, re.M), summary
    assert re.search(r"^  finetune@sst2 +[0-9.]+ s +finished$", summary, re.M), summary
    assert "language model, validation bits per byte: " in summary and "(unigram " in summary
    assert "sst2, accuracy: " in summary and "majority " in summary
    # short lines, but for the store's address (a path under pytest's temporary folder)
    assert max(len(line) for line in summary.splitlines()[:-1] if "sqlite:" not in line) < 160
    assert f"report: also in the artifacts of the MLflow parent run {parent.info.run_id}" in summary
    # ... and its report: one page, offline, with the figures inline, logged to the parent run
    assert summary.splitlines()[-1].startswith("report: runs/report/index.html")
    page = (proj / "runs/report/index.html").read_text(encoding="utf-8")
    for part in ("<h2>Scores beside their baselines</h2>", "<td>sst2</td>", "validation bits per byte",
                 "exact_duplicate", "<h2>Samples</h2>", "lineage of ", "every link found", f"pipeline {key}"):
        assert part in page, part
    assert page.count("data:image/png;base64,") == 2  # the data report and the training curves
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing fetched from elsewhere
    assert (proj / "runs/report/curves.png").read_bytes()[:4] == b"\x89PNG"
    logged = mlflow.MlflowClient(f"sqlite:///{proj / 'mlflow.db'}").list_artifacts(parent.info.run_id, "report")
    assert {Path(a.path).name for a in logged} == {"index.html", "curves.png"}
    # ... and each stage run that ran carries its dvc.lock entry, the parent the whole file
    store = mlflow.MlflowClient(f"sqlite:///{proj / 'mlflow.db'}")
    lock = yaml.safe_load((proj / "dvc.lock").read_text())["stages"]
    for stage, run in [("pretrain", by_stage["pretrain"]), ("finetune@sst2", tuned)]:
        entry = (Path(store.download_artifacts(run.info.run_id, f"dvc.lock/{stage}.yaml", str(tmp_path)))).read_text()
        assert yaml.safe_load(entry) == {stage: lock[stage]}
        assert store.get_run(run.info.run_id).data.tags["lmcore.dvc_lock_sha256"] == hashlib.sha256(
            entry.encode()).hexdigest()
    assert "dvc.lock" in {a.path for a in store.list_artifacts(parent.info.run_id)}

    # dvc plots show: the training curves from two tables without empty cells, drawn offline
    assert "" not in {c for r in csv.reader(open(proj / "metrics/plots/pretrain_val.csv")) for c in r}
    install_offline_template(proj)
    dvc(proj, "plots", "show")
    plots_page = (proj / "dvc_plots/index.html").read_text(encoding="utf-8")
    assert "window.vegaEmbed=" in plots_page and "cdn.jsdelivr" not in plots_page
    assert not re.search(r"""<script[^>]+src=""", plots_page)
    for title in ("pretraining loss (nats per token)", "validation bits per byte", "learning rate"):
        assert title in plots_page, title

    # the lineage command follows every link from the raw corpus to the evaluation
    chain = lmcore(proj, "lineage", "runs/evaluate")
    assert chain.splitlines()[0] == "lineage of runs/evaluate: 7 run(s)" and chain.endswith("every link found\n")
    for fact in ("corpus: files ", "kept 12 of 14 documents; dropped: ", "exact_duplicate 1", "vocabulary 400",
                 "train and ", "steps at lr ", "task sst2: score ", "val bpb "):
        assert fact in chain, (fact, chain)
    assert "read  data/tokens " in chain and f"<- encode run {by_stage['encode'].info.run_id[:8]}" in chain
    assert lmcore(proj, "lineage", key).splitlines()[0] == "lineage of " + key + ": 8 run(s)"

    # the model registry: each final model is a version with the alias candidate; promote makes the
    # first one champion, and models:/<name>@champion loads into lmcore generate
    client = mlflow.MlflowClient(f"sqlite:///{proj / 'mlflow.db'}", registry_uri=f"sqlite:///{proj / 'mlflow.db'}")
    base = client.get_model_version_by_alias("lmcore-base", "candidate")
    assert str(base.version) == "1" and base.run_id == by_stage["pretrain"].info.run_id
    assert client.get_model_version_by_alias("lmcore-sst2", "candidate").run_id == by_stage["finetune"].info.run_id
    assert [o.model_id for o in client.get_run(base.run_id).outputs.model_outputs][0] == base.tags["lmcore.model_id"]
    assert client.get_experiment_by_name("lmcore-test").tags["mlflow.experimentKind"] == "custom_model_development"
    logged = client.get_logged_model(base.tags["lmcore.model_id"])
    assert {m.key for m in logged.metrics} >= {"val_bpb", "val_loss"}
    promoted = lmcore(proj, "promote", "lmcore-base")
    assert "lmcore-base version 1 is now champion (val_bpb " in promoted and "there was none" in promoted
    by_alias = lmcore(proj, "lineage", "models:/lmcore-base@champion")
    assert by_alias.splitlines()[0] == "lineage of models:/lmcore-base@champion: 8 run(s)", by_alias  # export too
    assert by_alias.endswith("every link found\n") and "task sst2: score " in by_alias
    text = lmcore(proj, "generate", "--model", "models:/lmcore-base@champion", "--prompt", "the king",
                  "--max-new-tokens", "4", "--no-stream")
    assert text.startswith("the king")
    # ... and into transformers: the export stage attached its Hugging Face folder to that version
    hf_dir, v1 = tmp_path / "champion-hf", tmp_path / "v1"  # outside the repository
    got = lmcore(proj, "download", "models:/lmcore-base@champion", str(hf_dir), "--hf")
    assert f"-> {hf_dir} (Hugging Face folder" in got
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(hf_dir)
    ids = AutoTokenizer.from_pretrained(hf_dir)("the king", return_tensors="pt").input_ids
    assert hf.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3
    assert (hf_dir / "tokenizer.json").read_bytes() == (proj / "runs/export/tokenizer.json").read_bytes()
    lmcore(proj, "download", "models:/lmcore-base/1", str(v1))
    assert (v1 / "model.safetensors").read_bytes() == (proj / "runs/pretrain/final/model.safetensors").read_bytes()
    twice = subprocess.run([str(BIN / "lmcore"), "download", "models:/lmcore-base/1", str(v1)], cwd=proj, env=run_env(),
                           capture_output=True, text=True)
    assert twice.returncode == 2 and f"{v1}: already exists" in twice.stderr

    # metrics show works, and a second repro does nothing
    shown = dvc(proj, "metrics", "show")
    assert "lm.val_bpb" in shown.stdout
    # headline numbers only: tens of columns, not hundreds
    as_json = json.loads(dvc(proj, "metrics", "show", "--json").stdout)
    files = next(iter(as_json.values()))["data"]

    def leaves(d):
        return sum(leaves(v) if isinstance(v, dict) else 1 for v in d.values())

    n = sum(leaves(f["data"]) for f in files.values())
    assert 30 <= n <= 80, {name: leaves(f["data"]) for name, f in files.items()}
    again = dvc(proj, "repro")
    assert "up to date" in again.stdout
    assert len(mlflow_runs(proj / "mlflow.db")) == len(runs)
    # ... and its summary still records the execution: a parent run linked to the runs it reused
    summary = lmcore(proj, "summary", "--pipeline", "noop-execution")
    assert "pipeline noop-execution: every stage reused" in summary
    assert re.search(rf"^  pretrain +reused +from run {by_stage['pretrain'].info.run_id[:8]} ", summary, re.M), summary
    noop = [r for r in mlflow_runs(proj / "mlflow.db") if r.data.tags.get("lmcore.pipeline_key") == "noop-execution"]
    assert len(noop) == 1 and noop[0].data.tags["lmcore.cached"] == "true" and noop[0].info.status == "FINISHED"
    assert noop[0].data.tags["lmcore.produced_by.runs/pretrain/final"] == by_stage["pretrain"].info.run_id
    runs = mlflow_runs(proj / "mlflow.db")

    # shared through a DVC remote: pushed, pulled into a second clone, nothing to reproduce there
    check_push_and_pull(proj)

    # a clean that writes the same text again (its stats.json holds this run's timings) leaves every
    # later stage fresh: they depend on the clean splits, not on the whole folder
    forced = dvc(proj, "repro", "-f", "-s", "clean")
    assert ran(forced.stdout) == ["clean"], forced.stdout
    assert json.loads(dvc(proj, "status", "--json").stdout) == {}
    runs = mlflow_runs(proj / "mlflow.db")

    # an edit to a function of the sampling code makes evaluate stale (its code deps are the import
    # closure of its entry module), and not the stages that never run that code
    gen = proj / "lmcore/generate.py"
    original = gen.read_text()
    gen.write_text(original.replace("def top_k_filter(", "def _unused() -> None:\n    pass\n\n\ndef top_k_filter(", 1))
    stale = json.loads(dvc(proj, "status", "--json").stdout)
    assert "evaluate" in stale and {"prepare", "clean", "pretrain", "finetune@sst2"}.isdisjoint(stale), stale
    assert stale["evaluate"] == [{"changed deps": {"lmcore/generate.py": "modified"}}]
    gen.write_text(original)
    assert json.loads(dvc(proj, "status", "--json").stdout) == {}

    # adding a task (here from a local JSONL file with a column mapping) runs prepare, that task's
    # fine-tune stage and evaluate: the other task's stage stays cached
    jsonl = proj.parent / "polarity.jsonl"
    rows = [line.split("\t") for line in (proj.parent / "glue/SST-2/train.tsv").read_text().splitlines()[1:]]
    jsonl.write_text("".join(json.dumps({"review": t, "y": ["bad", "good"][int(y)]}) + "\n" for t, y in rows))
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["prepare"]["tasks"]["local"] = {"polarity": {"files": {"train": str(jsonl)}, "label_names": ["bad", "good"],
                                                        "columns": {"text_a": "review", "label": "y"}}}
    params["prepare"]["tasks"]["tasks"] = ["sst2", "polarity"]
    params["finetune"]["tasks"]["polarity"] = {}
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    fourth = dvc(proj, "repro")
    assert ran(fourth.stdout) == ["prepare", "finetune@polarity", "evaluate"], fourth.stdout
    ev = read_json(proj / "metrics/evaluate.json")
    assert "polarity.accuracy" in ev and ev["glue.tasks"] == 1  # polarity is no GLUE task

    # one task's hyperparameters rerun that task alone
    params["finetune"]["tasks"]["polarity"] = {"lr": 0.001}
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    fifth = dvc(proj, "repro")
    assert ran(fifth.stdout) == ["finetune@polarity", "evaluate"], fifth.stdout
    runs = mlflow_runs(proj / "mlflow.db")
    assert sum(r.data.tags.get("lmcore.task") == "polarity" for r in runs) == 2
    # is the new learning rate better, or noise? a paired bootstrap over the same validation units
    executions = sorted((r for r in runs if r.data.tags.get("lmcore.kind") == "pipeline"
                         and "lmcore.cached" not in r.data.tags), key=lambda r: r.info.start_time)
    before, after = (r.data.tags["lmcore.pipeline_key"] for r in executions[-2:])
    verdict = lmcore(proj, "compare", before, after, "--resamples", "200").splitlines()
    assert verdict[0].startswith(f"pipeline {before} (") and len(verdict) == 3, verdict
    # the same pretrained model scored the same windows: no difference at all
    assert verdict[1].startswith("validation bits per byte (document level): ") and "+0.0000, +0.0000]" in verdict[1]
    assert "within noise" in verdict[1] and "windows" in verdict[1]
    assert verdict[2].startswith("polarity score: ") and "validation examples, 200 paired resamples" in verdict[2]

    # an experiment variant through `dvc exp run -S` (needs a commit to branch from): changing
    # one evaluate param reruns evaluate alone
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "add", "-A"], cwd=proj, check=True)
    subprocess.run([*git, "commit", "-qm", "base"], cwd=proj, check=True)
    exp = dvc(proj, "exp", "run", "-S", "evaluate.temperature=0", "-n", "greedy")
    assert ran(exp.stdout) == ["evaluate"], exp.stdout
    shown = dvc(proj, "exp", "show", "--json")
    assert "greedy" in shown.stdout

    # the same stage on two CPU processes through the launch section alone, no file edited
    two = dvc(proj, "exp", "run", "-S", "launch.num_processes=2", "-n", "two-procs", "pretrain")
    assert ran(two.stdout) == ["pretrain"], two.stdout
    assert "2 process(es)" in two.stdout and "--multi_gpu --num_processes 2" in two.stdout
    pre2 = [r for r in mlflow_runs(proj / "mlflow.db") if r.data.tags.get("lmcore.stage") == "pretrain"]
    assert sorted(r.data.params["num_processes"] for r in pre2) == ["1", "2"]
    assert (proj / "runs/pretrain/checkpoints/step-000012/random_states_1.pkl").exists()
    # that run registered version 2 of the base model: promote moves champion only if its val_bpb is lower
    v2 = client.get_model_version_by_alias("lmcore-base", "candidate")
    assert str(v2.version) == "2" and v2.run_id != base.run_id
    bpb = [{m.key: m.value for m in client.get_logged_model(v.tags["lmcore.model_id"]).metrics}["val_bpb"] for v in (base, v2)]
    second = subprocess.run([str(BIN / "lmcore"), "promote", "lmcore-base"], cwd=proj, env=run_env(),
                            capture_output=True, text=True)
    verdict = "is now champion: " if bpb[1] < bpb[0] else "stays candidate: "
    assert second.returncode == (0 if bpb[1] < bpb[0] else 1), second
    assert f"lmcore-base version 2 {verdict}val_bpb {bpb[1]:.4f} against {bpb[0]:.4f} of version 1" in second.stdout
    assert "(lower is better)" in second.stdout
    champion = client.get_model_version_by_alias("lmcore-base", "champion")
    assert str(champion.version) == ("2" if bpb[1] < bpb[0] else "1")
    missing = subprocess.run([str(BIN / "lmcore"), "promote", "no-such-model"], cwd=proj, env=run_env(),
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "not in the model registry" in missing.stderr and "Traceback" not in missing.stderr
