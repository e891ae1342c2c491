"""One GPU check: the CUDA-relevant tests, then training and generation speed at ``gpt2-124m``.

Run it through ``benchmarks/gpu_check.sh`` (which picks the Python); the steps, each in a process
of its own with a time budget (a step past its budget is stopped and recorded as ``timeout``; the
others still run), most important first:

1. ``tests``: ``pytest -m cuda`` over the test files that hold CUDA-relevant tests (the
   device-decision tests run anywhere; ``tests/test_cuda.py`` needs a GPU and skips without one).
2. ``train_<model>_<eager|compile>``: training throughput of lmcore's Decoder and of Hugging Face
   ``LlamaForCausalLM`` of the same shape (``benchmarks/train_throughput.py`` builds both), preset
   ``gpt2-124m`` (12 layers x 12 heads x 768, context 1024), vocabulary 50,304 (GPT-2's 50,257
   padded to a multiple of 64), batch 16 x 1024 tokens, bf16 mixed precision, with and without
   ``torch.compile``. Both go through lmcore's own loop: ``make_accelerator('bf16')``,
   ``build_optimizers`` (fused AdamW), ``train_step`` (batches from the CPU, clipping at 1.0).
   Tokens/s over the timed steps, MFU against the vendor peak (``lmcore.train.flops``), the
   first (compiling) step's time, the loss, peak memory, dynamo's graph breaks.
3. ``generate``: generated tokens/s with and without the KV cache (``lmcore.generate`` through
   ``benchmarks/generate_bench.run``), bf16 weights, batches 1 and 8, 16-token prompts, 256 new
   tokens, temperature 0.8, top-k 50; beside it ``LlamaForCausalLM.generate`` with its cache.
4. ``generate_compiled``: the cached generation of step 3 with the decode step compiled
   (``GenerationConfig(compile=True)``: a CUDA graph replayed per token), the compiling first
   call timed apart.

Every step records ``torch.cuda.max_memory_allocated``. One JSON file collects everything with the
machine (GPU, torch, CUDA, git commit, date); it is rewritten after every step, so a run cut short
still leaves what it measured.

    benchmarks/gpu_check.sh                       # on the GPU machine: under 8 minutes
    benchmarks/gpu_check.sh --dry-run             # anywhere: every step on the CPU at a tiny shape
    python benchmarks/gpu_check.py --out results.json --only train_lmcore_eager,generate
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SCHEMA = "lmcore.gpu_check/1"
TOTAL_BUDGET_S = 450  # the whole run (the issue: under 8 minutes on one GPU)
DRY_BUDGET_S = 110  # the dry run (the issue: well under 2 minutes)

# (step, budget in seconds on the GPU, in the dry run); in this order, the most important first
STEPS: list[tuple[str, int, int]] = [
    ("tests", 60, 60),
    ("train_lmcore_eager", 45, 25),
    ("train_llama_eager", 45, 25),
    ("generate", 75, 30),
    ("generate_compiled", 80, 40),
    ("train_lmcore_compile", 110, 40),
    ("train_llama_compile", 110, 40),
]
TEST_FILES = ["tests/test_cuda.py", "tests/test_model.py", "tests/test_train_parts.py", "tests/test_flops.py"]


def settings(dry: bool) -> dict[str, Any]:
    """The shapes and counts of a run (the dry run: a tiny shape on the CPU, a few steps)."""
    if dry:
        return {"device": "cpu", "preset": "tiny", "vocab": 512, "batch": 2, "warmup_steps": 2, "timed_steps": 3,
                "compile_backend": "aot_eager", "gen_batches": [1, 2], "gen_prompt_tokens": 8, "gen_new_tokens": 16,
                "gen_rounds": 2, "mixed_precision": "bf16"}
    return {"device": "cuda", "preset": "gpt2-124m", "vocab": 50304, "batch": 16, "warmup_steps": 3, "timed_steps": 20,
            "compile_backend": "inductor", "gen_batches": [1, 8], "gen_prompt_tokens": 16, "gen_new_tokens": 256,
            "gen_rounds": 3, "mixed_precision": "bf16"}


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------
# machine


def machine_info(device: str) -> dict[str, Any]:
    import torch

    from lmcore.core.machine import cpu_name, git_commit

    info: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(ROOT),
        "python": platform.python_version(), "platform": platform.platform(), "cpu": cpu_name(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(), "device": device,
        # torch.compile's inductor builds Triton's launcher with a C compiler: without one it fails
        "c_compiler": shutil.which(os.environ.get("CC", "")) or shutil.which("cc") or shutil.which("gcc"),
    }
    for mod in ("transformers", "accelerate"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info |= {"gpu": torch.cuda.get_device_name(0), "gpu_count": torch.cuda.device_count(),
                 "gpu_memory_gib": round(p.total_memory / 2**30, 1), "gpu_capability": f"{p.major}.{p.minor}",
                 "gpu_multiprocessors": p.multi_processor_count, "bf16_supported": torch.cuda.is_bf16_supported(),
                 "allow_tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,power.limit,clocks.max.sm",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=10, check=False)
            info["nvidia_smi"] = smi.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            info["nvidia_smi"] = None
    return info


def peak_of(device, dry: bool):
    """The bf16 peak of ``device``: the datasheet figure on a known GPU, else lmcore's probe
    (in the dry run a small, quick one into a throwaway cache)."""
    import torch

    from lmcore.train.flops import peak_flops

    if dry:
        cache = Path(tempfile.gettempdir()) / "lmcore_gpu_check_peak.json"
        return peak_flops(device, torch.bfloat16, cache=cache, size=512, budget=0.3)
    return peak_flops(device, torch.bfloat16)


def memory(device) -> dict[str, float | None]:
    import torch

    if device.type != "cuda":
        return {"max_memory_allocated_gib": None, "max_memory_reserved_gib": None}
    return {"max_memory_allocated_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3),
            "max_memory_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 3)}


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# step 1: the tests


def run_tests(s: dict[str, Any], budget: float) -> dict[str, Any]:
    xml = Path(tempfile.mkdtemp(prefix="gpu_check_")) / "junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
           *TEST_FILES]
    log("  $ " + " ".join(cmd[2:]))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=budget, check=False)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return {"status": "timeout", "output_tail": out[-3000:]}
    out = res.stdout + res.stderr
    tail = [ln for ln in out.splitlines() if ln.strip()][-1:] or [""]
    log("  " + tail[0])
    row: dict[str, Any] = {"returncode": res.returncode, "summary": tail[0]}
    if xml.exists():
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        row |= {**n, "passed": n["tests"] - n["failures"] - n["errors"] - n["skipped"]}
        bad, skipped = [], []
        for case in suite.iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            if case.find("failure") is not None or case.find("error") is not None:
                bad.append(name)
            elif case.find("skipped") is not None:
                skipped.append(name)
        row |= {"not_passed": bad, "skipped_tests": skipped}
    row["status"] = "ok" if res.returncode == 0 else "failed"
    if res.returncode != 0:
        row["output_tail"] = out[-6000:]
    return row


# ---------------------------------------------------------------------------------------------
# step 2: training throughput


class HFNextToken:
    """lmcore's step objective for a Hugging Face causal LM: its own mean loss over the targets
    (``shift_labels``: the targets are shifted already, as for lmcore's Decoder)."""

    reduction = "mean"

    def targets(self, batch) -> int:
        return int((batch[1] != -100).sum())

    def loss(self, model, batch, accelerator):
        from lmcore.train.step import to_device

        x, y = to_device(batch[0], accelerator.device), to_device(batch[1], accelerator.device)
        with accelerator.autocast():
            return model(input_ids=x, labels=y, shift_labels=y).loss


def train(s: dict[str, Any], which: str, compiled: bool) -> dict[str, Any]:
    import torch
    import torch._dynamo
    import train_throughput as tt

    from lmcore.config import MODEL_PRESETS, PretrainConfig
    from lmcore.model.decoder import DecoderConfig
    from lmcore.train.accel import make_accelerator
    from lmcore.train.flops import mfu
    from lmcore.train.optim import build_optimizers
    from lmcore.train.step import NEXT_TOKEN, TrainState, train_step

    shape = MODEL_PRESETS[s["preset"]]
    L, H, C, T, V = shape["n_layer"], shape["n_head"], shape["n_embd"], shape["block_size"], s["vocab"]
    acc = make_accelerator(s["mixed_precision"])
    device = acc.device
    peak = peak_of(device, s["device"] == "cpu")
    gcfg = DecoderConfig(vocab_size=V, n_layer=L, n_head=H, n_embd=C, block_size=T, dropout=0.0)
    torch.manual_seed(0)
    if which == "lmcore":
        model, _ = tt.lmcore_model(L, H, C, T, V)
        objective, fpt = NEXT_TOKEN, model.flops_per_token()
    else:  # the same shape: width, depth, heads, SwiGLU width, tied embeddings, no biases
        model, objective = tt.hf_llama(L, H, C, T, V, gcfg.mlp_hidden, gcfg.kv_heads), HFNextToken()
        fpt = tt.flops_per_token(model, L, C, T)
    assert fpt == tt.flops_per_token(model, L, C, T)
    n_params = sum(p.numel() for p in model.parameters())
    optimizers = build_optimizers(model, PretrainConfig(lr=6e-4, weight_decay=0.1), device)
    fused = all(o.defaults.get("fused") for o in optimizers if isinstance(o, torch.optim.AdamW))
    if compiled:
        model.compile(backend=s["compile_backend"])  # in place, as lmcore pretrain does
    model, *optimizers = acc.prepare(model, *optimizers)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch._dynamo.utils.counters.clear()

    B = s["batch"]
    g = torch.Generator().manual_seed(0)
    windows = [torch.randint(0, V, (B, T + 1), generator=g) for _ in range(4)]
    batches = [(w[:, :-1].contiguous(), w[:, 1:].contiguous()) for w in windows]  # on the CPU, as pretrain's
    state, losses, times = TrainState(), [], []

    def one(i: int) -> float:
        sync(device)
        t0 = time.perf_counter()
        res = train_step(model, optimizers, [batches[i % len(batches)]], acc, state, grad_clip=1.0,
                         max_nonfinite=3, hint="", objective=objective)
        sync(device)
        losses.append(res.loss)
        return time.perf_counter() - t0

    first = one(0)
    warm = [one(i) for i in range(1, s["warmup_steps"])]
    log(f"  first step {first:.2f} s (compilation, allocation), then {len(warm)} warm-up steps {sum(warm):.2f} s; "
        f"timing {s['timed_steps']} steps of {B} x {T} tokens")
    t_all = time.perf_counter()
    for i in range(s["timed_steps"]):
        times.append(one(s["warmup_steps"] + i))
    elapsed = time.perf_counter() - t_all
    tokens = B * T
    tps = tokens * len(times) / elapsed
    row = {
        "model": "lmcore Decoder" if which == "lmcore" else "transformers LlamaForCausalLM",
        "compile": compiled, "compile_backend": s["compile_backend"] if compiled else None,
        "shape": f"{L}x{H}x{C}", "context": T, "vocab": V, "batch": B, "tokens_per_step": tokens,
        "params": n_params, "matmul_params": tt.matmul_weights(model), "flops_per_token": fpt,
        "mixed_precision": acc.mixed_precision, "fused_adamw": fused, "device": str(device),
        "first_step_s": round(first, 3), "warmup_s": round(first + sum(warm), 3),
        "timed_steps": len(times), "timed_s": round(elapsed, 3),
        "tokens_per_second": round(tps, 1),
        "tokens_per_second_median_step": round(tokens / statistics.median(times), 1),
        "step_ms_min_median_max": [round(1000 * min(times), 2), round(1000 * statistics.median(times), 2),
                                   round(1000 * max(times), 2)],
        "achieved_tflops": round(tps * fpt / 1e12, 2),
        "mfu": round(mfu(tps, fpt, peak), 4),
        "peak_tflops": round(peak.flops / 1e12, 2), "peak_source": peak.source, "peak_device": peak.device_name,
        "loss_first": losses[0], "loss_last": losses[-1], "skipped_steps": state.skipped_steps,
        "graph_breaks": {str(k): v for k, v in torch._dynamo.utils.counters["graph_break"].items()},
        "dynamo_stats": {str(k): v for k, v in torch._dynamo.utils.counters["stats"].items()},
        **memory(device),
    }
    log(f"  {tps:,.0f} tokens/s, MFU {row['mfu']:.1%} of {row['peak_tflops']} TFLOP/s ({peak.source}), "
        f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, peak memory {row['max_memory_allocated_gib']} GiB")
    if row["graph_breaks"]:
        log(f"  graph breaks: {row['graph_breaks']}")
    acc.free_memory()
    return row


# ---------------------------------------------------------------------------------------------
# step 3: generation


def generation_model(s: dict[str, Any]) -> tuple[Any, Any, Any, tuple[int, ...]]:
    """The device, lmcore's model of the preset with bf16 weights in eval mode, its decoder config
    and (layers, heads, width, context, vocab, prompt tokens, new tokens, rounds)."""
    import torch
    import train_throughput as tt

    from lmcore.config import MODEL_PRESETS

    device = torch.device(s["device"])
    shape = MODEL_PRESETS[s["preset"]]
    L, H, C, T, V = shape["n_layer"], shape["n_head"], shape["n_embd"], shape["block_size"], s["vocab"]
    torch.manual_seed(0)
    model, gcfg = tt.lmcore_model(L, H, C, T, V)
    model = model.to(device=device, dtype=torch.bfloat16).eval()
    return device, model, gcfg, (L, H, C, T, V, s["gen_prompt_tokens"], s["gen_new_tokens"], s["gen_rounds"])


def generation(s: dict[str, Any]) -> dict[str, Any]:
    import generate_bench as gb
    import torch
    import train_throughput as tt

    device, model, gcfg, (L, H, C, T, V, P, N, rounds) = generation_model(s)
    cases = [(b, cache) for b in s["gen_batches"] for cache in (True, False)]
    rows = []
    for b, cache in cases:
        gb.run(model, b, cache, P, 4)  # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        secs = [gb.run(model, b, cache, P, N) for _ in range(rounds)]
        med = statistics.median(secs)
        rows.append({"model": "lmcore Decoder", "batch": b, "kv_cache": cache, "seconds_median": round(med, 4),
                     "generated_tokens_per_second": round(b * N / med, 1), "ms_per_step": round(1000 * med / N, 3),
                     **memory(device)})
        log(f"  lmcore batch {b}, cache {'on ' if cache else 'off'}: {b * N / med:,.0f} tokens/s, "
            f"{1000 * med / N:.2f} ms/step, peak memory {rows[-1]['max_memory_allocated_gib']} GiB")
    for b in s["gen_batches"]:
        on = next(r for r in rows if r["batch"] == b and r["kv_cache"])
        off = next(r for r in rows if r["batch"] == b and not r["kv_cache"])
        on["speedup_vs_no_cache"] = round(off["seconds_median"] / on["seconds_median"], 2)
    del model
    gc.collect()
    hf: list[dict[str, Any]] | dict[str, str] = []
    try:  # the same shape in transformers, its own generate with its cache, for scale
        torch.manual_seed(0)
        llama = tt.hf_llama(L, H, C, T, V, gcfg.mlp_hidden, gcfg.kv_heads).to(device=device, dtype=torch.bfloat16)
        llama.eval()
        llama.generation_config.eos_token_id = None  # exactly n tokens: no stop check, no min_new_tokens processor
        for b in s["gen_batches"]:
            g = torch.Generator().manual_seed(b)
            ids = torch.randint(1, V, (b, P), generator=g).to(device)

            def go(n: int, ids: torch.Tensor = ids) -> float:
                sync(device)
                t0 = time.perf_counter()
                out = llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                     do_sample=True, temperature=0.8, top_k=50, use_cache=True, pad_token_id=0)
                sync(device)
                assert out.shape[1] == P + n, out.shape
                return time.perf_counter() - t0

            go(4)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            med = statistics.median(go(N) for _ in range(rounds))
            hf.append({"model": "transformers LlamaForCausalLM.generate", "batch": b, "kv_cache": True,
                       "seconds_median": round(med, 4), "generated_tokens_per_second": round(b * N / med, 1),
                       "ms_per_step": round(1000 * med / N, 3), **memory(device)})
            log(f"  HF Llama batch {b}, cache on : {b * N / med:,.0f} tokens/s, {1000 * med / N:.2f} ms/step")
    except Exception as e:  # noqa: BLE001 (informative only: lmcore's numbers stand without it)
        hf = {"error": f"{type(e).__name__}: {e}"}
        log(f"  HF Llama generate failed: {hf['error']}")
    return {"shape": f"{L}x{H}x{C}", "context": T, "vocab": V, "dtype": "bfloat16 weights",
            "prompt_tokens": P, "new_tokens": N, "rounds": rounds, "sampling": "temperature 0.8, top-k 50",
            "lmcore": rows, "hf_llama": hf}


def generation_compiled(s: dict[str, Any]) -> dict[str, Any]:
    """The cached generation of :func:`generation` with the decode step compiled
    (``GenerationConfig(compile=True)``: on CUDA a CUDA graph replayed per token); the first call
    per batch size compiles and is timed apart."""
    import generate_bench as gb

    device, model, _, (L, H, C, T, V, P, N, rounds) = generation_model(s)
    rows = []
    for b in s["gen_batches"]:
        first = gb.run(model, b, True, P, N, compile=True)  # compiles at the timed cache length (and records the graph)
        secs = [gb.run(model, b, True, P, N, compile=True) for _ in range(rounds)]
        med = statistics.median(secs)
        rows.append({"model": "lmcore Decoder, compiled decode step", "batch": b, "kv_cache": True,
                     "first_call_seconds": round(first, 2), "seconds_median": round(med, 4),
                     "generated_tokens_per_second": round(b * N / med, 1), "ms_per_step": round(1000 * med / N, 3),
                     **memory(device)})
        log(f"  lmcore batch {b}, compiled: {b * N / med:,.0f} tokens/s, {1000 * med / N:.2f} ms/step "
            f"(first call, compiling: {first:.1f} s)")
    return {"shape": f"{L}x{H}x{C}", "context": T, "vocab": V, "dtype": "bfloat16 weights",
            "prompt_tokens": P, "new_tokens": N, "rounds": rounds, "sampling": "temperature 0.8, top-k 50",
            "lmcore": rows}


# ---------------------------------------------------------------------------------------------
# the driver


def worker(step: str, dry: bool, out: Path, batch: int | None) -> int:
    """Run one step in this process and write its row to ``out``."""
    s = settings(dry)
    if batch:
        s["batch"] = batch
    import torch

    if dry:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    try:
        if step.startswith("train_"):
            _, which, mode = step.split("_")
            row = train(s, which, mode == "compile")
        elif step == "generate":
            row = generation(s)
        elif step == "generate_compiled":
            row = generation_compiled(s)
        else:
            raise ValueError(f"unknown step {step}")
        row["status"] = "ok"
    except Exception as e:  # noqa: BLE001 (any failure is recorded; the other steps still run)
        if step.startswith("train_") and "out of memory" in str(e).lower() and s["batch"] > 1:
            row = {"status": "failed", "error": f"{type(e).__name__}: {e}", "hint": "out of memory at batch "
                   f"{s['batch']}: rerun with --batch {s['batch'] // 2}"}
        else:
            row = {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
        log(f"  FAILED: {row['error']}")
    out.write_text(json.dumps(row, indent=2, default=str))
    return 0 if row["status"] == "ok" else 1


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers, side by side."""
    steps = results["steps"]
    out: dict[str, Any] = {}
    t = steps.get("tests", {})
    out["tests"] = f"{t.get('status')}: {t.get('summary', '')}".strip()
    table = []
    for which in ("lmcore", "llama"):
        for mode in ("eager", "compile"):
            r = steps.get(f"train_{which}_{mode}", {})
            table.append({"model": which, "compile": mode == "compile", "status": r.get("status"),
                          "tokens_per_second": r.get("tokens_per_second"), "mfu": r.get("mfu"),
                          "first_step_s": r.get("first_step_s"),
                          "max_memory_allocated_gib": r.get("max_memory_allocated_gib")})
    out["train"] = table
    for mode in ("eager", "compile"):
        a, b = steps.get(f"train_lmcore_{mode}", {}), steps.get(f"train_llama_{mode}", {})
        if a.get("tokens_per_second") and b.get("tokens_per_second"):
            out[f"lmcore_vs_llama_{mode}"] = round(a["tokens_per_second"] / b["tokens_per_second"], 3)
    for which in ("lmcore", "llama"):
        a, b = steps.get(f"train_{which}_eager", {}), steps.get(f"train_{which}_compile", {})
        if a.get("tokens_per_second") and b.get("tokens_per_second"):
            out[f"{which}_compile_speedup"] = round(b["tokens_per_second"] / a["tokens_per_second"], 3)
            out[f"{which}_compile_first_loss_delta"] = abs(a["loss_first"] - b["loss_first"])
    g = steps.get("generate", {})
    if isinstance(g.get("lmcore"), list):
        out["generate"] = [{k: r[k] for k in ("batch", "kv_cache", "generated_tokens_per_second", "ms_per_step")}
                           for r in g["lmcore"]]
    c = steps.get("generate_compiled", {})
    if isinstance(c.get("lmcore"), list):
        out["generate_compiled"] = [{k: r[k] for k in ("batch", "first_call_seconds", "generated_tokens_per_second",
                                                        "ms_per_step")} for r in c["lmcore"]]
    return out


def print_summary(results: dict[str, Any]) -> None:
    m, sm = results["machine"], results["summary"]
    log("\n== summary ==")
    log(f"machine: {m.get('gpu', m.get('cpu'))}; torch {m['torch']} (CUDA {m['torch_cuda']}); commit {m['git_commit']}; "
        f"{'DRY RUN on the CPU' if results['dry_run'] else ''}")
    log(f"tests: {sm['tests']}")
    log("| model | compile | tokens/s | MFU | first step s | peak GiB | status |")
    log("|---|---|---|---|---|---|---|")
    for r in sm["train"]:
        tps = f"{r['tokens_per_second']:,.0f}" if r["tokens_per_second"] else "-"
        mf = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        log(f"| {r['model']} | {'yes' if r['compile'] else 'no'} | {tps} | {mf} | {r['first_step_s'] or '-'} | "
            f"{r['max_memory_allocated_gib'] if r['max_memory_allocated_gib'] is not None else '-'} | {r['status']} |")
    for r in sm.get("generate", []):
        log(f"generate batch {r['batch']}, cache {'on ' if r['kv_cache'] else 'off'}: "
            f"{r['generated_tokens_per_second']:,.0f} tokens/s ({r['ms_per_step']} ms/step)")
    for r in sm.get("generate_compiled", []):
        log(f"generate batch {r['batch']}, compiled : {r['generated_tokens_per_second']:,.0f} tokens/s "
            f"({r['ms_per_step']} ms/step; first call {r['first_call_seconds']} s)")
    log(f"total {results['total_seconds']:.0f} s (budget {results['total_budget_s']} s)")


def write(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, default=str) + "\n")
    tmp.replace(path)


def default_out() -> Path:
    out = os.environ.get("OUT")
    return Path(out) / "gpu_check.json" if out else ROOT / "runs" / "gpu_check.json"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="every step on the CPU at a tiny shape "
                    "(also LMCORE_GPU_CHECK_DRY=1)")
    ap.add_argument("--out", type=Path, help="the JSON file (default $OUT/gpu_check.json, else runs/gpu_check.json)")
    ap.add_argument("--only", help="comma-separated steps to run (default all: "
                    + ", ".join(s for s, _, _ in STEPS) + ")")
    ap.add_argument("--batch", type=int, help="training sequences per step (default 16; dry run 2)")
    ap.add_argument("--budget", type=float, help=f"seconds for the whole run (default {TOTAL_BUDGET_S}; "
                    f"dry run {DRY_BUDGET_S}); each step also has its own (STEPS)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    dry = args.dry_run or os.environ.get("LMCORE_GPU_CHECK_DRY", "") not in ("", "0")
    if args.worker:
        return worker(args.worker, dry, args.worker_out, args.batch)

    t_start = time.perf_counter()
    args.budget = args.budget or (DRY_BUDGET_S if dry else TOTAL_BUDGET_S)
    deadline = t_start + args.budget
    out = args.out or default_out()
    s = settings(dry)
    if args.batch:
        s["batch"] = args.batch
    import torch

    info = machine_info(s["device"])
    results: dict[str, Any] = {"schema": SCHEMA, "dry_run": dry, "machine": info, "settings": s,
                               "total_budget_s": args.budget, "steps": {}, "summary": {}, "total_seconds": 0.0}
    log(f"lmcore GPU check{' (DRY RUN: every step on the CPU at a tiny shape)' if dry else ''}; results -> {out}")
    log(f"python {sys.executable}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"device {info.get('gpu', 'none')}; commit {info['git_commit']}")
    if not dry and not torch.cuda.is_available():
        results["error"] = "no CUDA device visible to torch (a CPU build, or no GPU): nothing to measure; " \
                           "use --dry-run to check the steps on the CPU"
        write(out, results)
        log("ERROR: " + results["error"])
        return 2
    if not dry:
        peak = peak_of(torch.device("cuda"), False)
        info["peak_bf16_tflops"], info["peak_source"] = round(peak.flops / 1e12, 2), peak.source
        log(f"bf16 peak {peak.flops / 1e12:.1f} TFLOP/s ({peak.source}, {peak.device_name})")
    write(out, results)

    only = set(args.only.split(",")) if args.only else None
    chosen = [(name, dry_b if dry else gpu_b) for name, gpu_b, dry_b in STEPS if only is None or name in only]
    if only and (unknown := only - {n for n, _, _ in STEPS}):
        log(f"unknown steps: {', '.join(sorted(unknown))}")
        return 2
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    failed = False
    for i, (name, budget) in enumerate(chosen, 1):
        left = deadline - time.perf_counter()
        budget = min(budget, left - 3)
        log(f"\n== [{i}/{len(chosen)}] {name} (budget {budget:.0f} s, {left:.0f} s left of the run) ==")
        if budget < 5:
            results["steps"][name] = {"status": "not_run", "reason": "the run's time budget is spent"}
            log("  not run: the run's time budget is spent")
            failed = True
            continue
        t0 = time.perf_counter()
        if name == "tests":
            try:
                import pytest  # noqa: F401
                row = run_tests(s, budget)
            except ImportError:
                row = {"status": "not_run", "reason": "pytest is not installed in this Python"}
        else:
            part = Path(tempfile.mkdtemp(prefix="gpu_check_")) / f"{name}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--worker-out", str(part)]
            if dry:
                cmd.append("--dry-run")
            if args.batch:
                cmd += ["--batch", str(args.batch)]
            try:
                subprocess.run(cmd, cwd=ROOT, env=env, timeout=budget, check=False)
                row = json.loads(part.read_text()) if part.exists() else {"status": "failed",
                                                                          "error": "the worker wrote nothing"}
            except subprocess.TimeoutExpired:
                row = {"status": "timeout", "reason": f"stopped after its budget of {budget:.0f} s"}
                log(f"  TIMEOUT after {budget:.0f} s")
        row["seconds"] = round(time.perf_counter() - t0, 1)
        row["budget_s"] = round(budget, 1)
        failed |= row.get("status") != "ok"
        results["steps"][name] = row
        results["total_seconds"] = round(time.perf_counter() - t_start, 1)
        results["summary"] = summary(results)
        write(out, results)
        log(f"  -> {row.get('status')} in {row['seconds']:.0f} s")
    results["total_seconds"] = round(time.perf_counter() - t_start, 1)
    results["summary"] = summary(results)
    results["status"] = "failed" if failed else "ok"
    write(out, results)
    print_summary(results)
    log(f"\nwrote {out} (status {results['status']})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
