"""Which of the decoder's interchangeable kernels is fastest on this machine, by measurement.

The same arithmetic can run several ways, and which is fastest depends on the machine (a CPU
with AMX, one with AVX512-BF16 only, one without bf16 instructions, a GPU), the precision and the
shape: the development machines of lmcore have disagreed on every one of these. So a run does not
guess: :func:`attention_kernel` times forward and backward of each causal-attention kernel of
:data:`lmcore.config.ATTENTION_KERNELS` on random tensors of the run's shape and dtype (a
few repetitions, well under a second at the default shapes) and keeps the faster one, unless the
other is within :data:`MARGIN` (then the default, ``sdpa``). Where the ``matmul`` kernel would keep
more than :data:`MATMUL_MEMORY_LIMIT` of attention probabilities, ``sdpa`` is kept unmeasured.

A result is cached per machine in ``$LMCORE_CACHE/kernels.json`` (beside the peak FLOP/s of
``lmcore.train.flops``), keyed by CPU or GPU name, the CPU's matmul flags, torch version, thread
count, dtype and shape, so later runs (and every DVC stage) reuse it. On CUDA nothing is
measured: SDPA's flash and memory-efficient kernels are the fast path there.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from lmcore.config import ATTENTION_KERNELS
from lmcore.core.io import write_json
from lmcore.core.machine import cache_dir, cpu_flags, cpu_name, read_cache
from lmcore.model.decoder import DecoderConfig, causal_attention, emulates_bf16

log = logging.getLogger(__name__)

MARGIN = 0.05
"""A kernel other than the default must be this much faster (5 %) to be chosen: no switching on noise."""

MATMUL_MEMORY_LIMIT = 1 << 30
"""The ``matmul`` kernel keeps each layer's attention probabilities (batch x heads x T x T) for the
backward pass, where SDPA keeps O(T) per row; above this many bytes over all layers (1 GiB: e.g.
the ``gpt2-124m`` preset at batch 16 x 1,024 would keep 4.8 GiB in bf16) it is not considered."""

DEFAULT = "sdpa"


def default_cache() -> Path:
    """``$LMCORE_CACHE/kernels.json`` (default ``~/.cache/lmcore/kernels.json``)."""
    return cache_dir() / "kernels.json"


def _time_kernel(kernel: str, shape: tuple[int, int, int, int], kv_heads: int, dtype: torch.dtype,
                 device: torch.device, reps: int) -> float:
    """Best seconds of one forward and backward of :func:`causal_attention` with ``kernel``."""
    B, H, T, D = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(B, H, T, D, generator=g).to(device, dtype).requires_grad_()
    k, v = (torch.randn(B, kv_heads, T, D, generator=g).to(device, dtype).requires_grad_() for _ in range(2))
    grad = torch.randn(B, H, T, D, generator=g).to(device, dtype)
    best = float("inf")
    for i in range(reps + 1):  # the first call warms up (allocations, kernel selection)
        t0 = time.perf_counter()
        causal_attention(q, k, v, kernel).backward(grad)
        dt = time.perf_counter() - t0
        if i:
            best = min(best, dt)
        q.grad = k.grad = v.grad = None
    return best


def measure_attention(cfg: DecoderConfig, batch_size: int, seq_len: int, dtype: torch.dtype,
                      device: torch.device | str = "cpu", reps: int = 3, rounds: int = 2) -> dict[str, float]:
    """Seconds per forward and backward of causal attention for each kernel at (batch_size,
    n_head, seq_len, head_dim) in ``dtype``: the best of ``reps`` after a warm-up, the kernels
    interleaved over ``rounds`` so that a neighbour on the machine slows them alike."""
    device = torch.device(device)
    shape = (batch_size, cfg.n_head, seq_len, cfg.head_dim)
    best = {k: float("inf") for k in ATTENTION_KERNELS}
    with torch.autocast(device.type, enabled=False):
        for _ in range(rounds):
            for kernel in ATTENTION_KERNELS:
                best[kernel] = min(best[kernel], _time_kernel(kernel, shape, cfg.kv_heads, dtype, device, reps))
    return best


def _key(cfg: DecoderConfig, batch_size: int, seq_len: int, dtype: torch.dtype, device: torch.device) -> str:
    name = cpu_name() if device.type == "cpu" else device.type
    flags = cpu_flags() if device.type == "cpu" else "-"
    return (f"{name} | {flags} | threads={torch.get_num_threads()} | torch={torch.__version__} | "
            f"{str(dtype).removeprefix('torch.')} | B={batch_size} H={cfg.n_head} KV={cfg.kv_heads} T={seq_len} "
            f"D={cfg.head_dim}")


def attention_kernel(cfg: DecoderConfig, batch_size: int, seq_len: int, dtype: torch.dtype,
                     device: torch.device | str = "cpu", setting: str = "auto", cache: Path | None = None) -> str:
    """The attention kernel a run of this shape should use: ``setting`` itself unless ``auto``;
    for ``auto`` on a CPU the faster one measured here (cached, see the module docstring),
    elsewhere ``sdpa``. ``dtype`` is what attention computes in (bf16 under bf16 autocast, except
    where the decoder emulates bf16 and attends in float32)."""
    if setting != "auto":
        if setting not in ATTENTION_KERNELS:
            raise ValueError(f"attention must be 'auto' or one of {ATTENTION_KERNELS}, not {setting!r}")
        return setting
    device = torch.device(device)
    if device.type != "cpu":
        return DEFAULT
    kept = cfg.n_layer * batch_size * cfg.n_head * seq_len * seq_len * dtype.itemsize
    if kept > MATMUL_MEMORY_LIMIT:
        log.info("attention kernel %s: the matmul kernel would keep %.1f GiB of probabilities", DEFAULT, kept / 2**30)
        return DEFAULT
    path = Path(cache) if cache is not None else default_cache()
    key = _key(cfg, batch_size, seq_len, dtype, device)
    entries = read_cache(path, "kernel")
    hit = entries.get(key)
    if isinstance(hit, dict) and hit.get("kernel") in ATTENTION_KERNELS:
        return hit["kernel"]
    times = measure_attention(cfg, batch_size, seq_len, dtype, device)
    fastest = min(times, key=times.get)
    kernel = fastest if times[fastest] < (1 - MARGIN) * times[DEFAULT] else DEFAULT
    log.info("attention kernel %s (%s, measured here: %s)", kernel, key,
             ", ".join(f"{k} {1e3 * t:.1f} ms" for k, t in times.items()))
    entries = read_cache(path, "kernel")  # another process may have written meanwhile
    entries[key] = {"kernel": kernel, "ms": {k: round(1e3 * t, 3) for k, t in times.items()},
                    "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        write_json(path, entries)
    except OSError as e:
        log.warning("could not write the kernel cache %s (%s)", path, e)
    return kernel


def attention_dtype(mixed_precision: str, device: torch.device | str) -> torch.dtype:
    """The dtype attention computes in for a run of ``mixed_precision`` (resolved: ``bf16``,
    ``fp16`` or ``no``) on ``device``: the autocast dtype, except float32 where the decoder
    emulates bf16 (:func:`lmcore.model.decoder.emulates_bf16`) and for ``no``."""
    if mixed_precision == "bf16" and not emulates_bf16(device):
        return torch.bfloat16
    if mixed_precision == "fp16":
        return torch.float16
    return torch.float32
