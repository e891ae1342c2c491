"""Stage ``pretrain``: train the decoder on the token files with Accelerate.

Accelerate decides devices, processes and precision (``accelerate launch`` in ``dvc.yaml``; a
plain ``python`` run is one process). Training windows are drawn by a generator seeded from
``(seed, step, micro-step, rank)`` alone, so the order does not depend on global RNG state and a
resumed run sees exactly the windows it would have seen. The loss of an optimizer step is
normalised by the number of target tokens of the whole accumulated batch.

Outputs in ``out``: ``final/`` (``model.safetensors`` + ``config.json``) and ``state/``
(Accelerate state: model, optimizer, scheduler, RNG; plus ``trainer.json`` with the step), from
which a run with the same params resumes by itself.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmcore.accel import make_accelerator
from lmcore.checkpoint import save_gpt
from lmcore.config import ModelConfig, PretrainConfig, TrackingConfig, flatten
from lmcore.encode import load_manifest, load_tokens
from lmcore.io import StageError, atomic_path, write_json
from lmcore.model import GPT, GPTConfig


def gpt_config(model: ModelConfig, vocab_size: int) -> GPTConfig:
    return GPTConfig(vocab_size=vocab_size, **model.model_dump())


# ---------------------------------------------------------------------------------------------
# data


def train_batch(tokens: np.ndarray, batch: int, block: int, seed: int, step: int, micro: int, rank: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of random windows, a pure function of (seed, step, micro, rank)."""
    if len(tokens) <= block + 1:
        raise StageError(f"training split has {len(tokens)} tokens: fewer than block_size+2 ({block + 2})")
    rng = np.random.default_rng([seed, step, micro, rank])
    starts = rng.integers(0, len(tokens) - block - 1, size=batch)
    x = np.stack([tokens[s : s + block + 1] for s in starts]).astype(np.int64)
    t = torch.from_numpy(x)
    return t[:, :-1], t[:, 1:]


def fixed_windows(tokens: np.ndarray, count: int, block: int) -> torch.Tensor:
    """``count`` windows of ``block + 1`` tokens spread evenly over ``tokens`` (the same every
    time, so validation losses are comparable across steps)."""
    n = len(tokens) - block - 1
    if n < 0:
        raise StageError(f"validation split has {len(tokens)} tokens: fewer than block_size+1 ({block + 1})")
    starts = np.linspace(0, n, num=count).astype(np.int64)
    return torch.from_numpy(np.stack([tokens[s : s + block + 1] for s in starts]).astype(np.int64))


# ---------------------------------------------------------------------------------------------
# optimisation


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on 2-D matrices, none on norms and the (tied) embedding."""
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PretrainResult:
    model_dir: Path
    state_dir: Path
    steps: int
    final_train_loss: float
    val_loss: float
    val_bpb: float
    tokens_per_second: float


def _config_hash(cfg: PretrainConfig, manifest: dict[str, Any]) -> str:
    data = json.dumps([cfg.model_dump(), manifest["tokenizer_sha256"], manifest["splits"]["train"]], sort_keys=True)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


@torch.no_grad()
def evaluate_windows(model: torch.nn.Module, windows: torch.Tensor, batch: int, accelerator) -> float:
    """Mean next-token loss (nats) over fixed windows."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        w = windows[i : i + batch].to(accelerator.device)
        with accelerator.autocast():
            _, loss = model(w[:, :-1], w[:, 1:], reduction="sum")
        total += float(loss)
        count += w[:, 1:].numel()
    model.train()
    return total / count


def pretrain(cfg: PretrainConfig, tokens_dir: Path, out: Path, metrics: Path, plots: Path | None = None,
             tracking: TrackingConfig = TrackingConfig()) -> PretrainResult:
    from tqdm import tqdm

    from lmcore.tracking import stage_run

    out = Path(out)
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
    gcfg = gpt_config(cfg.model, manifest["vocab_size"])
    model = GPT(gcfg)
    try:
        optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                      betas=(cfg.beta1, cfg.beta2), fused=True)
    except (RuntimeError, TypeError):
        optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio))
    # the scheduler is stepped by hand once per optimizer step: Accelerate's wrapper would step
    # it once per process (it assumes its own data loader); it is still saved in the state
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    raw_model = accelerator.unwrap_model(model)

    state_dir = out / "state"
    cfg_hash = _config_hash(cfg, manifest)
    start_step = 0
    trainer_file = state_dir / "trainer.json"
    if trainer_file.exists():
        saved = json.loads(trainer_file.read_text())
        if saved.get("config_hash") == cfg_hash and saved.get("step", 0) < cfg.max_steps:
            accelerator.load_state(str(state_dir))
            start_step = int(saved["step"])
            accelerator.print(f"resuming from step {start_step} ({state_dir})")

    val_windows = fixed_windows(val_tokens, cfg.eval_batches * cfg.batch_size, gcfg.block_size)
    tokens_per_step = cfg.batch_size * gcfg.block_size * cfg.grad_accum * world
    history: list[dict[str, float]] = []
    params = {**flatten(cfg, "pretrain."), "n_params": raw_model.num_params(),
              "flops_per_token": raw_model.flops_per_token(), "num_processes": world}
    accelerator.print(f"model: {raw_model.num_params() / 1e6:.2f}M parameters, "
                      f"{raw_model.flops_per_token() / 1e6:.1f} MFLOPs/token, {world} process(es)")

    with stage_run("pretrain", tracking, params, active=accelerator.is_main_process) as tr:
        model.train()
        loss_val = float("nan")
        nonfinite = 0
        t_last, tok_last = time.perf_counter(), 0
        t_start = time.perf_counter()
        val_loss = float("nan")
        bar = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps,
                   desc="pretrain", disable=not accelerator.is_local_main_process, mininterval=2)
        for step in bar:
            loss_sum = 0.0
            for micro in range(cfg.grad_accum):
                x, y = train_batch(train_tokens, cfg.batch_size, gcfg.block_size, cfg.seed, step, micro, rank)
                x, y = x.to(accelerator.device), y.to(accelerator.device)
                sync = contextlib.nullcontext() if micro == cfg.grad_accum - 1 else accelerator.no_sync(model)
                with sync:
                    _, loss = model(x, y, reduction="sum")
                    loss = loss / (y.numel() * cfg.grad_accum)  # normalised by the accumulated target tokens
                    accelerator.backward(loss)
                loss_sum += float(loss.detach())
            grad_norm = float("nan")
            if cfg.grad_clip > 0:
                grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            if math.isfinite(loss_sum) and (cfg.grad_clip == 0 or math.isfinite(grad_norm)):
                optimizer.step()
                nonfinite = 0
            else:
                nonfinite += 1
                if nonfinite >= 5:
                    raise StageError(f"loss was not finite for {nonfinite} steps in a row at step {step}: "
                                     "lower pretrain.lr or use pretrain.mixed_precision: 'no'")
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            # the mean over processes (each computed the loss of its own windows)
            loss_val = float(accelerator.reduce(torch.tensor(loss_sum, device=accelerator.device), "mean")) \
                if world > 1 else loss_sum
            done = step + 1
            tok_last += tokens_per_step
            if done % cfg.log_interval == 0 or done == cfg.max_steps:
                now = time.perf_counter()
                tps = tok_last / max(now - t_last, 1e-9)
                t_last, tok_last = now, 0
                row = {"train_loss": loss_val, "lr": scheduler.get_last_lr()[0], "tokens_per_second": tps}
                if cfg.grad_clip > 0:
                    row["grad_norm"] = grad_norm
                tr.metrics(row, step=done)
                bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{tps:,.0f}")
                history.append({"step": done, **row})
            if done % cfg.eval_interval == 0 or done == cfg.max_steps:
                val_loss = evaluate_windows(model, val_windows, cfg.batch_size, accelerator)
                val_bpb = val_loss / math.log(2) * tokens_per_byte
                tr.metrics({"val_loss": val_loss, "val_bpb": val_bpb}, step=done)
                history.append({"step": done, "val_loss": val_loss, "val_bpb": val_bpb})
                accelerator.print(f"step {done}: train loss {loss_val:.4f}, val loss {val_loss:.4f}, val bpb {val_bpb:.4f}")
                t_last = time.perf_counter()  # throughput counts training time only
        elapsed = time.perf_counter() - t_start
        trained_tokens = (cfg.max_steps - start_step) * tokens_per_step
        tps_total = trained_tokens / max(elapsed, 1e-9)

        accelerator.wait_for_everyone()
        # resumable state first, then the final weights
        _save_state(accelerator, state_dir, {"step": cfg.max_steps, "config_hash": cfg_hash})
        result_dir = out / "final"
        if accelerator.is_main_process:
            save_gpt(raw_model, result_dir, {"tokenizer_sha256": manifest["tokenizer_sha256"], "steps": cfg.max_steps})
            val_bpb = val_loss / math.log(2) * tokens_per_byte
            m = {"train_loss": loss_val, "val_loss": val_loss, "val_bpb": val_bpb, "val_perplexity": math.exp(val_loss),
                 "tokens_per_second": tps_total, "train_seconds": elapsed, "n_params": raw_model.num_params(),
                 "trained_tokens": trained_tokens}
            write_json(metrics, m)
            tr.metrics({"tokens_per_second_mean": tps_total, "train_seconds": elapsed})
            if plots is not None:
                _write_history(Path(plots), history)
                tr.artifact(plots, "plots")
            tr.artifact(result_dir, "model")
        accelerator.wait_for_everyone()
        return PretrainResult(result_dir, state_dir, cfg.max_steps, loss_val, val_loss,
                              val_loss / math.log(2) * tokens_per_byte, tps_total)


def _save_state(accelerator, state_dir: Path, trainer: dict[str, Any]) -> None:
    """Save the Accelerate state of every process into a temporary folder, then rename it onto
    ``state_dir`` (so a kill mid-save leaves the previous state intact)."""
    tmp = state_dir.with_name(f".{state_dir.name}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer.json").write_text(json.dumps(trainer))
        old = state_dir.with_name(f".{state_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if state_dir.exists():
            state_dir.rename(old)
        tmp.rename(state_dir)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _write_history(path: Path, history: list[dict[str, float]]) -> None:
    keys = ["step", "train_loss", "val_loss", "val_bpb", "lr", "tokens_per_second", "grad_norm"]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for row in history:
            w.writerow({k: row.get(k, "") for k in keys})
