"""The parts of the training loop that pretrain and finetune share: the step (accumulation
normalised by the targets of the whole step, clipping from the settings, the non-finite guard),
schedules, checkpoints and signals, and fine-tuning through them."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from conftest import make_text
from safetensors.torch import load_file

from lmcore import config
from lmcore.config import FinetuneConfig, FinetuneHyper, TrackingConfig
from lmcore.core.errors import StageError
from lmcore.core.io import write_json, write_jsonl
from lmcore.data import glue
from lmcore.model.decoder import Decoder, DecoderConfig
from lmcore.train import finetune as ft
from lmcore.train import step as step_module
from lmcore.train.checkpoint import list_checkpoints, prune, stop_signals
from lmcore.train.optim import build_optimizers, finetune_optimizer
from lmcore.train.pretrain import Throughput
from lmcore.train.sampler import epoch_batches, process_share, step_groups
from lmcore.train.schedule import linear_warmup_decay, lr_factor, schedulers
from lmcore.train.step import NEXT_TOKEN, TrainState, accumulate, pins_memory, to_device, train_step
from lmcore.train.validate import evaluate_windows

OFF = TrackingConfig(enabled=False)


@pytest.fixture(scope="module")
def acc():
    return Accelerator(cpu=True)


def classifier(seed: int = 0, dropout: float = 0.0) -> ft.SequenceClassifier:
    torch.manual_seed(seed)
    return ft.SequenceClassifier(Decoder(DecoderConfig(vocab_size=50, n_layer=1, n_head=2, n_embd=16, block_size=16)), 3,
                                 dropout)


def example_batch(n: int, seed: int, regression: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 50, (n, 12), generator=g)
    lengths = torch.randint(3, 13, (n,), generator=g)
    y = torch.rand(n, generator=g) * 5 if regression else torch.randint(0, 3, (n,), generator=g)
    return x, lengths, y


def grads(model) -> list[torch.Tensor]:
    g = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return g


# ---------------------------------------------------------------------------------------------
# the step


@pytest.mark.parametrize("regression", [False, True])
def test_example_loss_over_unequal_micro_batches_is_that_of_one_big_batch(acc, regression):
    model = classifier()
    objective = ft.ExampleLoss(regression)
    parts = [example_batch(n, seed, regression) for n, seed in ((1, 1), (5, 2), (2, 3))]
    loss_sum, n = accumulate(model, parts, acc, objective)
    loss = float(loss_sum) / n
    g_micro = grads(model)
    big = tuple(torch.cat([p[i] for p in parts]) for i in range(3))
    loss_big = objective.loss(model, big, acc)
    loss_big.backward()
    g_big = grads(model)
    assert n == 8 and math.isclose(loss, float(loss_big.detach()), rel_tol=1e-5)
    for a, b in zip(g_micro, g_big):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # a mean of the micro-batch means weighs the single example like five
    for p in parts:
        (objective.loss(model, p, acc) / 3).backward()
    assert any(not torch.allclose(a, b, rtol=1e-3) for a, b in zip(grads(model), g_big))


@pytest.mark.parametrize("regression", [False, True])
def test_one_micro_batch_step_is_bitwise_the_plain_loop(acc, regression):
    """With one micro-batch on one process the step does the arithmetic of ``loss.backward()``,
    clipping and ``optimizer.step()`` exactly (fine-tuned scores stay the same bits)."""
    batch = example_batch(6, 4, regression)
    a, b = classifier(), classifier()
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-2)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2)
    state = TrainState()
    for _ in range(3):
        train_step(a, [opt_a], [batch], acc, state, grad_clip=0.5, max_nonfinite=5, hint="",
                   objective=ft.ExampleLoss(regression))
        logits = b(batch[0], batch[1])
        loss = F.mse_loss(logits[:, 0], batch[2]) if regression else F.cross_entropy(logits, batch[2])
        loss.backward()
        acc.clip_grad_norm_(b.parameters(), 0.5)
        opt_b.step()
        opt_b.zero_grad(set_to_none=True)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert state.step == 3 and state.skipped_steps == 0


def _lm_and_batch():
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=32, n_layer=1, n_head=2, n_embd=16, block_size=8))
    x = torch.randint(0, 32, (4, 8))
    return model, [(x, torch.roll(x, -1, 1))]


@pytest.mark.parametrize("clip", [0.0, 0.05, 1e6])
def test_the_update_is_clipped_to_grad_clip_and_not_at_all_with_zero(acc, clip):
    model, batches = _lm_and_batch()
    before = [p.detach().clone() for p in model.parameters()]
    loss_sum, n = accumulate(model, batches, acc)
    raw = float(loss_sum) / n
    raw_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))
    model.zero_grad(set_to_none=True)
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)  # the update is minus the (clipped) gradient
    res = train_step(model, [sgd], batches, acc, TrainState(), grad_clip=clip, max_nonfinite=5, hint="")
    moved = float(torch.linalg.vector_norm(torch.stack([(p - q).norm() for p, q in zip(model.parameters(), before)])))
    assert res.applied and math.isclose(res.loss, raw, rel_tol=1e-6)
    assert raw_norm > 0.05
    assert math.isclose(res.grad_norm, raw_norm, rel_tol=1e-4)  # measured with clipping off too
    assert math.isclose(moved, raw_norm if clip == 0 else min(clip, raw_norm), rel_tol=1e-4)
    assert all(p.grad is None for p in model.parameters())


def test_nonfinite_steps_are_skipped_then_stop_the_run(acc):
    model, batches = _lm_and_batch()
    bad = [(batches[0][0], batches[0][1])]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = TrainState()
    real = Decoder.forward
    nan = {"on": True}

    def forward(self, idx, targets=None, reduction="mean", return_logits=True):
        logits, loss = real(self, idx, targets, reduction, return_logits)
        return logits, loss * float("nan") if nan["on"] else loss

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Decoder, "forward", forward)
        before = [p.detach().clone() for p in model.parameters()]
        for _ in range(2):
            res = train_step(model, [opt], bad, acc, state, grad_clip=1.0, max_nonfinite=3, hint="try this")
            assert not res.applied
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))  # no update
        assert (state.step, state.skipped_steps, state.nonfinite_in_a_row) == (2, 2, 2)
        nan["on"] = False
        assert train_step(model, [opt], bad, acc, state, grad_clip=1.0, max_nonfinite=3, hint="").applied
        assert (state.skipped_steps, state.nonfinite_in_a_row) == (2, 0)  # the count in a row restarts
        nan["on"] = True
        train_step(model, [opt], bad, acc, state, grad_clip=0.0, max_nonfinite=3, hint="try this")
        train_step(model, [opt], bad, acc, state, grad_clip=0.0, max_nonfinite=3, hint="try this")
        with pytest.raises(StageError, match=r"not finite for 3 steps in a row \(step 6\): try this"):
            train_step(model, [opt], bad, acc, state, grad_clip=0.0, max_nonfinite=3, hint="try this")
    assert state.skipped_steps == 5


class SqrtOfWeights:
    """A loss that is finite (0) where its gradient is not: the square root of |w| at w = 0."""
    reduction = "sum"

    def targets(self, batch):
        return 1

    def loss(self, model, batch, accelerator):
        return model.weight.abs().sqrt().sum()


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_a_finite_loss_with_a_nonfinite_gradient_is_not_applied_even_without_clipping(acc, clip):
    """With clipping off the norm was not computed, so such a step was applied and wrote NaN into
    every weight for good."""
    model = torch.nn.Linear(3, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    state = TrainState()
    res = train_step(model, [torch.optim.AdamW(model.parameters())], [None], acc, state, grad_clip=clip,
                     max_nonfinite=3, hint="", objective=SqrtOfWeights())
    assert res.loss == 0.0 and not math.isfinite(res.grad_norm)
    assert not res.applied and state.skipped_steps == 1
    assert torch.equal(model.weight, torch.zeros(1, 3))


class Doubled:
    """Twice the first input's sum of the output: its gradient overflows float16 for a large input."""
    reduction = "sum"

    def targets(self, batch):
        return 1

    def loss(self, model, batch, accelerator):
        return model(batch).sum()


def test_an_overflowing_float16_step_lowers_the_loss_scale_and_the_next_steps_run():
    """fp16 (a GPU's): the update skipped for an overflow must still update the gradient scaler
    (its step was the only place that did); the next step's unscaling then raised "unscale_() has
    already been called". Here a CPU accelerator gets the GradScaler Accelerate builds for fp16."""
    acc16 = Accelerator(cpu=True)
    acc16.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    acc16.native_amp, acc16.state._mixed_precision = True, "fp16"
    try:
        model = torch.nn.Linear(2, 1, bias=False)
        model, opt = acc16.prepare(model, torch.optim.SGD(model.parameters(), lr=0.01))
        state = TrainState()
        scales = []
        for batch in (torch.full((1, 2), 1e36), torch.ones(1, 2), torch.ones(1, 2)):
            res = train_step(model, [opt], [batch], acc16, state, grad_clip=1.0, max_nonfinite=3, hint="",
                             objective=Doubled())
            scales.append((res.applied, acc16.scaler.get_scale()))
        assert scales[0] == (False, 2.0**15)  # skipped, the scale halved
        assert [a for a, _ in scales[1:]] == [True, True]
    finally:
        acc16.state._mixed_precision = "no"


def test_the_best_checkpoint_is_the_best_validated_checkpoint_not_the_best_validation():
    """Validations between checkpoints (eval_interval below checkpoint_interval) can be the best;
    pruning kept that step, which has no checkpoint, and removed the best checkpoint."""
    s = TrainState()
    for step, loss, checkpoint in [(100, 3.0, True), (200, 2.0, True), (300, 1.5, False), (400, 2.5, True),
                                   (500, float("nan"), True), (600, 2.6, True)]:
        s.step, s.best_val_loss = step, min(loss, s.best_val_loss or math.inf)
        if checkpoint:
            s.checkpointed(loss)
    assert (s.best_checkpoint_step, s.best_checkpoint_loss) == (200, 2.0)


class Share:
    """What :func:`evaluate_windows` asks of an accelerator, for process ``rank`` of ``world``
    (the sums each process hands to the all-reduce are kept, to add them up here)."""

    def __init__(self, rank: int, world: int) -> None:
        self.process_index, self.num_processes, self.device = rank, world, torch.device("cpu")
        self.reduced = None

    def autocast(self):
        return contextlib.nullcontext()

    def reduce(self, t, op):
        self.reduced = t
        return t


@pytest.mark.parametrize("n_windows, world, batch", [(8, 3, 2), (7, 2, 2), (2, 3, 1), (9, 3, 3)])
def test_validation_runs_as_many_forward_passes_on_every_process_and_counts_each_window_once(n_windows, world, batch):
    """Uneven shares (8 windows, 3 processes, batches of 2: 2, 2 and 1 passes) left a process
    waiting in FSDP's weight gathering while the others went on to the all-reduce: a hang."""
    model, _ = _lm_and_batch()
    windows = torch.randint(0, 32, (n_windows, 9), generator=torch.Generator().manual_seed(1))
    calls = []
    real = model.forward
    model.forward = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    whole = evaluate_windows(model, windows, batch, Share(0, 1))
    passes, sums = [], torch.zeros(2, dtype=torch.float64)
    for rank in range(world):
        calls.clear()
        share = Share(rank, world)
        evaluate_windows(model, windows, batch, share)
        passes.append(len(calls))
        sums += share.reduced
    assert len(set(passes)) == 1 and passes[0] == -(-(-(-n_windows // world)) // batch)
    assert sums[1] == n_windows * 8 and math.isclose(float(sums[0] / sums[1]), whole, rel_tol=1e-6)


def test_a_classifier_of_an_untied_model_trains_only_what_it_uses():
    """Its language-model head got no gradient, and DDP (which expects one for every trainable
    parameter) stopped at the second step of any multi-process fine-tuning of an untied model."""
    torch.manual_seed(0)
    for tied in (True, False):
        model = ft.SequenceClassifier(Decoder(DecoderConfig(vocab_size=50, n_layer=1, n_head=2, n_embd=16,
                                                            block_size=16, tie_embeddings=tied)), 2)
        x, lengths, _ = example_batch(4, 0)
        model(x, lengths).sum().backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        assert model.backbone.lm_head.weight.requires_grad is tied  # tied: it is the embedding
        assert model.backbone.embed.weight.requires_grad


def test_the_best_epoch_is_never_one_scored_nan_unless_every_one_was():
    assert ft._better(0.5, 0.4) and not ft._better(0.4, 0.5)
    assert not ft._better(float("nan"), 0.1)  # all-equal predictions: a NaN correlation
    assert ft._better(0.1, float("nan"))


def test_train_state_round_trips_through_trainer_json():
    s = TrainState(step=7, history=[{"step": 5, "val_loss": 2.0}], best_val_loss=2.0, best_step=5,
                   best_checkpoint_loss=2.1, best_checkpoint_step=4, train_seconds=1.5, skipped_steps=1,
                   nonfinite_in_a_row=1)
    saved = json.loads(json.dumps({**s.to_dict(), "sampler": {"pos": 3}, "config_hash": "x"}))
    t = TrainState()
    t.load(saved)
    assert t == s
    assert list(s.to_dict()) == ["step", "history", "best_val_loss", "best_step", "best_checkpoint_loss",
                                 "best_checkpoint_step", "train_seconds", "skipped_steps",
                                 "nonfinite_in_a_row"]  # the keys of trainer.json, in their order


# ---------------------------------------------------------------------------------------------
# schedules, batches, checkpoints


def test_finetune_schedule_warms_up_then_decays_linearly_to_zero():
    assert [linear_warmup_decay(s, 3, 10) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert linear_warmup_decay(6, 3, 10) == pytest.approx(4 / 7) and linear_warmup_decay(10, 3, 10) == 0.0
    assert linear_warmup_decay(0, 0, 4) == 1.0 and linear_warmup_decay(12, 3, 10) == 0.0
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    (sched,) = schedulers([opt], lambda s: linear_warmup_decay(s, 3, 10))
    lrs = []
    for _ in range(5):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.0 * 6 / 7])
    cfg = config.PretrainConfig(max_steps=20, warmup_steps=4)
    (pre,) = schedulers([torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)], lambda s: lr_factor(s, cfg))
    assert pre.get_last_lr()[0] == lr_factor(0, cfg)


def test_step_groups_take_accum_consecutive_batches():
    import numpy as np

    batches = epoch_batches([5] * 50, 4, np.random.default_rng(0), group_by_length=False)
    groups = step_groups(batches, 2)
    assert [len(g) for g in groups] == [2] * 6 + [1]
    big = epoch_batches([5] * 50, 8, np.random.default_rng(0), group_by_length=False)
    assert [np.concatenate(g).tolist() for g in groups] == [b.tolist() for b in big]


@pytest.mark.parametrize("n_batches", [1, 6, 7, 9, 10, 11])
@pytest.mark.parametrize("accum", [1, 2, 3])
def test_processes_get_equal_shares_of_an_epoch_and_so_take_the_same_steps(n_batches, accum):
    """Each optimizer step is a collective: a process with one step more than another would wait
    for it forever. Three processes: equal shares, every batch in one of them (repeats only to
    fill the last round)."""
    batches = [[i] for i in range(n_batches)]
    shares = [process_share(batches, rank, 3) for rank in range(3)]
    assert len({len(s) for s in shares}) == 1 and len(shares[0]) == math.ceil(n_batches / 3)
    assert len({len(step_groups(s, accum)) for s in shares}) == 1
    seen = [b[0] for s in shares for b in s]
    assert set(seen) == set(range(n_batches)) and len(seen) - n_batches == -n_batches % 3
    assert process_share(batches, 0, 1) == batches and process_share([], 1, 3) == []


def test_throughput_is_tokens_over_the_seconds_it_is_given():
    """A validation between two log lines adds no time and no tokens: 30 tokens in 3 s of steps."""
    speed = Throughput()
    for _ in range(3):
        speed.add(10, 1.0)
        time.sleep(0.05)  # validation, a checkpoint, logging
    assert speed.rate() == pytest.approx(10.0)
    speed.add(40, 2.0)  # counted afresh after a rate
    assert speed.rate() == pytest.approx(20.0)


def test_finetune_weight_decay_spares_norms_biases_and_the_embedding():
    model = classifier()
    opt = finetune_optimizer(model, model.head, FinetuneHyper(lr=1e-3, head_lr=1e-2, weight_decay=0.05))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {(g["lr"], g["weight_decay"]): sorted(names[id(p)] for p in g["params"]) for g in opt.param_groups}
    assert set(groups) == {(1e-3, 0.05), (1e-3, 0.0), (1e-2, 0.05), (1e-2, 0.0)}
    assert groups[(1e-2, 0.05)] == ["head.weight"] and groups[(1e-2, 0.0)] == ["head.bias"]
    decayed = groups[(1e-3, 0.05)]
    assert decayed and all(n.endswith("_proj.weight") for n in decayed)
    assert all("norm" in n or "embed" in n for n in groups[(1e-3, 0.0)])
    assert sum(len(v) for v in groups.values()) == len(names)  # every parameter, once


def test_prune_keeps_the_last_and_the_best(tmp_path):
    for s in (10, 20, 30, 40, 50):
        (tmp_path / f"step-{s:06d}").mkdir()
        (tmp_path / f"step-{s:06d}/trainer.json").write_text("{}")
    (tmp_path / "step-000060").mkdir()  # incomplete: no trainer.json
    # a save interrupted at a step never saved again (a signal's): a whole checkpoint left for ever
    (tmp_path / ".step-000017.tmp").mkdir()
    (tmp_path / ".step-000017.tmp/model.safetensors").write_text("partial")
    prune(tmp_path, 2, best_step=20)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [20, 40, 50]
    assert not (tmp_path / ".step-000017.tmp").exists()


def test_an_untied_output_head_is_decayed_like_the_other_matrices():
    """An untied lm_head went to the no-decay group with the embedding: weight decay on 2-D
    weights, as documented, missed the largest matrix of a small model."""
    from lmcore.train.optim import param_groups

    for tied in (True, False):
        model = Decoder(DecoderConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=32, block_size=16,
                                      tie_embeddings=tied))
        names = {id(p): n for n, p in model.named_parameters()}
        decayed, spared = ([names[id(p)] for p in g["params"]] for g in param_groups(list(model.named_parameters()), 0.1))
        assert "embed.weight" in spared and ("lm_head.weight" in decayed) is not tied
        assert "lm_head.weight" not in spared


def test_the_peak_probe_leaves_the_seeded_random_numbers_alone():
    """The probe ran only when nothing was cached, drawing from the global generator: the first
    run on a machine (or after a torch upgrade) drew other dropout masks than the next."""
    from lmcore.train.flops import measure_peak

    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    measure_peak(torch.device("cpu"), torch.float32, size=64, budget=0.01)
    assert torch.equal(torch.rand(4), expected)


def test_each_model_trained_on_one_accelerator_starts_at_the_initial_loss_scale():
    """Accelerate's free_memory keeps the fp16 scaler: fine-tuning's second seed and the
    from-scratch twin started at the scale the model before them ended with."""
    import types

    from lmcore.train.accel import loss_scale_restarter

    assert loss_scale_restarter(types.SimpleNamespace(scaler=None))() is None
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    restart = loss_scale_restarter(types.SimpleNamespace(scaler=scaler))
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=1.0)
    scaler.scale(p.sum() * float("inf")).backward()  # an overflow halves the scale
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == 512.0
    restart()
    assert scaler.get_scale() == 1024.0 and scaler.state_dict()["_growth_tracker"] == 0


def test_sync_tree_flushes_every_file_and_folder(tmp_path, monkeypatch):
    from lmcore.core import io

    (tmp_path / "ckpt/sub").mkdir(parents=True)
    for name in ("a.bin", "sub/b.bin"):
        (tmp_path / "ckpt" / name).write_bytes(b"x")
    flushed = []
    real = os.fsync
    monkeypatch.setattr(io.os, "fsync", lambda fd: (flushed.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    io.sync_tree(tmp_path / "ckpt")
    assert sorted(flushed) == sorted(str(tmp_path / "ckpt" / n) for n in ("", "a.bin", "sub", "sub/b.bin"))
    flushed.clear()
    io.sync_tree(tmp_path / "ckpt", files=False)
    assert flushed == [str(tmp_path / "ckpt")]


def test_a_run_started_afresh_over_a_finished_run_of_the_same_settings_keeps_its_own_checkpoints(tmp_path):
    """A finished run (steps 10-40) of other code, same settings: the new run started afresh, and
    its first checkpoints were pruned as the oldest (the old run's steps 30 and 40 were taken for
    its own), so an interruption restarted it from step 0."""
    from lmcore.train.checkpoint import _run_of

    layout = {"processes": 1, "grad_accum": 1, "batch_size": 8}

    def write(step: int, run: str) -> dict:  # what save_checkpoint leaves (a step's folder replaced whole)
        trainer = {"config_hash": "h", "layout": layout, "run": run, "step": step}
        (tmp_path / f"step-{step:06d}").mkdir(exist_ok=True)
        (tmp_path / f"step-{step:06d}/trainer.json").write_text(json.dumps(trainer))
        return trainer

    for step in (10, 20, 30, 40):
        write(step, "old")
    new = write(10, "new")
    prune(tmp_path, 2, best_step=None, run=_run_of(new))
    assert [s for s, _ in list_checkpoints(tmp_path)] == [10]  # the old run's 20-40 went, not the new 10
    new = write(20, "new")
    prune(tmp_path, 2, best_step=None, run=_run_of(new))
    assert [s for s, _ in list_checkpoints(tmp_path)] == [10, 20]


def test_stop_signals_raise_a_flag_and_restore_the_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with stop_signals() as flag:
        assert flag["signum"] == 0
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag["signum"] == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


# ---------------------------------------------------------------------------------------------
# fine-tuning through the parts


def test_finetune_settings_defaults_and_bounds():
    hp = FinetuneHyper()
    assert (hp.grad_accum, hp.grad_clip, hp.max_nonfinite) == (1, 1.0, 5)
    for bad in ({"grad_accum": 0}, {"grad_clip": -1.0}, {"max_nonfinite": 0}):
        with pytest.raises(ValueError):
            FinetuneHyper(**bad)
    cfg = FinetuneConfig(defaults={"grad_accum": 2}, tasks={"rte": {"grad_clip": 0}})
    assert cfg.for_task("rte").grad_clip == 0 and cfg.for_task("rte").grad_accum == 2
    assert FinetuneHyper.model_fields["grad_clip"].description  # documented like the other fields


@pytest.fixture(scope="module")
def ft_inputs(tmp_path_factory):
    from lmcore.config import TokenizerConfig
    from lmcore.data.tokenizer import save as save_tokenizer
    from lmcore.data.tokenizer import train
    from lmcore.model.folder import save_decoder

    root = tmp_path_factory.mktemp("ft")
    rng = random.Random(0)
    tcfg = TokenizerConfig(vocab_size=300)
    save_tokenizer(train(tcfg, [make_text(rng, 80) for _ in range(20)]), tcfg, root / "tokenizer")
    torch.manual_seed(0)
    save_decoder(Decoder(DecoderConfig(vocab_size=300, n_layer=1, n_head=2, n_embd=32, block_size=32)), root / "pretrained")
    tasks = {}
    for name in ("sst2", "stsb"):
        spec = glue.TASKS[name]

        def rows(n):
            return [{"idx": i, "text_a": make_text(rng, 8), "text_b": make_text(rng, 5) if spec.pair else None,
                     "label": rng.random() * 5 if spec.is_regression else i % 2} for i in range(n)]

        d = root / "raw" / name
        write_jsonl(d / "train.jsonl", rows(50))
        write_jsonl(d / "validation.jsonl", rows(12))
        write_json(d / "task.json", spec.to_dict())
        tasks[name] = d
    return root, tasks


def _finetune(ft_inputs, out: Path, task: str, **hp) -> dict[str, torch.Tensor]:
    root, tasks = ft_inputs
    cfg = FinetuneConfig(mixed_precision="no", defaults={"epochs": 1, "max_length": 32, "dropout": 0.0,
                                                         "group_by_length": False, "warmup_fraction": 0.3, **hp})
    ft.finetune(cfg, tasks[task], root / "pretrained", root / "tokenizer", out, out.parent / f"{out.name}.json", OFF)
    return load_file(out / "model.safetensors")


def test_finetune_refuses_a_tokenizer_the_model_was_not_trained_with(ft_inputs, tmp_path):
    from lmcore.model.folder import load_decoder, save_decoder

    root, tasks = ft_inputs
    save_decoder(load_decoder(root / "pretrained"), tmp_path / "pretrained", extra={"tokenizer_sha256": "0" * 64})
    with pytest.raises(StageError, match="is not the tokenizer .*pretrained was trained with"):
        ft.finetune(FinetuneConfig(mixed_precision="no"), tasks["sst2"], tmp_path / "pretrained", root / "tokenizer",
                    tmp_path / "out", tmp_path / "out.json", OFF)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("task", ["sst2", "stsb"])
def test_finetune_accumulating_two_batches_of_b_equals_one_batch_of_2b(ft_inputs, tmp_path, task):
    """50 examples: 13 batches of 4 (the last of 2) in 7 steps against 7 batches of 8."""
    accum = _finetune(ft_inputs, tmp_path / "accum", task, batch_size=4, grad_accum=2)
    big = _finetune(ft_inputs, tmp_path / "big", task, batch_size=8, grad_accum=1)
    small = _finetune(ft_inputs, tmp_path / "small", task, batch_size=4, grad_accum=1)
    for k in big:
        torch.testing.assert_close(accum[k], big[k], rtol=1e-4, atol=1e-5)
    assert any(not torch.allclose(small[k], big[k], rtol=1e-3, atol=1e-4) for k in big)  # not a vacuous check
    assert json.loads((tmp_path / "accum/results.json").read_text())["history"][0]["step"] == 7


def test_finetune_keeps_no_trained_model_in_the_accelerator(ft_inputs, tmp_path, monkeypatch):
    """Two seeds and the from-scratch twin: the accelerator held all three models and their
    optimizers until the stage ended (GPU memory for larger models)."""
    made = []
    real = ft.make_accelerator

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(ft, "make_accelerator", spy)
    _finetune(ft_inputs, tmp_path / "seeds", "sst2", batch_size=8, seeds=2, scratch_baseline=True)
    assert len(made) == 1 and made[0]._models == [] and made[0]._optimizers == []


def test_finetune_clipping_comes_from_the_settings(ft_inputs, tmp_path):
    off = _finetune(ft_inputs, tmp_path / "off", "sst2", batch_size=8, grad_clip=0.0, lr=0.05, head_lr=0.05)
    tight = _finetune(ft_inputs, tmp_path / "tight", "sst2", batch_size=8, grad_clip=1e-3, lr=0.05, head_lr=0.05)
    assert any(not torch.allclose(off[k], tight[k]) for k in off)


def test_finetune_skips_nonfinite_steps_then_stops(ft_inputs, tmp_path, monkeypatch):
    real = ft.SequenceClassifier.forward
    calls = {"n": 0, "bad": {2, 3}}

    def flaky(self, idx, lengths):
        logits = real(self, idx, lengths)
        if self.training:
            calls["n"] += 1
            if calls["n"] in calls["bad"]:
                logits = logits * float("nan")
        return logits

    monkeypatch.setattr(ft.SequenceClassifier, "forward", flaky)
    _finetune(ft_inputs, tmp_path / "two", "sst2", batch_size=8, max_nonfinite=3)  # two bad steps: trains on
    weights = load_file(tmp_path / "two/model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    calls.update(n=0, bad=set(range(2, 100)))
    with pytest.raises(StageError, match=r"not finite for 3 steps in a row \(step 4\).*finetune.lr"):
        _finetune(ft_inputs, tmp_path / "stops", "sst2", batch_size=8, max_nonfinite=3)
    assert not (tmp_path / "stops").exists()


def test_next_token_objective_counts_targets_that_are_not_ignored():
    y = torch.tensor([[1, -100, 2], [-100, -100, 3]])
    assert NEXT_TOKEN.targets((y, y)) == 3


# ---------------------------------------------------------------------------------------------
# devices: what goes differently on CUDA (decided from the device, checked without a GPU)


class HostBatch:
    """Stands in for a CPU tensor and records what is done to move it."""

    device = torch.device("cpu")

    def __init__(self, pinned: bool = False) -> None:
        self.pinned, self.calls = pinned, []

    def is_pinned(self) -> bool:
        return self.pinned

    def pin_memory(self) -> HostBatch:
        self.calls.append("pin_memory")
        return self

    def to(self, device, non_blocking: bool = False) -> HostBatch:
        self.calls.append(("to", torch.device(device).type, non_blocking))
        return self


@pytest.mark.cuda
def test_batches_go_to_cuda_through_pinned_memory_without_blocking_and_to_a_cpu_as_they_are():
    assert pins_memory(torch.device("cuda")) and pins_memory("cuda:1")
    assert not pins_memory(torch.device("cpu")) and not pins_memory("meta")
    b = HostBatch()
    to_device(b, torch.device("cuda", 0))
    assert b.calls == ["pin_memory", ("to", "cuda", True)]
    b = HostBatch(pinned=True)  # already pinned (e.g. by a DataLoader): not copied again
    to_device(b, "cuda")
    assert b.calls == [("to", "cuda", True)]
    b = HostBatch()
    to_device(b, torch.device("cpu"))
    assert b.calls == [("to", "cpu", False)]
    t = torch.arange(6)
    assert to_device(t, torch.device("cpu")) is t


@pytest.mark.cuda
def test_both_objectives_move_their_batches_with_to_device(acc, monkeypatch):
    seen = []

    def spy(t, device):
        seen.append(torch.device(device))
        return t.to(device)

    monkeypatch.setattr(step_module, "to_device", spy)
    monkeypatch.setattr(ft, "to_device", spy)
    model, batches = _lm_and_batch()
    accumulate(model, batches, acc)
    assert seen == [acc.device] * 2
    seen.clear()
    accumulate(classifier(), [example_batch(3, 1)], acc, ft.ExampleLoss(False))
    assert seen == [acc.device] * 3


@pytest.mark.cuda
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_adamw_is_fused_for_cuda_even_while_the_parameters_are_still_on_the_cpu(optimizer):
    """The optimizers are built before ``accelerator.prepare`` moves the model: the device where
    training runs decides, not where the parameters are at that moment."""
    model, _ = _lm_and_batch()
    cfg = config.PretrainConfig(optimizer=optimizer)
    adamw = build_optimizers(model, cfg, torch.device("cuda"))[-1]
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["fused"] is True
    assert build_optimizers(model, cfg)[-1].defaults["fused"] is True  # on a CPU too, as before


@pytest.mark.cuda
def test_finetune_adamw_is_fused_on_cuda_and_unchanged_on_a_cpu():
    model = classifier()
    hp = FinetuneHyper()
    assert finetune_optimizer(model, model.head, hp, torch.device("cuda")).defaults["fused"] is True
    assert finetune_optimizer(model, model.head, hp, "cuda:0").defaults["fused"] is True
    for device in (torch.device("cpu"), None):  # torch's default implementation: CPU results stay the same bits
        assert not finetune_optimizer(model, model.head, hp, device).defaults["fused"]
