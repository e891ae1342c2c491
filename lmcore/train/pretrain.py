"""Stage ``pretrain``: train the decoder on the token shards with Accelerate.

Accelerate decides devices, processes and precision (``accelerate launch`` in ``dvc.yaml``; a
plain ``python`` run is one process). The model knows nothing of it.

Data: :class:`WindowSampler` cuts the training tokens into windows of ``block_size + 1`` tokens
and visits them in a seeded order, epoch after epoch; its only state is a position counter. One
optimizer step takes the next ``processes x grad_accum x batch_size`` windows, and process ``r``
trains on micro-batches ``r * grad_accum ... (r + 1) * grad_accum - 1`` of them, so one process
with twice the accumulation sees exactly the windows two processes see together.

Loss: the gradient of a step is that of the summed token losses divided by the number of target
tokens of the whole step (all micro-batches, all processes), not a mean of per-micro-batch means.

Checkpoints (``out/checkpoints/step-NNNNNN``): every ``checkpoint_interval`` steps, at the end,
and when SIGTERM or SIGINT arrives; each holds the Accelerate state (model as safetensors,
optimizer, RNG of every process, all loaded with ``weights_only=True``) and ``trainer.json``
(step, sampler position, learning-rate schedulers, loss history, a hash of the settings). They are written to a temporary folder and renamed; the last
``keep_checkpoints`` and the one with the best validation loss are kept. A run with the same
settings resumes from the newest checkpoint by itself, bitwise identically.

Outputs: ``out/final`` (``model.safetensors`` + ``config.json``) and ``out/checkpoints``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import logging
import math
import re
import shutil
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from lmcore.config import ModelConfig, PretrainConfig, TrackingConfig, flatten
from lmcore.core.errors import Interrupted, StageError
from lmcore.core.io import atomic_path, write_json
from lmcore.data.encode import load_manifest, load_tokens
from lmcore.model.decoder import GPT, GPTConfig
from lmcore.model.folder import save_gpt
from lmcore.tracking import stage_run
from lmcore.train.accel import make_accelerator
from lmcore.train.flops import dtype_of, mfu, peak_flops

log = logging.getLogger(__name__)


def gpt_config(model: ModelConfig, vocab_size: int) -> GPTConfig:
    return GPTConfig(vocab_size=vocab_size, **model.shape())


# ---------------------------------------------------------------------------------------------
# data


class WindowSampler:
    """A seeded, resumable order of training windows.

    Epoch ``e`` shifts all window starts by an offset drawn from ``(seed, e)`` and visits the
    ``n_windows`` non-overlapping windows in a permutation drawn from the same generator. The
    sampler's state is one integer, the number of windows handed out so far.
    """

    def __init__(self, n_tokens: int, block: int, seed: int, pos: int = 0) -> None:
        self.block, self.seed, self.pos = block, seed, pos
        self.n_windows = (n_tokens - block) // block
        if self.n_windows < 1:
            raise StageError(f"training split has {n_tokens} tokens: pretraining needs at least 2 x block_size "
                             f"({2 * block}); lower pretrain.model.block_size or add text")
        self._epoch: tuple[int, int, np.ndarray] | None = None

    def _order(self, epoch: int) -> tuple[int, np.ndarray]:
        if self._epoch is None or self._epoch[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            offset = int(rng.integers(0, self.block))
            self._epoch = (epoch, offset, rng.permutation(self.n_windows))
        return self._epoch[1], self._epoch[2]

    def starts(self, first: int, count: int) -> np.ndarray:
        """Token offsets of windows ``first ... first + count - 1`` of the endless sequence."""
        out = np.empty(count, dtype=np.int64)
        for i in range(count):
            epoch, k = divmod(first + i, self.n_windows)
            offset, order = self._order(epoch)
            out[i] = offset + int(order[k]) * self.block
        return out

    def next_step(self, tokens: np.ndarray, windows: int) -> np.ndarray:
        """The next ``windows`` windows as an array (windows, block + 1); advances the position."""
        starts = self.starts(self.pos, windows)
        self.pos += windows
        return np.stack([tokens[s : s + self.block + 1] for s in starts]).astype(np.int64)

    def state_dict(self) -> dict[str, int]:
        return {"pos": self.pos, "seed": self.seed, "n_windows": self.n_windows}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["n_windows"] != self.n_windows or state["seed"] != self.seed:
            raise StageError(f"checkpoint sampler {state} does not match this data ({self.n_windows} windows)")
        self.pos = int(state["pos"])


def micro_batches(step_windows: np.ndarray, batch: int, accum: int, rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This process's ``accum`` micro-batches (inputs, targets) of one step's windows."""
    out = []
    for m in range(accum):
        i = (rank * accum + m) * batch
        w = torch.from_numpy(step_windows[i : i + batch])
        out.append((w[:, :-1], w[:, 1:]))
    return out


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


def _is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    """2-D weights inside the transformer blocks (what Muon optimises)."""
    return p.dim() == 2 and name.startswith("blocks.")


def param_groups(named: Sequence[tuple[str, torch.nn.Parameter]], weight_decay: float,
                 decay_embeddings: bool = False) -> list[dict[str, Any]]:
    """Weight decay on 2-D matrices, none on norms; the (tied) embedding only by option."""
    decay, no_decay, seen = [], [], set()
    for name, p in named:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_embedding = "embed" in name or "lm_head" in name
        (decay if p.dim() >= 2 and (decay_embeddings or not is_embedding) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _adamw(groups: list[dict[str, Any]], cfg: PretrainConfig) -> torch.optim.Optimizer:
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    try:  # one fused kernel for all parameters where this torch has it for the device
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, **kwargs)


def build_optimizers(model: torch.nn.Module, cfg: PretrainConfig) -> list[torch.optim.Optimizer]:
    """AdamW for everything, or Muon for the blocks' 2-D weights plus AdamW for the rest."""
    named = list(model.named_parameters())
    if cfg.optimizer == "adamw":
        return [_adamw(param_groups(named, cfg.weight_decay, cfg.decay_embeddings), cfg)]
    hidden = [p for n, p in named if _is_hidden_matrix(n, p)]
    rest = [(n, p) for n, p in named if not _is_hidden_matrix(n, p)]
    muon = torch.optim.Muon(hidden, lr=cfg.muon_lr, momentum=cfg.muon_momentum, weight_decay=cfg.weight_decay)
    return [muon, _adamw(param_groups(rest, cfg.weight_decay, cfg.decay_embeddings), cfg)]


def lr_factor(step: int, cfg: PretrainConfig) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based).

    ``cosine``: linear warm-up to 1, then cosine decay to ``min_lr_ratio`` at ``max_steps``.
    ``wsd``: linear warm-up, 1 until the last ``decay_fraction`` of the steps, then linear decay
    to ``min_lr_ratio``.
    """
    warmup, total, floor = cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if cfg.schedule == "wsd":
        decay_start = max(warmup, total - round(cfg.decay_fraction * total))
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start + 1) / max(1, total - decay_start))
        return 1.0 - (1.0 - floor) * progress
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def accumulate(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], accelerator
               ) -> tuple[float, int]:
    """Forward and backward over this process's micro-batches of one step.

    Each micro-batch contributes ``sum of its token losses / N`` where N counts the target
    tokens (not -100) of the whole step on all processes; data-parallel averaging divides by the
    number of processes, so each process scales by it. The gradient is then exactly that of one
    big batch. Returns the step's mean token loss (over all processes) and N.
    """
    world = accelerator.num_processes
    local = sum(int((y != -100).sum()) for _, y in batches)
    total = local
    if world > 1:
        total = int(accelerator.reduce(torch.tensor(local, device=accelerator.device), "sum"))
    total = max(total, 1)
    loss_sum = torch.zeros((), device=accelerator.device)
    for i, (x, y) in enumerate(batches):
        x, y = x.to(accelerator.device), y.to(accelerator.device)
        sync = contextlib.nullcontext() if i == len(batches) - 1 else accelerator.no_sync(model)
        with sync:
            with accelerator.autocast():
                _, loss = model(x, y, reduction="sum")
            accelerator.backward(loss * (world / total))
        loss_sum += loss.detach().float()
    if world > 1:
        loss_sum = accelerator.reduce(loss_sum, "sum")
    return float(loss_sum) / total, total


@torch.no_grad()
def evaluate_windows(model: torch.nn.Module, windows: torch.Tensor, batch: int, accelerator) -> float:
    """Mean next-token loss (nats) over fixed windows, shared out over the processes."""
    model.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = windows[rank::world]
    sums = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    for i in range(0, len(mine), batch):
        w = mine[i : i + batch].to(accelerator.device)
        with accelerator.autocast():
            _, loss = model(w[:, :-1], w[:, 1:], reduction="sum")
        sums[0] += float(loss)
        sums[1] += w[:, 1:].numel()
    if world > 1:
        sums = accelerator.reduce(sums, "sum")
    model.train()
    return float(sums[0] / sums[1])


# ---------------------------------------------------------------------------------------------
# checkpoints

_CKPT = re.compile(r"^step-(\d{6,})$")
# settings that change what is computed; the others (logging, checkpointing, threads) may
# differ between a run and its resumption
_BOOKKEEPING = {"eval_interval", "log_interval", "checkpoint_interval", "keep_checkpoints", "max_nonfinite", "threads"}


def config_hash(cfg: PretrainConfig, manifest: dict[str, Any], world: int) -> str:
    data = json.dumps([cfg.model_dump(mode="json", exclude=_BOOKKEEPING), manifest["tokenizer_sha256"],
                       manifest["splits"]["train"], world], sort_keys=True)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def list_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``folder`` (those with ``trainer.json``), oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CKPT.match(p.name))]
    return sorted((s, p) for s, p in found if (p / "trainer.json").exists())


def save_checkpoint(accelerator, folder: Path, step: int, trainer: dict[str, Any], keep: int) -> Path:
    """Save the state of every process into ``folder/step-NNNNNN`` (via a temporary folder and
    a rename), then prune to the last ``keep`` plus the best (``trainer["best_step"]``)."""
    target = folder / f"step-{step:06d}"
    tmp = folder / f".step-{step:06d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer.json").write_text(json.dumps(trainer, indent=1))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        ckpts = list_checkpoints(folder)
        keep_steps = {s for s, _ in ckpts[-keep:]} | {trainer.get("best_step")}
        for s, p in ckpts:
            if s not in keep_steps:
                shutil.rmtree(p, ignore_errors=True)
    accelerator.wait_for_everyone()
    return target


@contextlib.contextmanager
def stop_signals() -> Iterator[dict[str, int]]:
    """Turn SIGTERM and SIGINT into a flag the training loop checks after each step."""
    flag = {"signum": 0}

    def handler(signum, _frame):
        flag["signum"] = signum

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread (e.g. a Prefect task runner thread)
            pass
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# ---------------------------------------------------------------------------------------------


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


def pretrain(cfg: PretrainConfig, tokens_dir: Path, out: Path, metrics: Path, plots: Path | None = None,
             tracking: TrackingConfig = TrackingConfig(),
             build_model: Callable[[GPTConfig], torch.nn.Module] = GPT) -> PretrainResult:
    """Train from ``tokens_dir`` into ``out`` (see the module docstring); write ``metrics``
    (JSON) and the loss history ``plots`` (CSV). ``build_model`` makes the model from its shape
    (benchmarks pass other architectures with GPT's interface: ``forward(idx, targets,
    reduction)``, ``num_params``, ``matmul_params``, ``flops_per_token`` and a ``cfg``)."""


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
    model = build_model(gcfg)
    n_params, fpt = model.num_params(), model.flops_per_token()
    optimizers = build_optimizers(model, cfg)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_factor(s, cfg)) for o in optimizers]
    if cfg.compile:
        model.compile()  # in place: parameter names (and so checkpoints) stay the same
    # schedulers are stepped by hand once per optimizer step (Accelerate's wrapper assumes its
    # own data loader); their state goes to trainer.json, so resuming unpickles nothing of ours
    model, *optimizers = accelerator.prepare(model, *optimizers)
    raw_model = accelerator.unwrap_model(model)

    step_windows = world * cfg.grad_accum * cfg.batch_size
    sampler = WindowSampler(len(train_tokens), gcfg.block_size, cfg.seed)
    val_windows = fixed_windows(val_tokens, cfg.eval_batches * cfg.batch_size, gcfg.block_size)
    tokens_per_step = step_windows * gcfg.block_size
    peak = peak_flops(accelerator.device, dtype_of(accelerator.mixed_precision))  # "auto" resolved

    # resume from the newest checkpoint of the same settings
    ckpt_dir = out / "checkpoints"
    chash = config_hash(cfg, manifest, world)
    state: dict[str, Any] = {"step": 0, "history": [], "best_val_loss": None, "best_step": None,
                             "train_seconds": 0.0, "skipped_steps": 0, "nonfinite_in_a_row": 0}
    ckpts = list_checkpoints(ckpt_dir)
    if ckpts:
        saved = json.loads((ckpts[-1][1] / "trainer.json").read_text())
        if saved.get("config_hash") == chash:
            accelerator.load_state(str(ckpts[-1][1]))
            sampler.load_state_dict(saved.pop("sampler"))
            for sched, sd in zip(schedulers, saved.pop("schedulers"), strict=True):
                sched.load_state_dict(sd)
            state.update(saved)
            accelerator.print(f"resuming from step {state['step']} ({ckpts[-1][1]})")
        else:
            accelerator.print(f"{ckpt_dir}: checkpoints of other settings ({saved.get('config_hash')} != {chash}); "
                              "starting afresh and replacing them")
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                shutil.rmtree(ckpt_dir)
    start_step = int(state["step"])
    history: list[dict[str, float]] = state["history"]

    params = {**flatten(cfg, "pretrain."), "n_params": n_params, "flops_per_token": fpt,
              "num_processes": world, "peak_flops": peak.flops, "peak_source": peak.source,
              "resumed_from_step": start_step}
    accelerator.print(
        f"model: {n_params / 1e6:.2f}M parameters, {fpt / 1e6:.1f} MFLOPs/token "
        f"(6 x {raw_model.matmul_params():,} matmul params + 12 x layers x width x context), {world} process(es); "
        f"peak {peak.flops / 1e9:.0f} GFLOP/s ({peak.source}, {peak.dtype})")

    def trainer_state(step: int) -> dict[str, Any]:
        return {**state, "step": step, "sampler": sampler.state_dict(), "config_hash": chash,
                "schedulers": [sched.state_dict() for sched in schedulers]}

    def validate(step: int) -> float:
        v = evaluate_windows(model, val_windows, cfg.batch_size, accelerator)
        bpb = v / math.log(2) * tokens_per_byte
        if state["best_val_loss"] is None or v < state["best_val_loss"]:
            state["best_val_loss"], state["best_step"] = v, step
        history.append({"step": step, "val_loss": v, "val_bpb": bpb})
        tr.metrics({"val_loss": v, "val_bpb": bpb}, step=step)
        accelerator.print(f"step {step}: train loss {loss_val:.4f}, val loss {v:.4f}, val bpb {bpb:.4f}", flush=True)
        return v

    loss_val, val_loss, step = float("nan"), float("nan"), start_step
    with stage_run("pretrain", tracking, params, active=accelerator.is_main_process) as tr, stop_signals() as stop:
        model.train()
        t_last, tok_last = time.perf_counter(), 0
        bar = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps,
                   desc="pretrain", disable=not accelerator.is_local_main_process, mininterval=2)
        for step in bar:
            t0 = time.perf_counter()
            batches = micro_batches(sampler.next_step(train_tokens, step_windows), cfg.batch_size, cfg.grad_accum, rank)
            loss_val, _ = accumulate(model, batches, accelerator)
            grad_norm = float("nan")
            if cfg.grad_clip > 0:
                grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            if math.isfinite(loss_val) and (cfg.grad_clip == 0 or math.isfinite(grad_norm)):
                for o in optimizers:
                    o.step()
                state["nonfinite_in_a_row"] = 0
            else:  # skip the update; every process sees the same reduced loss and norm
                state["skipped_steps"] += 1
                state["nonfinite_in_a_row"] += 1
                accelerator.print(f"step {step + 1}: loss {loss_val}, gradient norm {grad_norm}: update skipped")
                if state["nonfinite_in_a_row"] >= cfg.max_nonfinite:
                    raise StageError(
                        f"the loss or gradient was not finite for {state['nonfinite_in_a_row']} steps in a row "
                        f"(step {step + 1}): lower pretrain.lr, raise pretrain.warmup_steps or use "
                        "pretrain.mixed_precision: 'no'")
            for o in optimizers:
                o.zero_grad(set_to_none=True)
            for s in schedulers:
                s.step()
            done = step + 1
            state["train_seconds"] += time.perf_counter() - t0
            tok_last += tokens_per_step
            if done % cfg.log_interval == 0 or done == cfg.max_steps:
                now = time.perf_counter()
                tps = tok_last / max(now - t_last, 1e-9)
                t_last, tok_last = now, 0
                row = {"train_loss": loss_val, "lr": schedulers[0].get_last_lr()[0], "tokens_per_second": tps,
                       "mfu": mfu(tps, fpt, peak) if world == 1 else mfu(tps / world, fpt, peak),
                       "skipped_steps": state["skipped_steps"]}
                if cfg.grad_clip > 0:
                    row["grad_norm"] = grad_norm
                tr.metrics(row, step=done)
                bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{tps:,.0f}", mfu=f"{row['mfu']:.0%}")
                history.append({"step": done, **row})
            evaluated = done % cfg.eval_interval == 0 or done == cfg.max_steps
            checkpoint = done % cfg.checkpoint_interval == 0 or done == cfg.max_steps
            # a stop request from any process stops all of them at the same step
            signum = stop["signum"]
            if world > 1:
                signum = int(accelerator.reduce(torch.tensor(signum, device=accelerator.device), "max"))
            if evaluated or checkpoint:  # checkpoints carry their validation loss (to keep the best)
                val_loss = validate(done)
            if checkpoint or signum:
                save_checkpoint(accelerator, ckpt_dir, done, trainer_state(done), cfg.keep_checkpoints)
            if evaluated or checkpoint or signum:
                t_last = time.perf_counter()  # throughput counts training time only
            if signum:
                bar.close()
                raise Interrupted(signum, f"stopped by {signal.Signals(signum).name} at step {done}; "
                                  f"checkpoint saved in {ckpt_dir / f'step-{done:06d}'}, run again to resume")
        bar.close()
        if not math.isfinite(val_loss):  # resumed at the last step: nothing left to train
            val_loss = validate(cfg.max_steps)
        trained_tokens = cfg.max_steps * tokens_per_step
        tps_total = trained_tokens / max(state["train_seconds"], 1e-9)
        fastest = max((h["tokens_per_second"] for h in history if "tokens_per_second" in h), default=0.0)
        if peak.source == "measured" and fastest / world * fpt > peak.flops:
            # the model went faster than the "peak": the probe ran on a busy machine. Probe again
            # (the cache keeps the higher value) so that this run's mean and later runs are right.
            peak = peak_flops(accelerator.device, dtype_of(accelerator.mixed_precision), refresh=True)
            log.info("peak probed again: %.0f GFLOP/s", peak.flops / 1e9)
        run_mfu = mfu(tps_total / world, fpt, peak)
        val_bpb = val_loss / math.log(2) * tokens_per_byte
        result_dir = out / "final"
        last = ckpt_dir / f"step-{cfg.max_steps:06d}"
        final_model = raw_model
        if accelerator.distributed_type.name == "FSDP":  # parameters are sharded: gather a full copy
            full = accelerator.get_state_dict(model)  # every process takes part
            if accelerator.is_main_process:
                final_model = build_model(gcfg)
                final_model.load_state_dict(full)
        if accelerator.is_main_process:
            train_loss = next((h["train_loss"] for h in reversed(history) if "train_loss" in h), loss_val)
            save_gpt(final_model, result_dir, {"tokenizer_sha256": manifest["tokenizer_sha256"], "steps": cfg.max_steps})
            m = {"train_loss": train_loss, "val_loss": val_loss, "val_bpb": val_bpb,
                 "val_perplexity": math.exp(val_loss), "best_val_loss": state["best_val_loss"],
                 "best_step": state["best_step"], "tokens_per_second": tps_total, "mfu": run_mfu,
                 "train_seconds": state["train_seconds"], "n_params": n_params, "flops_per_token": fpt,
                 "trained_tokens": trained_tokens, "skipped_steps": state["skipped_steps"]}
            write_json(metrics, m)
            tr.metrics({"tokens_per_second_mean": tps_total, "mfu_mean": run_mfu, "train_seconds": state["train_seconds"]})
            if plots is not None:
                write_history(Path(plots), history)
                tr.artifact(plots, "plots")
            tr.artifact(result_dir, "model")
        accelerator.wait_for_everyone()
        return PretrainResult(result_dir, last, cfg.max_steps, start_step, loss_val, val_loss, val_bpb, tps_total,
                              run_mfu, state["skipped_steps"])


HISTORY_KEYS = ["step", "train_loss", "val_loss", "val_bpb", "lr", "grad_norm", "tokens_per_second", "mfu"]


def write_history(path: Path, history: list[dict[str, float]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=HISTORY_KEYS)
        w.writeheader()
        for row in history:
            w.writerow({k: row.get(k, "") for k in HISTORY_KEYS})
