"""The report of one pipeline execution: one HTML page a person opens in a browser, offline.

``runs/report/index.html`` holds everything inline (no CDN, no script; the images as PNG data
URIs, so the page also reads as one MLflow artifact): the execution's summary (stage times,
headline numbers), the data report of the clean stage with its drops per reason, the tokenizer
and token counts, the pretraining curves (loss, validation bits per byte, learning rate), the
table of scores beside their baselines, the evaluate stage's samples and the lineage from the
raw corpus to the evaluation. The curves are also ``runs/report/curves.png``.

:func:`write_report` builds it from the stages' outputs; ``lmcore summary`` (the end of
``make pipeline`` and of the Prefect flow) calls it and logs the folder to the execution's
parent run.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

from lmcore.config import Params
from lmcore.core.errors import StageError
from lmcore.core.io import atomic_path
from lmcore.core.layout import Layout
from lmcore.lineage import render, trace
from lmcore.summary import REPORT, headlines
from lmcore.tracking import find_parent, is_newest_execution, open_client, reading_store
from lmcore.train.pretrain import read_history

FOLDER = "runs/report"

_CSS = """
body { font: 15px/1.45 system-ui, sans-serif; max-width: 1000px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.8em; }
.sub { color: #666; } table { border-collapse: collapse; margin: 0.6em 0; }
td, th { border: 1px solid #ddd; padding: 0.25em 0.7em; text-align: left; } th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } .better { color: #176317; font-weight: 600; }
.worse { color: #a11; } pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 13px; }
img { max-width: 100%; border: 1px solid #eee; } .missing { color: #a11; }
"""

log = logging.getLogger(__name__)


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``; None where it is missing, unreadable or not an object (the
    report shows what it can)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _num(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return html.escape(str(v))
    if isinstance(v, int) or float(v).is_integer() and abs(v) >= 1000:
        return f"{int(v):,}"
    return f"{v:.4g}" if abs(v) < 1000 else f"{v:,.0f}"


def _table(head: list[str], rows: list[list[Any]], classes: list[list[str]] | None = None) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for i, row in enumerate(rows):
        cells = []
        for j, v in enumerate(row):
            cls = ["num"] if isinstance(v, (int, float)) and not isinstance(v, bool) else []
            if classes and classes[i][j]:
                cls.append(classes[i][j])
            attr = f' class="{" ".join(cls)}"' if cls else ""
            cells.append(f"<td{attr}>{_num(v)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out + ["</table>"])


def curves_png(series: dict[str, list[tuple[int, float]]]) -> bytes:
    """Loss (train and validation), validation bits per byte and learning rate against the step."""
    import matplotlib  # lazy: ~0.5 s to import; only the report's figure needs it

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # lazy: as above, after choosing the Agg backend

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=110)
    panels = [("loss (nats per token)", ["train_loss", "val_loss"]), ("validation bits per byte", ["val_bpb"]),
              ("learning rate", ["lr"])]
    for ax, (title, keys) in zip(axes, panels):
        for k in keys:
            pts = series.get(k, [])
            if pts:
                ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o" if len(pts) < 30 else None,
                        markersize=3, label=k)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _samples(path: Path) -> list[tuple[str, str]]:
    """``(prompt, text)`` pairs of the evaluate stage's ``samples.md``."""
    found = re.findall(r"^### Prompt: (.*?)\n\n```\n(.*?)\n```", path.read_text(encoding="utf-8"), re.S | re.M)
    return [(p, t) for p, t in found]


def _scores_section(layout: Layout) -> str:
    report = layout / REPORT
    if not report.exists():
        return f'<p class="missing">no evaluation yet ({REPORT} is missing)</p>'
    rows, classes = [], []
    lower_better = ("bits per byte", "perplexity")
    for h in headlines(report):
        value = float(h.value)
        for b in h.baselines or ["none -"]:
            kind, _, base = b.rpartition(" ")
            try:
                base_v = float(base)
            except ValueError:
                base_v = math.nan
            rows.append([h.what, h.metric, value, kind, base_v if math.isfinite(base_v) else ""])
            if math.isfinite(base_v):
                better = value < base_v if any(w in h.metric for w in lower_better) else value > base_v
                classes.append(["", "", "better" if better else "worse", "", ""])
            else:
                classes.append([""] * 5)
    return (_table(["what", "metric", "model", "baseline", "baseline value"], rows, classes)
            + '<p class="sub">green: the model beats that baseline; red: it does not.</p>')


def _data_section(layout: Layout) -> str:
    parts = []
    stats = _read_json(layout / "data/clean/stats.json")
    if stats:
        parts.append(f"<p>kept {stats.get('documents_kept', 0):,} of {stats.get('documents_in', 0):,} documents "
                     f"({stats.get('chars_in', 0):,} characters in); train {stats.get('train_documents', 0):,}, "
                     f"validation {stats.get('validation_documents', 0):,}.</p>")
        drops = [[k.split(".dropped_docs.")[0], k.split(".dropped_docs.")[1], v,
                  stats.get(k.replace(".dropped_docs.", ".dropped_chars."), "")]
                 for k, v in sorted(stats.items()) if ".dropped_docs." in k]
        parts.append(_table(["step", "reason", "documents", "characters"], drops) if drops
                     else "<p>no document dropped.</p>")
    png = layout / "data/clean/report.png"
    if png.exists():
        parts.append(_img(png.read_bytes(), "document lengths before and after cleaning"))
    tok, enc = _read_json(layout / "metrics/tokenizer.json"), _read_json(layout / "metrics/encode.json")
    if tok or enc:
        rows = [[k, v] for k, v in {**(tok or {}), **(enc or {})}.items()]
        parts.append("<h3>Tokenizer and tokens</h3>" + _table(["", "value"], rows))
    return "\n".join(parts) or '<p class="missing">no cleaned data (data/clean is missing)</p>'


def _training_section(layout: Layout, curves: bytes | None, tasks: list[str] | None) -> str:
    parts = []
    m = _read_json(layout / "metrics/pretrain.json")
    if m:
        keys = ["val_bpb", "val_loss", "val_perplexity", "train_loss", "n_params", "trained_tokens",
                "tokens_per_second", "mfu", "train_seconds"]
        parts.append(_table(["", "value"], [[k, m[k]] for k in keys if k in m]))
    if curves:
        parts.append(_img(curves, "pretraining curves"))
    if tasks is None:
        fine = sorted((layout / "metrics/finetune").glob("*.json")) if (layout / "metrics/finetune").is_dir() else []
    else:  # the pipeline's tasks: a task dropped from prepare.tasks.tasks leaves its metrics file behind
        fine = [layout / "metrics/finetune" / f"{t}.json" for t in tasks]
    rows = []
    for f in fine:
        if not f.exists():
            continue
        r = _read_json(f) or {}
        full = (_read_json(layout / "runs/finetune" / f.stem / "results.json") or {}).get("metrics", {})
        rows.append([f.stem, r.get("score", ""), r.get("scratch_score", ""), r.get("majority_score", ""),
                     r.get("bow_score", ""), r.get("best_epoch", ""), full.get("train_examples", "")])
    if rows:
        parts.append("<h3>Fine-tuning</h3>" + _table(["task", "score", "from scratch", "majority", "bag of words",
                                                     "best epoch", "train examples"], rows))
    return "\n".join(parts) or '<p class="missing">no pretraining yet (metrics/pretrain.json is missing)</p>'


def write_report(layout: Layout, title: str, summary: str, lineage: str | None, tasks: list[str] | None = None) -> Path:
    """Write ``runs/report/`` (``index.html``, ``curves.png``) from the outputs under ``layout``;
    ``summary``: the text of :func:`lmcore.summary.summarize`; ``lineage``: the text of
    :func:`lmcore.lineage.render` (None: not tracked); ``tasks``: the fine-tuning tasks to show
    (default: every metrics file). Returns the page's path."""
    history = read_history(layout.plots)
    curves = curves_png(history) if history else None
    samples = _samples(layout / "runs/evaluate/samples.md") if (layout / "runs/evaluate/samples.md").exists() else []
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [
        f"<h1>{html.escape(title)}</h1><p class='sub'>written {when}</p>",
        "<h2>Summary</h2>", f"<pre>{html.escape(summary)}</pre>",
        "<h2>Scores beside their baselines</h2>", _scores_section(layout),
        "<h2>Data</h2>", _data_section(layout),
        "<h2>Training</h2>", _training_section(layout, curves, tasks),
        "<h2>Samples</h2>",
        "\n".join(f"<h3>{html.escape(p)}</h3><pre>{html.escape(t)}</pre>" for p, t in samples)
        or "<p class='missing'>no samples (runs/evaluate/samples.md is missing)</p>",
        "<h2>Lineage</h2>",
        f"<pre>{html.escape(lineage)}</pre>" if lineage else "<p class='missing'>tracking is off: no lineage</p>",
    ]
    page = (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    out = layout / FOLDER
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "index.html").write_text(page, encoding="utf-8")
        if curves:
            (tmp / "curves.png").write_bytes(curves)
    return out / "index.html"


def report_execution(params: Params, layout: Layout, key: str | None, summary: str) -> Path:
    """The report of execution ``key`` (:func:`write_report`, with the lineage of
    ``runs/evaluate`` when tracking is on), logged to the execution's MLflow parent run as the
    artifact folder ``report``. Returns the page's path."""
    lineage = None
    parent = None
    older = False
    if params.tracking.enabled:
        try:
            with reading_store(params.tracking.tracking_uri):
                client, experiment_id, _ = open_client(params.tracking, existing=True)  # reads: creates no store
                evaluated = layout / "runs/evaluate"
                lineage = (render(trace(client, experiment_id, str(evaluated))) if evaluated.exists()
                           else "no evaluation yet: runs/evaluate is missing")
                parent = find_parent(client, experiment_id, key) if key else None
                if parent is not None and not is_newest_execution(client, experiment_id, parent.info.run_id):
                    parent = None  # an older execution's record keeps the report it had
                    older = True
        except StageError as e:
            lineage = f"the lineage could not be read: {e}"
    # the page shows the files as they are now: an older execution's key would mislabel them
    title = ("lmcore pipeline outputs" if not key else
             f"lmcore pipeline outputs as of now (execution {key} is not the newest)" if older else f"lmcore pipeline {key}")
    page = write_report(layout, title, summary, lineage, list(params.prepare.tasks.tasks))
    if parent is not None:
        try:  # the pipeline has run: a store that fails now costs the copy in MLflow, not the run
            with reading_store(params.tracking.tracking_uri):
                client.log_artifacts(parent.info.run_id, str(page.parent), artifact_path="report")
            print(f"report: also in the artifacts of the MLflow parent run {parent.info.run_id} (report/)", flush=True)
        except StageError as e:
            log.warning("report: %s; the report stays in %s only", e, page)
    return page
