"""Stage ``pretrain``: train the decoder on the token shards with Accelerate.

Accelerate decides devices, processes and precision (``accelerate launch`` in ``dvc.yaml``; a
plain ``python`` run is one process). The model knows nothing of it.

:func:`pretrain` is orchestration of the training parts of :mod:`lmcore.train`:

- data (:mod:`~lmcore.train.sampler`): a seeded, resumable order of windows of the training
  tokens; one step takes ``processes x grad_accum x batch_size`` of them, so one process with
  twice the accumulation sees exactly the windows two processes see together;
- optimizers and schedules (:mod:`~lmcore.train.optim`, :mod:`~lmcore.train.schedule`);
- the step (:mod:`~lmcore.train.step`): the loss of a step is the summed token losses divided by
  the number of target tokens of the whole step (all micro-batches, all processes); clipping;
  non-finite steps skipped, ``max_nonfinite`` in a row stop the run;
- validation on fixed windows (:mod:`~lmcore.train.validate`);
- checkpoints (:mod:`~lmcore.train.checkpoint`, ``out/checkpoints/step-NNNNNN``): every
  ``checkpoint_interval`` steps, at the end, and when SIGTERM or SIGINT arrives; the last
  ``keep_checkpoints`` and the best by validation loss are kept. A run with the same settings
  resumes from the newest checkpoint by itself, bitwise identically.

Outputs: ``out/final`` (``model.safetensors`` + ``config.json``) and ``out/checkpoints``.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from lmcore.config import ModelConfig, PretrainConfig, TrackingConfig, flatten
from lmcore.core.errors import Interrupted
from lmcore.core.imports import closure_fingerprint
from lmcore.core.io import atomic_path, write_json
from lmcore.core.machine import require_cxx_compiler, tune_malloc
from lmcore.data.encode import load_manifest, load_tokens
from lmcore.model.decoder import Decoder, DecoderConfig
from lmcore.model.folder import save_decoder
from lmcore.tracking import stage_run
from lmcore.train.accel import choose_attention, make_accelerator
from lmcore.train.checkpoint import StepLayout, config_hash, resume, save_checkpoint, stop_requested, stop_signals
from lmcore.train.flops import Peak, dtype_of, mfu, peak_flops
from lmcore.train.optim import build_optimizers
from lmcore.train.sampler import WindowSampler, fixed_windows, micro_batches
from lmcore.train.schedule import lr_factor, schedulers
from lmcore.train.step import TrainState, train_step
from lmcore.train.validate import bits_per_byte, validate

log = logging.getLogger(__name__)

NONFINITE_HINT = "lower pretrain.lr, raise pretrain.warmup_steps or use pretrain.mixed_precision: 'no'"


def decoder_config(model: ModelConfig, vocab_size: int) -> DecoderConfig:
    return DecoderConfig(vocab_size=vocab_size, **model.shape())


@dataclasses.dataclass
class PretrainResult:
    model_dir: Path
    checkpoint: Path
    steps: int
    resumed_from: int
    final_train_loss: float
    val_loss: float
    val_bpb: float
    tokens_per_second: float
    mfu: float
    skipped_steps: int


class Throughput:
    """Training tokens per second between log lines: the tokens of the steps since the last line
    over the seconds those steps took, so that validation and checkpoints between them count
    neither way."""

    def __init__(self) -> None:
        self.tokens, self.seconds = 0, 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self.tokens += tokens
        self.seconds += seconds

    def rate(self) -> float:
        tps = self.tokens / max(self.seconds, 1e-9)
        self.tokens, self.seconds = 0, 0.0
        return tps


def _final_peak(peak: Peak, history: list[dict[str, float]], fpt: float, world: int, accelerator) -> Peak:
    """The peak again if the model went faster than the "peak" (the probe ran on a busy machine;
    the cache keeps the higher value), so that this run's mean and later runs are right."""
    fastest = max((h["tokens_per_second"] for h in history if "tokens_per_second" in h), default=0.0)
    if peak.source == "measured" and fastest / world * fpt > peak.flops:
        peak = peak_flops(accelerator.device, dtype_of(accelerator.mixed_precision), refresh=True)
        log.info("peak probed again: %.0f GFLOP/s", peak.flops / 1e9)
    return peak


def _full_model(model, raw_model, gcfg: DecoderConfig, build_model, accelerator):
    """The model to save on the main process (under FSDP a full copy gathered by all processes)."""
    if accelerator.distributed_type.name != "FSDP":
        return raw_model
    full = accelerator.get_state_dict(model)  # every process takes part
    if not accelerator.is_main_process:
        return raw_model
    final_model = build_model(gcfg)
    final_model.load_state_dict(full)
    return final_model


def pretrain(cfg: PretrainConfig, tokens_dir: Path, out: Path, metrics: Path, plots: Path | None = None,
             tracking: TrackingConfig = TrackingConfig(),
             build_model: Callable[[DecoderConfig], torch.nn.Module] = Decoder) -> PretrainResult:
    """Train from ``tokens_dir`` into ``out`` (see the module docstring); write ``metrics``
    (JSON) and the history into the folder ``plots`` (:func:`write_history`). ``build_model`` makes the model from its shape
    (benchmarks pass other architectures with Decoder's interface: ``forward(idx, targets,
    reduction, return_logits)``, ``num_params``, ``matmul_params``, ``flops_per_token`` and a ``cfg``)."""
    out = Path(out)
    malloc = tune_malloc()  # before the first large tensor
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    manifest = load_manifest(tokens_dir)
    train_tokens = load_tokens(tokens_dir, "train")
    val_tokens = load_tokens(tokens_dir, "validation")
    val_info = manifest["splits"]["validation"]
    tokens_per_byte = val_info["tokens"] / max(val_info["bytes"], 1)

    accelerator = make_accelerator(cfg.mixed_precision)
    rank, world = accelerator.process_index, accelerator.num_processes
    torch.manual_seed(cfg.seed)
    gcfg = decoder_config(cfg.model, manifest["vocab_size"])
    model = build_model(gcfg)
    if world > 1:  # the same initial weights on every process, then dropout masks of each its own
        torch.manual_seed(cfg.seed * 1_000_003 + rank)  # not seed + rank: seed s's rank 1 would be seed s+1's rank 0
    kernel = choose_attention(model, accelerator, cfg.batch_size, gcfg.block_size, cfg.attention)
    n_params, fpt = model.num_params(), model.flops_per_token()
    optimizers = build_optimizers(model, cfg, accelerator.device)
    scheds = schedulers(optimizers, lambda s: lr_factor(s, cfg))
    if cfg.compile:
        require_cxx_compiler("pretrain.compile = true", accelerator.device)
        model.compile()  # in place: parameter names (and so checkpoints) stay the same
    # schedulers are stepped by hand once per optimizer step (Accelerate's wrapper assumes its
    # own data loader); their state goes to trainer.json, so resuming unpickles nothing of ours
    model, *optimizers = accelerator.prepare(model, *optimizers)
    raw_model = accelerator.unwrap_model(model)

    step_windows = world * cfg.grad_accum * cfg.batch_size
    sampler = WindowSampler(len(train_tokens), gcfg.block_size, cfg.seed)
    tokens_per_step = step_windows * gcfg.block_size
    peak = peak_flops(accelerator.device, dtype_of(accelerator.mixed_precision))  # "auto" resolved

    ckpt_dir = out / "checkpoints"
    chash = config_hash(cfg, manifest)
    step_layout = StepLayout(world, cfg.grad_accum, cfg.batch_size)
    state = TrainState()
    code = closure_fingerprint(__name__)  # the code of this stage (dvc.yaml's code deps of pretrain)
    saved = resume(accelerator, ckpt_dir, chash, sampler, scheds, step_layout, cfg.max_steps, code)
    # what `auto` chose on this machine: the settings hash holds "auto", and a run resumed on another
    # machine kind may continue in another precision or attention kernel (not bitwise the same)
    resolved = {"mixed_precision": accelerator.mixed_precision, "attention": kernel}
    if saved is not None:
        state.load(saved)
        if saved.get("resolved") not in (None, resolved):
            accelerator.print(f"resuming a run that trained with {saved['resolved']} as {resolved} on this machine "
                              "(pretrain.mixed_precision / pretrain.attention 'auto' chose differently): it goes on, "
                              "but not bitwise as the run would have; set them explicitly to keep them")
    start_step = state.step
    # a run keeps its id and its validation windows when it resumes (batch_size may change on a
    # resume that keeps the global batch: the best checkpoint compares losses on the same windows)
    run_id = saved.get("run") if saved is not None else uuid.uuid4().hex[:12]
    n_val = cfg.eval_batches * cfg.batch_size
    n_val = int(saved.get("val_windows", n_val)) if saved is not None else n_val
    val_windows = fixed_windows(val_tokens, n_val, gcfg.block_size)

    params = {**flatten(cfg, "pretrain."), "n_params": n_params, "flops_per_token": fpt,
              "num_processes": world, "peak_flops": peak.flops, "peak_source": peak.source,
              "resumed_from_step": start_step, "allocator": malloc,
              "attention_kernel": kernel}
    accelerator.print(
        f"model: {n_params / 1e6:.2f}M parameters, {fpt / 1e6:.1f} MFLOPs/token "
        f"(6 x {raw_model.matmul_params():,} matmul params + 12 x layers x width x context), {world} process(es); "
        f"peak {peak.flops / 1e9:.0f} GFLOP/s ({peak.source}, {peak.dtype}); allocator {malloc}; attention {kernel}")

    def trainer_state() -> dict[str, Any]:
        return {**state.to_dict(), "sampler": sampler.state_dict(), "config_hash": chash, "code": code,
                "run": run_id, "val_windows": n_val, "max_steps": cfg.max_steps, "resolved": resolved,
                "mlflow_run_id": tr.run_id,
                "layout": dataclasses.asdict(step_layout), "schedulers": [sched.state_dict() for sched in scheds]}

    def validate_now() -> float:
        row = validate(model, val_windows, cfg.batch_size, accelerator, state, tokens_per_byte)
        tr.metrics({"val_loss": row["val_loss"], "val_bpb": row["val_bpb"]}, step=state.step)
        accelerator.print(f"step {state.step}: train loss {loss_val:.4f}, val loss {row['val_loss']:.4f}, "
                          f"val bpb {row['val_bpb']:.4f}", flush=True)
        return row["val_loss"]

    loss_val, val_loss = float("nan"), float("nan")
    with stage_run("pretrain", tracking, params, active=accelerator.is_main_process,
                   inputs=[tokens_dir], outputs=[Path(out) / "final"],
                   resume=saved.get("mlflow_run_id") if saved else None, system_metrics=True) as tr, stop_signals() as stop:
        model.train()
        speed = Throughput()
        bar = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps,
                   desc="pretrain", disable=not accelerator.is_local_main_process, mininterval=2)
        for _ in bar:
            t0 = time.perf_counter()
            batches = micro_batches(sampler.next_step(train_tokens, step_windows), cfg.batch_size, cfg.grad_accum, rank)
            res = train_step(model, optimizers, batches, accelerator, state, grad_clip=cfg.grad_clip,
                             max_nonfinite=cfg.max_nonfinite, hint=NONFINITE_HINT)
            loss_val = res.loss
            # the rates this step used: AdamW's (the last optimizer: pretrain.lr), and Muon's if it runs
            lr, muon_lr = scheds[-1].get_last_lr()[0], scheds[0].get_last_lr()[0] if len(scheds) > 1 else None
            for s in scheds:
                s.step()
            done = state.step
            seconds = time.perf_counter() - t0
            state.train_seconds += seconds
            speed.add(tokens_per_step, seconds)
            if done % cfg.log_interval == 0 or done == cfg.max_steps:
                tps = speed.rate()
                row = {"train_loss": loss_val, "lr": lr, "tokens_per_second": tps,
                       "mfu": mfu(tps, fpt, peak) if world == 1 else mfu(tps / world, fpt, peak),
                       "skipped_steps": state.skipped_steps}
                row["grad_norm"] = res.grad_norm
                if muon_lr is not None:
                    row["muon_lr"] = muon_lr
                tr.metrics(row, step=done)
                bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{tps:,.0f}", mfu=f"{row['mfu']:.0%}")
                state.history.append({"step": done, **row})
            evaluated = done % cfg.eval_interval == 0 or done == cfg.max_steps
            checkpoint = done % cfg.checkpoint_interval == 0 or done == cfg.max_steps
            signum = stop_requested(stop, accelerator)  # from any process: all stop at this step
            if evaluated or checkpoint:  # checkpoints carry their validation loss (to keep the best)
                val_loss = validate_now()
            if checkpoint:
                state.checkpointed(val_loss)
            if checkpoint or signum:
                save_checkpoint(accelerator, ckpt_dir, done, trainer_state(), cfg.keep_checkpoints)
            if signum:
                bar.close()
                raise Interrupted(signum, f"stopped by {signal.Signals(signum).name} at step {done}; "
                                  f"checkpoint saved in {ckpt_dir / f'step-{done:06d}'}, run again to resume")
        bar.close()
        if not math.isfinite(val_loss):  # resumed at the last step: nothing left to train
            # the validation of that step, as recorded (validating again would add a second row)
            last = next((h for h in reversed(state.history) if "val_loss" in h), None)
            val_loss = last["val_loss"] if last is not None and last["step"] == state.step else validate_now()
        trained_tokens = cfg.max_steps * tokens_per_step
        tps_total = trained_tokens / max(state.train_seconds, 1e-9)
        peak = _final_peak(peak, state.history, fpt, world, accelerator)
        run_mfu = mfu(tps_total / world, fpt, peak)
        val_bpb = bits_per_byte(val_loss, tokens_per_byte)
        result_dir = out / "final"
        final_model = _full_model(model, raw_model, gcfg, build_model, accelerator)
        # the last logged training loss (a run resumed at its end trains no step of its own)
        train_loss = next((h["train_loss"] for h in reversed(state.history) if "train_loss" in h), loss_val)
        if accelerator.is_main_process:
            extra = {"tokenizer_sha256": manifest["tokenizer_sha256"], "steps": cfg.max_steps}
            save_decoder(final_model, result_dir, extra)
            m = {"train_loss": train_loss, "val_loss": val_loss, "val_bpb": val_bpb,
                 "val_perplexity": math.exp(val_loss), "best_val_loss": state.best_val_loss,
                 "best_step": state.best_step, "tokens_per_second": tps_total, "mfu": run_mfu,
                 "train_seconds": state.train_seconds, "n_params": n_params, "flops_per_token": fpt,
                 "trained_tokens": trained_tokens, "skipped_steps": state.skipped_steps}
            write_json(metrics, m)
            if plots is not None:
                for path in write_history(Path(plots), state.history):
                    tr.artifact(path, "plots")
            reg = tracking.registry
            # the model's numbers at its last step (val_loss and val_bpb repeat that step's point);
            # the per-step curves (train_loss, lr, ...) stay the run's alone
            final = {k: m[k] for k in ("val_loss", "val_bpb", "val_perplexity", "best_val_loss", "best_step",
                                       "n_params", "trained_tokens", "train_seconds")}
            final |= {"tokens_per_second_mean": tps_total, "mfu_mean": run_mfu}
            tr.model(result_dir, f"{reg.prefix}-base", final, reg.base_metric, "minimize", step=cfg.max_steps)
        accelerator.wait_for_everyone()
        return PretrainResult(result_dir, ckpt_dir / f"step-{cfg.max_steps:06d}", cfg.max_steps, start_step,
                              train_loss, val_loss, val_bpb, tps_total, run_mfu, state.skipped_steps)


# the history as two tables without empty cells (DVC's plots read an empty cell as 0): one row per
# log_interval (training) and one per eval_interval (validation)
HISTORY_FILES = {"pretrain_train.csv": ["step", "train_loss", "lr", "grad_norm", "tokens_per_second", "mfu"],
                 "pretrain_val.csv": ["step", "val_loss", "val_bpb"]}


def write_history(folder: Path, history: list[dict[str, float]]) -> list[Path]:
    """Write the history's training and validation rows into ``folder`` (:data:`HISTORY_FILES`)."""
    written = []
    for name, keys in HISTORY_FILES.items():
        path = Path(folder) / name
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            for row in history:
                if keys[1] in row:
                    w.writerow({k: row.get(k, "") for k in keys})
        written.append(path)
    return written


def read_history(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """The history :func:`write_history` wrote, as ``{column: [(step, value)]}`` (files that are
    missing are left out)."""
    series: dict[str, list[tuple[int, float]]] = {}
    for name in HISTORY_FILES:
        if not (Path(folder) / name).exists():
            continue
        with open(Path(folder) / name, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                step = int(float(row["step"]))
                for k, v in row.items():
                    if k != "step" and v not in ("", None):
                        series.setdefault(k, []).append((step, float(v)))
    return series
