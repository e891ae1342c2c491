"""The MLflow UI as a user sees it after `make pipeline`, in a real browser (headless Chromium).

Starts `mlflow server` on a free 127.0.0.1 port against the project's store, opens the pages a
user opens (the experiment's runs with the pipeline's parent run and its stages, the pretraining
run's model-metrics charts, the registered models, the base model's version), checks that each
shows what it should, saves a screenshot of each, stops the server, and prints one line per page.

    python benchmarks/mlflow_ui_check.py --project /path/to/a/project/after/make-pipeline \\
        --out /tmp/ui-check

Needs `chromium` (Debian: apt-get install chromium). Not a test: a page takes ~20 s of virtual
browser time to settle, so the whole check takes about two minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(project: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                             f"sqlite:///{project / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], cwd=project, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"mlflow server exited with {proc.returncode}")
            time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGTERM)
    raise SystemExit("mlflow server did not answer in 90 s")


def chromium(*args: str, budget_ms: int = 20000) -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        raise SystemExit("no chromium on PATH (Debian: apt-get install chromium)")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           f"--virtual-time-budget={budget_ms}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180).stdout


def page_text(dom: str) -> str:
    """The visible words of a dumped DOM (tags, scripts and styles removed)."""
    dom = re.sub(r"(?is)<(script|style)[^>]*>.*?</\1>", " ", dom)
    return re.sub(r"\s+", " ", re.sub(r"(?s)<[^>]+>", " ", dom))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", type=Path, required=True, help="a project folder with mlflow.db after make pipeline")
    ap.add_argument("--out", type=Path, default=Path("ui-check"), help="folder for the screenshots and results.json")
    ap.add_argument("--experiment", default="lmcore")
    args = ap.parse_args()
    project = args.project.resolve()
    args.out.mkdir(parents=True, exist_ok=True)

    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    exp = client.get_experiment_by_name(args.experiment)
    if exp is None:
        raise SystemExit(f"no experiment {args.experiment!r} in {project / 'mlflow.db'}")
    runs = client.search_runs([exp.experiment_id], max_results=1000, order_by=["attributes.start_time DESC"])
    parent = next(r for r in runs if r.data.tags.get("lmcore.kind") == "pipeline" and "lmcore.cached" not in r.data.tags)
    stages = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    pre = next(r for r in stages if r.data.tags.get("lmcore.stage") == "pretrain")
    key = parent.data.tags["lmcore.pipeline_key"]
    versions = client.search_model_versions("name = 'lmcore-base'")
    base_version = max(int(v.version) for v in versions)

    e = exp.experiment_id
    pages = [
        ("runs", f"#/experiments/{e}/runs", [f"pipeline {key}", "matching runs"]),
        ("pretrain-charts", f"#/experiments/{e}/runs/{pre.info.run_id}/model-metrics",
         ["Model metrics", "train_loss", "val_bpb", "lr"]),
        ("pretrain-overview", f"#/experiments/{e}/runs/{pre.info.run_id}",
         ["pretrain", "lmcore.stage", "Datasets", "data/tokens", "Logged models", "lmcore-base"]),
        ("models", "#/models", ["lmcore-base", "candidate"]),
        ("base-version", f"#/models/lmcore-base/versions/{base_version}",
         [f"Version {base_version}", "candidate", "lmcore.model_id", "pretrain"]),
    ]
    port = free_port()
    server = start_server(project, port)
    results = []
    try:
        for name, frag, expected in pages:
            url = f"http://127.0.0.1:{port}/{frag}"
            t = time.time()
            text = page_text(chromium("--window-size=1400,6000", "--dump-dom", url))  # tall: every chart drawn
            chromium("--window-size=1400,1000", f"--screenshot={args.out / (name + '.png')}", url)
            missing = [s for s in expected if s not in text]
            results.append({"page": name, "url": frag, "expected": expected, "missing": missing,
                            "seconds": round(time.time() - t, 1)})
            print(f"{name:18s} {'ok' if not missing else 'MISSING ' + ', '.join(missing):40s} {frag}", flush=True)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    (args.out / "results.json").write_text(json.dumps({"project": str(project), "pipeline": key,
                                                       "mlflow": mlflow.__version__, "pages": results}, indent=1))
    print(f"screenshots and results.json in {args.out}")
    return 0 if all(not r["missing"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
