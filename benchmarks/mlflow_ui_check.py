"""The MLflow UI as a user sees it after `make pipeline`, in a real browser (headless Chromium).

Starts `mlflow server` on a free 127.0.0.1 port against the project's store, opens the pages a
user opens (the experiment's runs with the pipeline's parent run and its stages, the pretraining
run's model-metrics charts, the registered models, the base model's version), checks that each
shows what it should, saves a screenshot of each, stops the server, and prints one line per page.

    python benchmarks/mlflow_ui_check.py --project /path/to/a/project/after/make-pipeline \\
        --out /tmp/ui-check

Needs `chromium` (Debian: apt-get install chromium). The browser is driven over the DevTools protocol
(websockets, which MLflow's server installs) and waits in real time for each page. Not a test:
the whole check takes about a minute.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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


class Browser:
    """Headless Chromium driven over the DevTools protocol: open a page, wait (in real time) until
    its text holds what is expected, read the text, take a screenshot."""

    def __init__(self, width: int = 1400, height: int = 1000) -> None:
        from websockets.sync.client import connect  # websockets: installed with MLflow's server

        exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
        if exe is None:
            raise SystemExit("no chromium on PATH (Debian: apt-get install chromium)")
        port = free_port()
        self.proc = subprocess.Popen([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                      f"--remote-debugging-port={port}", f"--window-size={width},{height}",
                                      f"--user-data-dir={tempfile.mkdtemp(prefix='ui-check-chromium-')}",
                                      "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while True:
            try:
                targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=2))
                page = next(t for t in targets if t["type"] == "page")
                break
            except (OSError, StopIteration):
                if time.time() > deadline:
                    raise SystemExit("chromium did not open its DevTools port in 30 s") from None
                time.sleep(0.3)
        self.ws = connect(page["webSocketDebuggerUrl"], max_size=None)
        self.n = 0

    def call(self, method: str, **params):
        self.n += 1
        self.ws.send(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.n:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def text(self) -> str:
        r = self.call("Runtime.evaluate", expression="document.body ? document.body.innerText : ''", returnByValue=True)
        return re.sub(r"\s+", " ", r["result"].get("value") or "")

    def open(self, url: str, expected: list[str], timeout: float) -> tuple[str, float]:
        """Navigate and wait until every expected string is on the page (or ``timeout`` seconds)."""
        t = time.time()
        self.call("Page.navigate", url=url)
        text = ""
        while time.time() - t < timeout:
            time.sleep(1.0)
            text = self.text()
            if all(s in text for s in expected):
                break
        time.sleep(2.0)  # the charts' last frames
        return self.text(), time.time() - t

    def scroll_through(self) -> str:
        """The page's text gathered while scrolling its scrolling panes from top to end: the UI draws
        (and keeps) only the charts in view."""
        js = ("(async () => { let seen = document.body.innerText; const els = [...document.querySelectorAll('*')]"
              ".filter(e => e.scrollHeight > e.clientHeight + 50 && getComputedStyle(e).overflowY.match(/auto|scroll/));"
              " for (const e of els) { for (let y = 0; y <= e.scrollHeight; y += 300) { e.scrollTop = y; await new "
              "Promise(r => setTimeout(r, 700)); seen += ' ' + document.body.innerText; } e.scrollTop = 0; } "
              "return seen; })()")
        r = self.call("Runtime.evaluate", expression=js, awaitPromise=True, returnByValue=True)
        return re.sub(r"\s+", " ", r["result"].get("value") or "")

    def screenshot(self, path: Path) -> None:
        self.call("Runtime.evaluate", expression="document.querySelectorAll('*').forEach(e => e.scrollTop = 0)")
        time.sleep(1.0)
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        self.ws.close()
        self.proc.terminate()
        self.proc.wait(timeout=30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--project", type=Path, required=True, help="a project folder with mlflow.db after make pipeline")
    ap.add_argument("--out", type=Path, default=Path("ui-check"), help="folder for the screenshots and results.json")
    ap.add_argument("--experiment", default="lmcore")
    ap.add_argument("--timeout", type=float, default=60, help="seconds a page gets to show what is expected")
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
    browser = Browser()
    results = []
    try:
        for name, frag, expected in pages:
            url = f"http://127.0.0.1:{port}/{frag}"
            text, secs = browser.open(url, expected[:1] if "charts" in name else expected, args.timeout)
            if "charts" in name:  # the charts below the first screen are drawn once scrolled into view
                text = browser.scroll_through()
            browser.screenshot(args.out / f"{name}.png")
            missing = [s for s in expected if s not in text]
            results.append({"page": name, "url": frag, "expected": expected, "missing": missing,
                            "seconds": round(secs, 1)})
            print(f"{name:18s} {'ok' if not missing else 'MISSING ' + ', '.join(missing):40s} {secs:5.1f} s  {frag}",
                  flush=True)
    finally:
        browser.close()
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    (args.out / "results.json").write_text(json.dumps({"project": str(project), "pipeline": key,
                                                       "mlflow": mlflow.__version__, "pages": results}, indent=1))
    print(f"screenshots and results.json in {args.out}")
    return 0 if all(not r["missing"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
