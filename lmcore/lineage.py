"""The chain from raw bytes to evaluation scores, read back from MLflow.

Every stage run records what it read and wrote as MLflow datasets with content digests
(:meth:`lmcore.tracking.Tracker.datasets`). A stage's input is linked to the run that wrote
those very bytes (:func:`lmcore.tracking.producer_of`), and a stage's output to the runs that
read them, in any pipeline execution. :func:`trace` walks both ways from one run, a folder or a
pipeline run; :func:`render` prints the chain with each stage's facts (corpus sources, what the
cleaning dropped and why, the tokenizer's hash, the token counts, the training's settings and
score, each fine-tuning and the evaluation) and says where a link is missing.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmcore.core.errors import StageError
from lmcore.stages import ORDER
from lmcore.tracking import data_digest, dataset_name, find_parent, model_uri_parts, producer_of

_CONTEXT = "mlflow.data.context"


@dataclasses.dataclass
class Link:
    """One dataset of a run: its name, digest, and the run at its other end (the producer of an
    input, None when no run wrote these bytes)."""

    name: str
    digest: str
    profile: dict[str, Any]
    producer: Any | None = None


@dataclasses.dataclass
class Chain:
    start: str
    """What was asked for, as the user gave it."""
    runs: dict[str, Any]
    """Every run of the chain by id."""
    inputs: dict[str, list[Link]]
    """Each run's inputs with their producers."""
    outputs: dict[str, list[Link]]


def _datasets(run: Any, context: str) -> list[Link]:
    out = []
    for d in run.inputs.dataset_inputs if run.inputs else []:
        tags = {t.key: t.value for t in d.tags}
        if tags.get(_CONTEXT) == context:
            try:
                profile = json.loads(d.dataset.profile or "{}")
            except ValueError:
                profile = {}
            out.append(Link(d.dataset.name, d.dataset.digest, profile))
    return out


def _consumers(client: Any, experiment_id: str, link: Link) -> list[Any]:
    where = f"datasets.digest = '{link.digest}' and attributes.status = 'FINISHED'"
    found = client.search_runs([experiment_id], filter_string=where, max_results=200)
    return [r for r in found
            if any(i.name == link.name and i.digest == link.digest for i in _datasets(r, "input"))]


def _model_version(client: Any, uri: str) -> Any:
    from mlflow.exceptions import MlflowException  # lazy: mlflow loads only when a command reads runs

    name, ref, alias = model_uri_parts(uri)
    try:
        return client.get_model_version_by_alias(name, ref) if alias else client.get_model_version(name, ref)
    except MlflowException as e:
        raise StageError(f"{uri}: no such registered model version ({str(e).splitlines()[0][:200]})") from None


def resolve(client: Any, experiment_id: str, what: str) -> list[Any]:
    """The run(s) ``what`` names: a run id (a pipeline's parent run stands for its stages, run or
    reused), a pipeline key, a registered model version (``models:/<name>@<alias>`` or
    ``models:/<name>/<version>``: the run that logged it), or a file or folder (the run that
    wrote it as it is now)."""
    if what.startswith("models:/"):
        return [client.get_run(_model_version(client, what).run_id)]
    path = Path(what)
    if path.exists():
        run = producer_of(client, experiment_id, dataset_name(path), data_digest(path)["sha256"][:32])
        if run is None:
            raise StageError(f"{what}: no MLflow run in this experiment wrote it as it is now "
                             f"(sha256 {data_digest(path)['sha256'][:16]}...): it was made untracked, or changed since")
        return [run]
    from mlflow.exceptions import MlflowException  # lazy: mlflow loads only when a command reads runs

    try:
        run = client.get_run(what)
    except MlflowException:
        run = find_parent(client, experiment_id, what)
        if run is None:
            raise StageError(f"{what}: no such file or folder, MLflow run id or pipeline key") from None
    if run.data.tags.get("lmcore.kind") != "pipeline":
        return [run]
    ids = {v for k, v in run.data.tags.items() if k.startswith("lmcore.produced_by.") and v != "unknown"}
    children = client.search_runs([experiment_id], max_results=1000,
                                  filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
    ids |= {c.info.run_id for c in children}
    return [client.get_run(i) for i in sorted(ids)]


def trace(client: Any, experiment_id: str, what: str) -> Chain:
    """The runs upstream of ``what`` (the producers of its inputs, recursively) and downstream
    (the runs that read its outputs, recursively)."""
    runs: dict[str, Any] = {}
    inputs: dict[str, list[Link]] = {}
    outputs: dict[str, list[Link]] = {}
    walked: dict[str, set[str]] = {}  # the directions already followed from each run
    start = resolve(client, experiment_id, what)
    todo = [(r, "both") for r in start]
    while todo:
        run, way = todo.pop()
        rid = run.info.run_id
        # a run reached upward from another start run is still walked down when it is a start run
        # itself (skipping every run seen once made the result depend on the order of run ids)
        new = ({"up", "down"} if way == "both" else {way}) - walked.setdefault(rid, set())
        if not new:
            continue
        walked[rid] |= new
        if rid not in runs:
            runs[rid] = run
            inputs[rid] = _datasets(run, "input")
            outputs[rid] = _datasets(run, "output")
            for link in inputs[rid]:
                link.producer = producer_of(client, experiment_id, link.name, link.digest)
        if "up" in new:
            todo += [(link.producer, "up") for link in inputs[rid] if link.producer is not None]
        if "down" in new:
            for link in outputs[rid]:
                todo += [(c, "down") for c in _consumers(client, experiment_id, link)]
    return Chain(what, runs, inputs, outputs)


def _order(run: Any) -> tuple[int, int]:
    stage = run.data.tags.get("lmcore.stage", "")
    return (ORDER.index(stage) if stage in ORDER else len(ORDER), run.info.start_time or 0)


def _num(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 1000 or float(v).is_integer() else f"{v:.4g}"


def _facts(run: Any) -> Iterator[str]:
    """The facts of one stage run a reader of the chain wants."""
    stage = run.data.tags.get("lmcore.stage")
    p, m = run.data.params, run.data.metrics
    nan = float("nan")
    if stage == "prepare":
        kind = p.get("prepare.corpus.kind", "?")
        src = {"files": f"files {p.get('prepare.corpus.paths')}", "hub": f"hub {p.get('prepare.corpus.hub_dataset')}",
               "shakespeare": "the embedded Shakespeare text"}.get(kind, kind)
        yield f"corpus: {src}; {_num(m.get('documents', 0))} documents, {_num(m.get('characters', 0))} characters"
    elif stage == "clean":
        dropped = {k.split(".dropped_docs.")[1]: v for k, v in m.items() if ".dropped_docs." in k}
        why = ", ".join(f"{k} {_num(v)}" for k, v in sorted(dropped.items(), key=lambda kv: -kv[1])) or "none"
        yield (f"kept {_num(m.get('documents_kept', 0))} of {_num(m.get('documents_in', 0))} documents; "
               f"dropped: {why}")
    elif stage == "tokenizer":
        yield (f"{p.get('tokenizer.kind', '?')}, vocabulary {_num(m.get('vocab_size', 0))}, "
               f"{m.get('validation_bytes_per_token', nan):.3f} bytes per token on validation")
    elif stage == "encode":
        yield f"{_num(m.get('train_tokens', 0))} train and {_num(m.get('validation_tokens', 0))} validation tokens"
    elif stage == "pretrain":
        shape = "x".join(p.get(f"pretrain.model.{k}", "?") for k in ("n_layer", "n_embd"))
        yield (f"{shape} (layers x width), {_num(float(p.get('n_params', 0)))} parameters, "
               f"{p.get('pretrain.max_steps', '?')} steps at lr {p.get('pretrain.lr', '?')}; "
               f"val bpb {m.get('val_bpb', nan):.4f}")
    elif stage == "finetune":
        scratch = f", from scratch {m['scratch_score']:.4f}" if "scratch_score" in m else ""
        yield (f"task {run.data.tags.get('lmcore.task', '?')}: score {m.get('score', nan):.4f} "
               f"(majority {m.get('majority_score', nan):.4f}, bag-of-words {m.get('bow_score', nan):.4f}{scratch})")
    elif stage == "evaluate":
        tasks = sorted(k.removesuffix(".score") for k in m if k.endswith(".score") and k != "glue.score")
        scores = ", ".join(f"{t} {m[t + '.score']:.4f}" for t in tasks)
        yield (f"val bpb {m.get('lm.val_bpb', nan):.4f} (unigram {m.get('lm.unigram_val_bpb', nan):.4f})"
               + (f"; {scores}" if scores else ""))


def _when(ms: int | None) -> str:
    if not ms:
        return "?"
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _short(digest: str) -> str:
    return digest[:12]


def render(chain: Chain) -> str:
    """The chain as text, upstream first; each input names the run that wrote it, or says
    that the link is missing."""
    lines = [f"lineage of {chain.start}: {len(chain.runs)} run(s)"]
    missing = 0
    for run in sorted(chain.runs.values(), key=_order):
        rid, tags = run.info.run_id, run.data.tags
        name = tags.get("mlflow.runName", tags.get("lmcore.stage", "?"))
        commit = tags.get("lmcore.git_commit")
        git = f"commit {commit[:8]}{' (uncommitted changes)' if tags.get('lmcore.git_dirty') == 'true' else ''}" \
            if commit else "no git commit"
        lines.append(f"{name}  run {rid[:8]}  {run.info.status.lower()}  {_when(run.info.start_time)}  {git}  "
                     f"pipeline {tags.get('lmcore.pipeline_key', '-')}")
        lines += [f"    {fact}" for fact in _facts(run)]
        for link in chain.inputs[rid]:
            read = f"    read  {link.name} {_short(link.digest)}"
            if link.producer is None and tags.get("lmcore.stage") == "prepare":  # the chain's first bytes
                lines.append(f"{read}  (source, {link.profile.get('files', '?')} files, "
                             f"{link.profile.get('bytes', 0) / 1e6:.1f} MB)")
            elif link.producer is None:
                missing += 1
                lines.append(f"{read}  MISSING LINK: no tracked run wrote these bytes")
            else:
                p = link.producer
                lines.append(f"{read}  <- {p.data.tags.get('mlflow.runName', '?')} "
                             f"run {p.info.run_id[:8]}")
        for link in chain.outputs[rid]:
            size = f"{link.profile.get('files', '?')} files, {link.profile.get('bytes', 0) / 1e6:.1f} MB"
            md5 = f", dvc md5 {link.profile['dvc_md5'][:12]}" if link.profile.get("dvc_md5") else ""
            lines.append(f"    wrote {link.name} {_short(link.digest)}  ({size}{md5})")
    have = {run.data.tags.get("lmcore.stage") for run in chain.runs.values()}
    absent = [s for s in ORDER if s not in have]
    if absent:
        lines.append(f"not in this chain: {', '.join(absent)}")
    lines.append("every link found" if not missing else f"{missing} missing link(s)")
    return "\n".join(lines)
