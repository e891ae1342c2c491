"""The model, one training step with Accelerate, and generation on a CUDA device.

Every test here needs a GPU and is skipped without one; ``benchmarks/gpu_check.sh`` runs them
(``pytest -m cuda``, with the device-decision tests of the other files that run anywhere).
They check that the CUDA path is the native one (no bf16 emulation, no hand-written CPU kernel,
fused AdamW, batches copied from pinned memory) and that it computes what the CPU computes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate.state import AcceleratorState

import lmcore.model.decoder as model_module
from lmcore.config import PretrainConfig
from lmcore.generate import GenerationConfig, generate
from lmcore.model.decoder import Decoder, DecoderConfig
from lmcore.model.reference import reference_forward
from lmcore.train.accel import make_accelerator
from lmcore.train.optim import build_optimizers
from lmcore.train.step import TrainState, to_device, train_step

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

CUDA = torch.device("cuda")
VOCAB = 128


def model_cpu(seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(DecoderConfig(vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_heads=2, n_embd=64, block_size=32))


def batch(n: int = 3, t: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (n, t + 1), generator=g)
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


@pytest.fixture(autouse=True)
def exact_float32():
    """float32 matmuls in float32 (no TF32) while a test runs, so CPU and GPU can be compared."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture
def no_cpu_paths(monkeypatch):
    """As if the host CPU emulated bf16, and with the hand-written CPU RMSNorm turned into an
    error: a CUDA model must use neither."""
    monkeypatch.setattr(model_module, "X86_WITHOUT_BF16", True)

    def cpu_kernel(*args):
        raise AssertionError("the hand-written CPU RMSNorm ran on a CUDA tensor")

    monkeypatch.setattr(model_module._RMSNormalize, "apply", cpu_kernel)


def test_the_decisions_say_native_for_this_gpu():
    assert not model_module.emulates_bf16(CUDA) and not model_module.uses_cpu_kernels(CUDA)
    assert torch.cuda.is_bf16_supported()


def test_float32_forward_on_cuda_equals_the_textbook_model_on_the_cpu(no_cpu_paths):
    cpu = model_cpu()
    gpu = copy.deepcopy(cpu).to(CUDA)
    x, y = batch()
    logits, loss = gpu(x.to(CUDA), y.to(CUDA))
    loss.backward()
    with torch.no_grad():  # the textbook forward: no CPU kernel to trip over
        ref_logits, ref_loss = reference_forward(cpu, x, y)
    torch.testing.assert_close(logits.cpu(), ref_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(loss.cpu(), ref_loss, atol=1e-5, rtol=1e-5)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gpu.parameters())


def test_gradients_on_cuda_equal_the_cpu_ones():
    cpu = model_cpu()
    gpu = copy.deepcopy(cpu).to(CUDA)
    x, y = batch()
    cpu(x, y)[1].backward()
    gpu(x.to(CUDA), y.to(CUDA))[1].backward()
    for (name, a), b in zip(cpu.named_parameters(), gpu.parameters()):
        torch.testing.assert_close(b.grad.cpu(), a.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_bf16_autocast_on_cuda_runs_native_bf16_close_to_float32(no_cpu_paths):
    model = model_cpu().to(CUDA)
    x, y = (t.to(CUDA) for t in batch())
    with torch.no_grad():
        _, loss32 = model(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autocast("cuda", dtype=torch.bfloat16):
        logits, loss = model(x, y)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert abs(float(loss.detach()) - float(loss32)) < 0.02 * float(loss32)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_to_device_copies_from_pinned_memory_to_cuda():
    t = torch.arange(1000)
    u = to_device(t, CUDA)
    assert u.device.type == "cuda" and torch.equal(u.cpu(), t)
    assert to_device(u, CUDA) is u  # already there


def test_one_training_step_with_accelerate_on_cuda(no_cpu_paths):
    AcceleratorState._reset_state(reset_partial_state=True)  # other tests may have made a CPU one
    try:
        acc = make_accelerator("bf16")
        assert acc.device.type == "cuda" and acc.mixed_precision == "bf16"
        model = model_cpu()
        (opt,) = build_optimizers(model, PretrainConfig(lr=3e-3), acc.device)
        assert opt.defaults["fused"] is True
        model, opt = acc.prepare(model, opt)
        assert all(p.device.type == "cuda" for p in model.parameters())
        before = [p.detach().clone() for p in model.parameters()]
        batches = [batch(2, seed=s) for s in (1, 2)]  # two micro-batches on the CPU, as pretrain makes them
        state = TrainState()
        losses = [train_step(model, [opt], batches, acc, state, grad_clip=1.0, max_nonfinite=2, hint="").loss
                  for _ in range(8)]
        assert state.step == 8 and state.skipped_steps == 0
        assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_generation_on_cuda_gives_the_same_greedy_tokens_with_and_without_the_cache():
    model = model_cpu().to(CUDA)
    prompts = [[1, 2, 3, 4, 5], [7], [9, 8, 7]]
    greedy = GenerationConfig(max_new_tokens=12, temperature=0)
    cached = [c.tokens for c in generate(model, prompts, greedy)]
    plain = [c.tokens for c in generate(model, prompts, GenerationConfig(max_new_tokens=12, temperature=0, use_cache=False))]
    assert cached == plain and all(len(t) == 12 for t in cached)
    sample = GenerationConfig(max_new_tokens=12, temperature=0.8, top_k=20, seed=3)
    assert [c.tokens for c in generate(model, prompts, sample)] == [c.tokens for c in generate(model, prompts, sample)]


def test_generation_on_cuda_in_bf16_runs_with_the_cache(no_cpu_paths):
    model = model_cpu().to(device=CUDA, dtype=torch.bfloat16)
    out = generate(model, [[1, 2, 3], [4]], GenerationConfig(max_new_tokens=10, temperature=0.8, seed=0))
    assert all(len(c.tokens) == 10 and all(0 <= t < VOCAB for t in c.tokens) for c in out)


def test_generation_on_cuda_through_the_cuda_graph_gives_the_eager_tokens():
    # the compiled decode step (mode reduce-overhead: a CUDA graph replayed per token, the KV
    # cache updated in place at static addresses) against the eager loop, twice: the second call
    # replays the graph recorded by the first
    model = model_cpu().to(CUDA)
    prompts = [[1, 2, 3, 4, 5], [7], [9, 8, 7]]
    eager = [c.tokens for c in generate(model, prompts, GenerationConfig(max_new_tokens=12, temperature=0))]
    compiled = GenerationConfig(max_new_tokens=12, temperature=0, compile=True)
    for _ in range(2):
        assert [c.tokens for c in generate(model, prompts, compiled)] == eager


def test_lmcore_generate_runs_on_the_gpu_by_default():
    """The CLI loaded the model on the CPU and never moved it: generation ran on the CPU of a GPU
    machine, --compile's CUDA graph included."""
    from lmcore.cli.generate import run_device

    assert run_device("auto") == "cuda" and run_device("cpu") == "cpu"
