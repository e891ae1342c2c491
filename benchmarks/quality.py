"""Quality at equal compute: validation bits per byte after a fixed wall-clock budget.

Default mode: lmcore's default pretraining (the ``pretrain`` section of ``params.yaml``, as is)
against a plain GPT-2 (``benchmarks/gpt2_baseline.py``: learned positions, LayerNorm, GELU 4x
MLP, biases, tied embeddings) trained by the same loop (``lmcore.train.pretrain.pretrain`` with
``build_model``) with AdamW and the same width, depth, context, batch, precision, schedule,
warm-up, weight decay and clipping. GPT-2 may prefer another peak learning rate than lmcore's,
so it is trained with each value of ``--lr-baseline`` (default: lmcore's ``lr`` and a third of
it) and the table marks its best run.

Method (the cores are shared, so wall-clock timings are noisy):

1. Throughput probe, in one process: every distinct setup (architecture, shape, batch,
   optimizer, precision) takes a few untimed steps, then timed steps in rounds, one step per
   setup per round with the order rotating, so that a neighbour on the cores slows all of them
   alike. A setup's throughput is the median of its timed steps. The step is pretrain's own
   (``lmcore.train.step.train_step``: accumulation, gradient clipping, optimizer step,
   zero_grad, through Accelerate, with the run's precision).
2. Each run gets ``max_steps = budget seconds x its tokens/s / tokens per step`` (the schedule
   needs max_steps in advance), then trains in a subprocess of its own. The outcome no longer
   depends on how busy the machine is; the wall time actually taken is recorded beside it.
3. Validation: pretrain's bits per byte (``eval_batches x batch_size`` fixed windows of the
   model's context, as every pretraining run reports it) and perplexity, and, with
   ``--eval-tokens``, the evaluate stage's measure (``lmcore.eval.scored.score_split``: the first
   whole validation documents within N tokens, stride min(128, context), over their text's bytes),
   which compares models of different contexts fairly. The tokenizer is read from the folder beside
   the token folder (``data/tokenizer`` for ``data/tokens``).

Evaluation and checkpoints happen only at the end of each run (``eval_interval`` and
``checkpoint_interval`` are set to ``max_steps``), and neither counts toward the budget.

``--sweep``: instead, the candidate default settings of ``SWEEP`` below (lmcore's model only),
for choosing the defaults of ``params.yaml`` (see benchmarks/RESULTS.md). ``--jobs 2`` trains two
runs at a time with one thread each (step counts still come from the probe at ``--threads``).

    python benchmarks/quality.py                                  # 8 minutes each, 2 threads
    python benchmarks/quality.py --budget-minutes 2 --lr-baseline 1e-3 3e-3
    python benchmarks/quality.py --sweep --budget-minutes 5 --jobs 2 --out runs/bench/sweep
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

# candidate defaults for --sweep: overrides of the params.yaml pretrain section (nested dicts
# merge). "warmup_fraction" sets warmup_steps to that share of the run's max_steps (0.24: the 50
# of the 208 steps that params.yaml's defaults get in 5 minutes, scaled to each run's length);
# "val_windows" sets eval_batches so that every run is validated on the same number of windows.
# Each candidate changes one thing from SWEEP_FROM, params.yaml's defaults when the sweep began
# (4x256, context 256, batch 16, AdamW 3e-3, cosine, warm-up 50 steps).
SWEEP_FROM: dict[str, Any] = {  # the defaults the sweep started from (params.yaml before it)
    "model": {"n_layer": 4, "n_head": 4, "n_kv_heads": None, "n_embd": 256, "block_size": 256,
              "mlp_ratio": 8 / 3, "dropout": 0.0, "tie_embeddings": True, "rope_theta": 10000.0},
    "batch_size": 16, "grad_accum": 1, "optimizer": "adamw", "lr": 3e-3, "muon_lr": 0.02, "muon_momentum": 0.95,
    "schedule": "cosine", "decay_fraction": 0.2, "min_lr_ratio": 0.1, "warmup_steps": 50, "weight_decay": 0.1,
    "decay_embeddings": False, "beta1": 0.9, "beta2": 0.95, "grad_clip": 1.0, "mixed_precision": "auto",
    "compile": False, "eval_batches": 8, "seed": 1337,
}
BASE = {"warmup_fraction": 0.24}
SWEEP: list[tuple[str, dict[str, Any]]] = [
    ("params.yaml as is (warmup 50 steps)", {}),
    ("warmup 10 %", {"warmup_fraction": 0.1}),
    ("lr 6e-3", {**BASE, "lr": 6e-3}),
    ("batch 8", {**BASE, "batch_size": 8}),
    ("muon", {**BASE, "optimizer": "muon"}),
    ("wsd", {**BASE, "schedule": "wsd"}),
    ("4x192", {**BASE, "model": {"n_embd": 192}}),
    ("2x256", {**BASE, "model": {"n_layer": 2}}),
    ("6x192 (6 heads)", {**BASE, "model": {"n_layer": 6, "n_head": 6, "n_embd": 192}}),
    ("context 128", {**BASE, "model": {"block_size": 128}}),
    # second round, from the first round's winner (batch 8)
    ("batch 4", {**BASE, "batch_size": 4}),
    ("batch 8, wsd", {**BASE, "batch_size": 8, "schedule": "wsd"}),
    ("batch 8, muon", {**BASE, "batch_size": 8, "optimizer": "muon"}),
    ("batch 8, lr 1.5e-3", {**BASE, "batch_size": 8, "lr": 1.5e-3}),
    # third round: the best shape of the first (2x256) with the second round's changes
    ("2x256, batch 8", {**BASE, "batch_size": 8, "model": {"n_layer": 2}}),
    ("2x256, batch 8, wsd", {**BASE, "batch_size": 8, "schedule": "wsd", "model": {"n_layer": 2}}),
    ("2x256, batch 8, muon", {**BASE, "batch_size": 8, "optimizer": "muon", "model": {"n_layer": 2}}),
    # fourth round, from the third round's winner (2x256, batch 8, AdamW, cosine)
    ("2x256, batch 4", {**BASE, "batch_size": 4, "model": {"n_layer": 2}}),
    ("2x256, batch 8, context 128", {**BASE, "batch_size": 8, "model": {"n_layer": 2, "block_size": 128}}),
    ("3x256, batch 8", {**BASE, "batch_size": 8, "model": {"n_layer": 3}}),
]


# ---------------------------------------------------------------------------------------------
# specs


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def params_pretrain(path: Path) -> dict[str, Any]:
    """The validated pretrain section of ``path`` as a plain dict (preset resolved)."""
    import yaml

    from lmcore.config import PretrainConfig

    # only this section is validated: the benchmark needs no other
    d = PretrainConfig(**(yaml.safe_load(path.read_text()) or {}).get("pretrain", {})).model_dump(mode="json")
    d["model"].pop("preset", None)  # its fields are filled in; explicit overrides then apply cleanly
    return d


def make_spec(name: str, arch: str, pretrain: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    extra = dict(extra or {})
    spec = {"name": name, "arch": arch, "warmup_fraction": extra.pop("warmup_fraction", None),
            "val_windows": extra.pop("val_windows", None)}
    spec["pretrain"] = merge(pretrain, extra)
    return spec


def probe_key(spec: dict[str, Any]) -> str:
    """What decides the cost of a step (not the learning rate or schedule)."""
    p = spec["pretrain"]
    return json.dumps([spec["arch"], p["model"], p["batch_size"], p["grad_accum"], p["optimizer"],
                       p["mixed_precision"], p["compile"]], sort_keys=True)


def tokens_per_step(spec: dict[str, Any]) -> int:
    p = spec["pretrain"]
    return p["batch_size"] * p["grad_accum"] * p["model"]["block_size"]


def finalize(spec: dict[str, Any], tps: float, budget_s: float) -> dict[str, Any]:
    """Fill in max_steps from the budget, warm-up by fraction, end-only eval and checkpoint."""
    p = dict(spec["pretrain"])
    steps = max(1, int(budget_s * tps / tokens_per_step(spec)))
    p["max_steps"] = steps
    if spec.get("warmup_fraction") is not None:
        p["warmup_steps"] = round(spec["warmup_fraction"] * steps)
    p["warmup_steps"] = min(p["warmup_steps"], steps - 1)  # < max_steps (PretrainConfig)
    if spec.get("val_windows"):
        p["eval_batches"] = max(1, spec["val_windows"] // p["batch_size"])
    p["eval_interval"] = p["checkpoint_interval"] = steps
    p["log_interval"] = min(p["log_interval"], steps)
    return {**spec, "pretrain": p, "probe_tokens_per_second": tps}


# ---------------------------------------------------------------------------------------------
# subprocess modes


def architectures():
    from gpt2_baseline import GPT2

    from lmcore.model.decoder import Decoder

    return {"lmcore": Decoder, "gpt2": GPT2}


def run_probe(job: dict[str, Any]) -> dict[str, Any]:
    """Interleaved throughput of every setup in ``job["specs"]`` (one per probe key)."""
    import torch

    from lmcore.config import PretrainConfig
    from lmcore.data.encode import load_manifest, load_tokens
    from lmcore.core.machine import tune_malloc
    from lmcore.train.accel import choose_attention, make_accelerator
    from lmcore.train.optim import build_optimizers
    from lmcore.train.pretrain import NONFINITE_HINT, decoder_config
    from lmcore.train.sampler import WindowSampler, micro_batches
    from lmcore.train.step import TrainState, train_step

    tune_malloc()  # as pretrain's process does
    torch.set_num_threads(job["threads"])
    tokens_dir = Path(job["tokens"])
    vocab = load_manifest(tokens_dir)["vocab_size"]
    train = load_tokens(tokens_dir, "train")
    archs = architectures()
    precisions = {s["pretrain"]["mixed_precision"] for s in job["specs"]}
    if len(precisions) != 1:
        raise SystemExit(f"the probe needs one precision for all setups, got {precisions}")
    acc = make_accelerator(precisions.pop())
    setups = []
    for spec in job["specs"]:
        cfg = PretrainConfig(**{**spec["pretrain"], "max_steps": 10, "warmup_steps": 0})
        torch.manual_seed(cfg.seed)
        gcfg = decoder_config(cfg.model, vocab)
        model = archs[spec["arch"]](gcfg)
        choose_attention(model, acc, cfg.batch_size, gcfg.block_size, cfg.attention)  # as pretrain chooses
        opts = build_optimizers(model, cfg)
        model, *opts = acc.prepare(model, *opts)
        model.train()
        sampler = WindowSampler(len(train), gcfg.block_size, cfg.seed)
        setups.append({"key": spec["key"], "cfg": cfg, "model": model, "opts": opts, "sampler": sampler,
                       "state": TrainState(), "tokens": cfg.batch_size * cfg.grad_accum * gcfg.block_size,
                       "times": []})

    def step(s: dict[str, Any]) -> float:
        cfg = s["cfg"]
        t = time.perf_counter()
        batches = micro_batches(s["sampler"].next_step(train, cfg.batch_size * cfg.grad_accum), cfg.batch_size,
                                cfg.grad_accum, 0)
        train_step(s["model"], s["opts"], batches, acc, s["state"], grad_clip=cfg.grad_clip,
                   max_nonfinite=cfg.max_nonfinite, hint=NONFINITE_HINT)
        return time.perf_counter() - t

    for _ in range(job["warm"]):
        for s in setups:
            step(s)
    for r in range(job["rounds"]):
        k = r % len(setups)
        for s in setups[k:] + setups[:k]:
            s["times"].append(step(s))
    return {s["key"]: {"tokens_per_second": s["tokens"] / statistics.median(s["times"]),
                       "step_seconds": s["times"]} for s in setups}


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train one finalised spec with lmcore.train.pretrain.pretrain; score it; return the numbers."""
    import numpy as np  # noqa: F401  (loaded before torch threads are set)
    import torch
    from safetensors.torch import load_model

    from lmcore.config import PretrainConfig, TrackingConfig
    from lmcore.data.encode import load_manifest, load_tokens
    from lmcore.data import tokenizer as tokmod
    from lmcore.eval.scored import score_split
    from lmcore.model.decoder import DecoderConfig
    from lmcore.train.flops import resolve_precision
    from lmcore.train.pretrain import pretrain

    spec = job["spec"]
    out = Path(job["dir"])
    # "auto" is resolved here: lmcore.train.pretrain passes cfg.mixed_precision to lmcore.train.flops.dtype_of,
    # which knows only bf16/fp16/no (the same probe decides as make_accelerator's)
    precision = resolve_precision(spec["pretrain"]["mixed_precision"])
    cfg = PretrainConfig(**{**spec["pretrain"], "threads": job["threads"], "mixed_precision": precision})
    arch = architectures()[spec["arch"]]
    t0 = time.perf_counter()
    res = pretrain(cfg, Path(job["tokens"]), out / "run", out / "metrics.json", out / "history.csv",
                   tracking=TrackingConfig(enabled=False), build_model=arch)
    wall = time.perf_counter() - t0
    m = json.loads((out / "metrics.json").read_text())
    if res.resumed_from:  # the wall time of the part before the interruption is not known here
        wall = float("nan")
    result = {"resumed_from": res.resumed_from, "val_bpb": res.val_bpb, "val_loss": res.val_loss, "val_perplexity": math.exp(res.val_loss),
              "train_loss": m["train_loss"], "steps": res.steps, "train_seconds": m["train_seconds"],
              "tokens_per_second": m["tokens_per_second"], "wall_seconds": wall, "n_params": m["n_params"],
              "trained_tokens": m["trained_tokens"], "skipped_steps": res.skipped_steps}
    if job["eval_tokens"]:
        tokens_dir = Path(job["tokens"])
        info = load_manifest(tokens_dir)["splits"]["validation"]
        cfg_json = json.loads((res.model_dir / "config.json").read_text())
        model = arch(DecoderConfig(**cfg_json["model"]))
        load_model(model, str(res.model_dir / "model.safetensors"))
        block = model.cfg.block_size
        t1 = time.perf_counter()
        # the evaluate stage's own measure: whole documents within eval_tokens, each followed by
        # end-of-text, over the UTF-8 bytes of exactly their text (a bytes-per-token estimate from
        # the whole split was 5 % off on the first document)
        tok = tokmod.load(tokens_dir.parent / "tokenizer")
        with torch.no_grad():
            scored = score_split(model, tok, load_tokens(tokens_dir, "validation"), info, tokmod.special_ids(tok).eot,
                                 min(128, block), 16, job["eval_tokens"])
        result.update(eval_bpb=scored.bpb, eval_perplexity=math.exp(scored.loss), eval_tokens=scored.tokens,
                      eval_seconds=time.perf_counter() - t1)
    shutil.rmtree(out / "run" / "checkpoints", ignore_errors=True)  # large and not needed
    return result


# ---------------------------------------------------------------------------------------------
# the driver


def subprocess_job(mode: str, job: dict[str, Any], path: Path, log: Path | None = None) -> subprocess.Popen:
    path.write_text(json.dumps(job, indent=1))
    env = {**os.environ, "OMP_NUM_THREADS": str(job["threads"]), "MLFLOW_DISABLE_TELEMETRY": "true"}
    stdout = open(log, "w") if log else None
    return subprocess.Popen([sys.executable, __file__, f"--{mode}", str(path)], cwd=ROOT, env=env,
                            stdout=stdout, stderr=subprocess.STDOUT if log else None)


def probe(specs: list[dict[str, Any]], args, out: Path) -> dict[str, float]:
    """tokens/s per probe key; keys in ``--probe-cache`` are reused, the others are measured
    together with one cached key (the anchor) and rescaled onto the cache's scale."""
    cache_path = Path(args.probe_cache) if args.probe_cache else None
    cache: dict[str, float] = json.loads(cache_path.read_text()) if cache_path and cache_path.exists() else {}
    unique: dict[str, dict[str, Any]] = {}
    for s in specs:
        unique.setdefault(probe_key(s), {**s, "key": probe_key(s)})
    missing = [k for k in unique if k not in cache]
    if not missing:
        return cache
    anchor = next((k for k in unique if k in cache), None) or next(iter(cache), None)
    todo = missing + ([anchor] if anchor else [])
    specs_by_key = {**unique}
    if anchor and anchor not in specs_by_key:
        a = json.loads(anchor)  # rebuild a spec for a cached key of another invocation
        specs_by_key[anchor] = {"key": anchor, "arch": a[0], "pretrain": merge(specs[0]["pretrain"], {
            "model": a[1], "batch_size": a[2], "grad_accum": a[3], "optimizer": a[4], "mixed_precision": a[5],
            "compile": a[6]})}
    threads = args.probe_threads or args.threads
    job = {"specs": [specs_by_key[k] for k in todo], "threads": threads, "tokens": args.tokens,
           "warm": args.probe_warm, "rounds": args.probe_rounds}
    print(f"probe: {len(todo)} setup(s) x ({args.probe_warm} warm + {args.probe_rounds} timed) steps, "
          f"{threads} thread(s)", flush=True)
    p = subprocess_job("probe", job, out / "probe-job.json")
    if p.wait():
        raise SystemExit("probe failed")
    measured = json.loads((out / "probe-job.json.result").read_text())
    scale = cache[anchor] / measured[anchor]["tokens_per_second"] if anchor else 1.0
    if anchor:
        print(f"probe: anchor measured at {measured[anchor]['tokens_per_second']:.0f} tokens/s, cached "
              f"{cache[anchor]:.0f}: new values scaled by {scale:.3f}")
    for k in missing:
        cache[k] = measured[k]["tokens_per_second"] * scale
    with open(out / "probe-log.jsonl", "a") as f:
        f.write(json.dumps({"time": datetime.datetime.now().isoformat(timespec="seconds"), "threads": threads,
                            "anchor": anchor, "scale": scale, "measured": measured}) + "\n")
    if cache_path:
        cache_path.write_text(json.dumps(cache, indent=1))
    return cache


def train_all(runs: list[dict[str, Any]], args, out: Path) -> list[dict[str, Any]]:
    threads = args.train_threads or max(1, args.threads // args.jobs)
    pending, active, done = list(runs), [], []
    while pending or active:
        while pending and len(active) < args.jobs:
            spec = pending.pop(0)
            d = out / spec["slug"]
            if (d / "result.json").exists() and args.reuse:
                old = json.loads((d / "result.json").read_text())
                if old["spec"]["pretrain"] == spec["pretrain"] and old["spec"]["arch"] == spec["arch"]:
                    print(f"{spec['name']}: reusing {d / 'result.json'}", flush=True)
                    done.append(old)
                    continue
            # an interrupted run of the same settings resumes from its checkpoint (bitwise as if
            # uninterrupted); anything else starts afresh
            old_job = json.loads((d / "job.json").read_text()) if (d / "job.json").exists() else None
            resumable = (args.reuse and old_job is not None and old_job["spec"]["pretrain"] == spec["pretrain"]
                         and old_job["spec"]["arch"] == spec["arch"] and any((d / "run/checkpoints").glob("step-*")))
            if not resumable:
                shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True, exist_ok=True)
            job = {"spec": spec, "dir": str(d), "tokens": args.tokens, "threads": threads,
                   "eval_tokens": args.eval_tokens}
            log = d / ("log-resumed.txt" if resumable else "log.txt")
            print(f"{spec['name']}: {spec['pretrain']['max_steps']} steps "
                  f"({spec['probe_tokens_per_second']:.0f} tokens/s probed), {threads} thread(s); log {log}", flush=True)
            active.append((spec, d, subprocess_job("one", job, d / "job.json", log), time.time()))
        time.sleep(2)
        for item in list(active):
            spec, d, proc, started = item
            if proc.poll() is None:
                continue
            active.remove(item)
            if proc.returncode:  # the others go on; rerun with --reuse to resume or redo it
                print(f"{spec['name']} failed (exit {proc.returncode}); see {d / 'log.txt'}", flush=True)
                continue
            r = json.loads((d / "job.json.result").read_text())
            record = {"spec": spec, "result": r, "threads": threads, "started": started}
            (d / "result.json").write_text(json.dumps(record, indent=1))
            print(f"{spec['name']}: val bpb {r['val_bpb']:.4f}, {r['wall_seconds']:.0f} s", flush=True)
            done.append(record)
    order = {s["slug"]: i for i, s in enumerate(runs)}
    return sorted(done, key=lambda rec: order[rec["spec"]["slug"]])


def slugify(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def describe(p: dict[str, Any]) -> str:
    m = p["model"]
    opt = f"muon {p['muon_lr']:g} + adamw {p['lr']:g}" if p["optimizer"] == "muon" else f"adamw {p['lr']:g}"
    return (f"{m['n_layer']}x{m['n_embd']} ({m['n_head']} heads), ctx {m['block_size']}, batch {p['batch_size']}"
            f"{'x' + str(p['grad_accum']) if p['grad_accum'] > 1 else ''}, {opt}, {p['schedule']}, "
            f"warmup {p['warmup_steps']}")


def table(records: list[dict[str, Any]], budget_s: float, mark: set[str]) -> str:
    has_eval = any("eval_bpb" in r["result"] for r in records)
    head = ["run", "setup", "params", "probe tok/s", "steps", "tokens", "2-thread s (est.)", "wall s",
            "val bpb", "val ppl"] + (["eval bpb", "eval ppl"] if has_eval else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rec in records:
        s, r = rec["spec"], rec["result"]
        est = r["trained_tokens"] / s["probe_tokens_per_second"]
        name = f"**{s['name']}**" if s["slug"] in mark else s["name"]
        row = [name, f"{s['arch']}: {describe(s['pretrain'])}", f"{r['n_params'] / 1e6:.2f}M",
               f"{s['probe_tokens_per_second']:,.0f}", f"{r['steps']}", f"{r['trained_tokens'] / 1e3:,.0f}k",
               f"{est:.0f}", f"{r['wall_seconds']:.0f}" if not r.get("resumed_from") else f"(resumed at {r['resumed_from']})", f"{r['val_bpb']:.4f}", f"{r['val_perplexity']:.1f}"]
        if has_eval:
            row += [f"{r['eval_bpb']:.4f}", f"{r['eval_perplexity']:.1f}"] if "eval_bpb" in r else ["", ""]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-minutes", type=float, default=None, help="wall-clock budget per run (default 8; 5 for --sweep)")
    p.add_argument("--tokens", default=str(ROOT / "data/tokens"), help="token shards (lmcore encode's output)")
    p.add_argument("--params", default=str(ROOT / "params.yaml"), help="params file whose pretrain section is the base")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads the budget is defined at (the probe runs with them)")
    p.add_argument("--lr-baseline", type=float, nargs="+", default=None,
                   help="peak AdamW learning rates to try for GPT-2 (default: lmcore's lr and a third of it)")
    p.add_argument("--out", default=None, help="working folder and results (default runs/bench/quality or .../sweep)")
    p.add_argument("--sweep", action="store_true", help="train the candidate defaults of SWEEP instead")
    p.add_argument("--only", nargs="+", help="with --sweep: only the candidates whose index (0-based) is given, in that order")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at the same time")
    p.add_argument("--train-threads", type=int, default=None, help="torch threads per run (default threads / jobs)")
    p.add_argument("--probe-threads", type=int, default=None,
                   help="threads for the probe (default --threads); with a cached anchor measured at --threads, "
                        "the new values are rescaled onto its scale (assumes the same thread speed-up for all)")
    p.add_argument("--eval-tokens", type=int, default=32768,
                   help="also score the first N validation tokens as the evaluate stage does (0: off)")
    p.add_argument("--probe-warm", type=int, default=2, help="untimed probe steps per setup")
    p.add_argument("--probe-rounds", type=int, default=6, help="timed probe steps per setup")
    p.add_argument("--probe-cache", default=None,
                   help="JSON of measured throughputs to reuse and extend (default OUT/probe.json with --sweep)")
    p.add_argument("--reuse", action="store_true", help="keep finished runs whose settings did not change")
    p.add_argument("--probe-only", action="store_true", help="measure the throughputs, print them and stop")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--probe", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.one or args.probe:  # a subprocess: one training run or the probe
        path = Path(args.one or args.probe)
        job = json.loads(path.read_text())
        result = run_one(job) if args.one else run_probe(job)
        Path(str(path) + ".result").write_text(json.dumps(result, indent=1))
        return

    budget_min = args.budget_minutes or (5.0 if args.sweep else 8.0)
    budget_s = budget_min * 60
    out = Path(args.out or ROOT / "runs/bench" / ("sweep" if args.sweep else "quality"))
    out.mkdir(parents=True, exist_ok=True)
    if args.sweep and args.probe_cache is None:
        args.probe_cache = str(out / "probe.json")
    base = params_pretrain(Path(args.params))
    if args.sweep:
        order = [int(i) for i in args.only] if args.only else range(len(SWEEP))  # in the order given
        chosen = [(i, *SWEEP[i]) for i in order]
        base = merge(base, SWEEP_FROM)  # the sweep's starting point, whatever params.yaml says now
        specs = [make_spec(f"{i}: {n}", "lmcore", base, {"val_windows": 128, **o}) for i, n, o in chosen]
    else:
        # the GPT-2's best rate was the top of [lr, lr/3] in every recorded run: a grid that brackets it
        lrs = args.lr_baseline or [3 * base["lr"], base["lr"], base["lr"] / 3]
        gpt2 = merge(base, {"optimizer": "adamw"})
        # the warm-up keeps its share of params.yaml's steps at the budget's step count
        share = {"warmup_fraction": base["warmup_steps"] / base["max_steps"]}
        specs = [make_spec("lmcore defaults", "lmcore", base, dict(share))]
        specs += [make_spec(f"GPT-2, lr {lr:g}", "gpt2", merge(gpt2, {"lr": lr}), dict(share)) for lr in lrs]
    for s in specs:
        s["slug"] = slugify(s["name"])

    started = time.time()
    load_before = os.getloadavg()
    tps = probe(specs, args, out)
    if args.probe_only:
        for s in specs:
            t = tps[probe_key(s)]
            print(f"{s['name']}: {t:,.0f} tokens/s, {budget_s * t / tokens_per_step(s):.0f} steps in {budget_min:g} min")
        return
    runs = [finalize(s, tps[probe_key(s)], budget_s) for s in specs]
    records = train_all(runs, args, out)

    mark: set[str] = set()
    if args.sweep:
        mark.add(min(records, key=lambda r: r["result"]["val_bpb"])["spec"]["slug"])
    else:
        base_recs = [r for r in records if r["spec"]["arch"] == "gpt2"]
        best_gpt2 = min(base_recs, key=lambda r: r["result"]["val_bpb"])
        mark |= {records[0]["spec"]["slug"], best_gpt2["spec"]["slug"]}
    threads = args.train_threads or max(1, args.threads // args.jobs)
    from lmcore.core.machine import cpu_name, git_commit

    head = (f"Machine: {cpu_name()}, {os.cpu_count()} cores; "
            f"commit {git_commit(ROOT)}; {datetime.date.today()}; budget {budget_min:g} min per run at {args.threads} "
            f"thread(s) (probe at {args.probe_threads or args.threads}); training with {threads} thread(s), {args.jobs} run(s) at a time; load average "
            f"{load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after; {(time.time() - started) / 60:.0f} min in all.\n"
            f"Command: `python benchmarks/quality.py {' '.join(sys.argv[1:])}`")
    text = head + "\n\n" + table(records, budget_s, mark)
    if not args.sweep:
        lm, g = records[0]["result"], best_gpt2["result"]
        text += (f"\n\nlmcore defaults: {lm['val_bpb']:.4f} bits per byte against {g['val_bpb']:.4f} for the best "
                 f"GPT-2 run ({best_gpt2['spec']['name']}; {lm['val_bpb'] - g['val_bpb']:+.4f}, "
                 f"{(lm['val_bpb'] / g['val_bpb'] - 1) * 100:+.1f} %).")
    (out / "results.json").write_text(json.dumps(records, indent=1))
    (out / "results.md").write_text(text + "\n")
    print("\n" + text)


if __name__ == "__main__":
    main()
