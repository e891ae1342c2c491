"""The peak FLOP/s that model FLOPs utilisation (MFU) is measured against.

MFU = achieved FLOP/s / peak FLOP/s of the hardware, in the run's dtype.

Achieved FLOP/s = tokens per second x training FLOPs per token, where (``Decoder.flops_per_token`` in
``lmcore/model.py``, the PaLM paper's MFU appendix):

    FLOPs per token = 6 x (parameters of every matmul, output projection included,
                           embedding lookup excluded)
                    + 12 x layers x width x context          (attention scores QK^T and AV)

6 = 2 FLOPs per multiply-add x 3 (the forward pass, and the backward pass for inputs and for
weights). Recomputation is not counted (that would be "hardware FLOPs utilisation").

The peak is the one thing a reader cannot check, so it is never a hard-coded A100 number:

- on a known GPU it is the vendor's dense (no 2:4 sparsity) tensor-core figure for bf16/fp16
  (``GPU_PEAKS``, each figure with its source);
- otherwise (every CPU, an unknown GPU, fp32 anywhere) it is measured: a short probe of large
  ``torch.mm`` calls in the run's dtype (warm-up, then the best of several timings, ~1 s),
  cached per machine in a JSON file, keyed by device name, dtype, thread count and torch version
  (``$LMCORE_CACHE/peak_flops.json``, default ``~/.cache/lmcore/peak_flops.json``).

A measured peak is what a large matmul actually reaches here, so MFU against it reads as "how
much of the attainable matmul throughput did training use"; the theoretical peak of a CPU (cores x
clock x FMA width) is higher and rarely reached by any library.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import time
from pathlib import Path
from typing import Literal

import filelock
import torch

from lmcore.core.io import write_json
from lmcore.core.machine import cache_dir, cpu_name, read_cache

log = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}


@dataclasses.dataclass(frozen=True)
class Peak:
    flops: float
    """Peak FLOP/s of one device (one process) in ``dtype``."""
    source: Literal["measured", "table"]
    """``table``: a vendor datasheet figure; ``measured``: the matmul probe on this machine."""
    device_name: str
    """CPU model (``lmcore.core.machine.cpu_name``) or ``torch.cuda.get_device_name``."""
    dtype: str
    """``bfloat16``, ``float16`` or ``float32``."""


def dtype_of(mixed_precision: str) -> torch.dtype:
    """The matmul dtype of a run: ``bf16`` -> bfloat16, ``fp16`` -> float16, ``no`` -> float32."""
    try:
        return _DTYPES[mixed_precision]
    except KeyError:
        raise ValueError(f"mixed_precision must be one of {sorted(_DTYPES)}, not {mixed_precision!r}") from None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# Dense (no 2:4 sparsity) tensor-core peaks in TFLOP/s, with FP32 accumulation where the
# datasheet distinguishes (that is what training uses). NVIDIA datasheets print the sparse
# figure with an asterisk ("* With sparsity"); the dense figure is half of it.
# The first pattern that matches ``torch.cuda.get_device_name()`` wins, so specific names come
# before general ones. A dtype missing from an entry (fp32 everywhere; bf16 on V100/T4, which
# have no bf16 tensor cores) is measured instead.
GPU_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    # H100 datasheet (nvidia.com/en-us/data-center/h100, "H100 Tensor Core GPU datasheet"):
    # BF16/FP16 tensor 1,979 (SXM) | 1,671 (NVL) | 1,513 (PCIe) TFLOPS with sparsity; dense =
    # half. The Hopper whitepaper gives SXM5 dense BF16 = 989.4.
    # get_device_name: "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 NVL", "NVIDIA H100 PCIe".
    (r"H100.*NVL", {"bfloat16": 835e12, "float16": 835e12}),
    (r"H100.*PCIe", {"bfloat16": 756e12, "float16": 756e12}),
    (r"H100", {"bfloat16": 989.4e12, "float16": 989.4e12}),
    # H200 datasheet: BF16/FP16 tensor 1,979 (SXM) | 1,671 (NVL) TFLOPS with sparsity: the
    # GH100 compute of the H100 SXM with more memory.
    # GH200 (Grace Hopper) datasheet: the same 1,979* for its H100-class GPU.
    (r"H200.*NVL", {"bfloat16": 835e12, "float16": 835e12}),
    (r"GH200|H200", {"bfloat16": 989.4e12, "float16": 989.4e12}),
    # A100 datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf): BF16/FP16 tensor
    # 312 | 624* TFLOPS, the same for 40/80 GB, SXM4 and PCIe.
    (r"A100", {"bfloat16": 312e12, "float16": 312e12}),
    # L40S datasheet: BF16/FP16 tensor 362.05 | 733* TFLOPS. (L40: 181.05 | 362.1*.)
    (r"L40S", {"bfloat16": 362.05e12, "float16": 362.05e12}),
    (r"L40\b", {"bfloat16": 181.05e12, "float16": 181.05e12}),
    # L4 datasheet: BF16/FP16 tensor 242* TFLOPS with sparsity -> 121 dense.
    (r"\bL4\b", {"bfloat16": 121e12, "float16": 121e12}),
    # A10G (AWS G5 only): NVIDIA publishes no datasheet for it and third-party figures (~70
    # TFLOPS bf16, e.g. Baseten's "NVIDIA A10 vs A10G") could not be checked against a vendor
    # source, so it is deliberately measured (an empty entry), not given the A10's 125.
    (r"\bA10G\b", {}),
    # A10 datasheet: BF16/FP16 tensor 125 | 250* TFLOPS.
    (r"\bA10\b", {"bfloat16": 125e12, "float16": 125e12}),
    # GeForce: half-rate FP32 accumulation. Ada whitepaper (RTX 4090): peak BF16 tensor with
    # FP32 accumulate 165.2 | 330.4*. GA102 whitepaper appendix (RTX 3090): 71 | 142*.
    # Anchored at the end: the 3090 Ti, 4090 D and laptop parts differ and are measured.
    (r"RTX 4090\s*$", {"bfloat16": 165.2e12, "float16": 165.2e12}),
    (r"RTX 3090\s*$", {"bfloat16": 71e12, "float16": 71e12}),
    # V100 datasheet: tensor performance 125 (SXM2) | 112 (PCIe) | 130 (V100S) TFLOPS, FP16
    # (no bf16). get_device_name: "Tesla V100-SXM2-16GB", "Tesla V100-PCIE-32GB", "Tesla V100S-PCIE-32GB".
    (r"V100S", {"float16": 130e12}),
    (r"V100.*PCIE", {"float16": 112e12}),
    (r"V100", {"float16": 125e12}),
    # T4 datasheet: mixed precision (FP16/FP32) 65 TFLOPS (no bf16).
    (r"\bT4\b", {"float16": 65e12}),
)


def table_peak(device_name: str, dtype: torch.dtype) -> float | None:
    """The datasheet peak (FLOP/s) of a GPU named like ``torch.cuda.get_device_name()``, or None."""
    for pattern, peaks in GPU_PEAKS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return peaks.get(_dtype_name(dtype))
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return cpu_name()
    return device.type


def default_cache() -> Path:
    """``$LMCORE_CACHE/peak_flops.json`` (default ``~/.cache/lmcore/peak_flops.json``)."""
    return cache_dir() / "peak_flops.json"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak(device: torch.device, dtype: torch.dtype, size: int = 2048, budget: float = 1.0) -> float:
    """Best FLOP/s of ``size`` x ``size`` ``torch.mm`` calls in ``dtype`` within ~``budget`` seconds.

    The matrix grows from 256 to ``size`` while one product takes under ``budget / 20``, so a
    pathologically slow dtype (fp16 on most CPUs: ~1 GFLOP/s) is timed at a size that still fits
    the budget instead of taking minutes.
    """
    n = min(256, size)

    # a generator of its own: the probe runs only when nothing is cached, and drawing from the global
    # one would change every dropout mask of a seeded run after it (the first run on a machine, or
    # after a torch upgrade, trained differently from the next)
    gen = torch.Generator(device).manual_seed(0)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a = torch.randn(n, n, device=device, generator=gen).to(dtype)
        b = torch.randn(n, n, device=device, generator=gen).to(dtype)
        return a, b, torch.empty(n, n, device=device, dtype=dtype)

    def once(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> float:
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b, out=c)
        _sync(device)
        return time.perf_counter() - t0

    with torch.inference_mode():
        while True:
            a, b, c = make(n)
            once(a, b, c)  # warm-up: allocation, kernel selection, caches
            t = once(a, b, c)
            if n >= size or t > budget / 20:
                break
            n = min(size, 2 * n)
        best = t
        t_start = time.perf_counter()
        reps = 1
        while reps < 50 and (reps < 3 or time.perf_counter() - t_start < budget):
            best = min(best, once(a, b, c))
            reps += 1
    return 2 * n**3 / best


def _cache_key(name: str, dtype: torch.dtype, threads: int | None, size: int) -> str:
    threads_part = f"threads={threads}" if threads is not None else "threads=-"
    return f"{name} | {_dtype_name(dtype)} | {threads_part} | torch={torch.__version__} | n={size}"


def _cached_flops(entries: dict, key: str) -> float | None:
    """The cached FLOP/s under ``key``, or None if absent or not a positive number."""
    hit = entries.get(key)
    if isinstance(hit, dict) and isinstance(hit.get("flops"), (int, float)) and hit["flops"] > 0:
        return float(hit["flops"])
    return None


def peak_flops(device: torch.device, dtype: torch.dtype, threads: int | None = None,
               cache: Path | None = None, *, size: int = 2048, budget: float = 1.0,
               refresh: bool = False) -> Peak:
    """The peak FLOP/s of one ``device`` in ``dtype``: a datasheet figure or a cached measurement.

    ``threads`` (CPU only): the intra-op thread count to measure with (default: torch's current
    one); it is part of the cache key. ``cache``: the JSON file (default :func:`default_cache`).
    ``size`` and ``budget``: the probe's matrix size and time (tests pass small ones; ``size`` is
    part of the cache key so a small probe never stands in for the real one). ``refresh``: measure
    again even if cached. The cache keeps the highest measurement: other work on the machine can
    only slow a probe down, so a higher value is the better estimate of the peak.
    """
    device = torch.device(device)
    name = device_name(device)
    if device.type == "cuda":
        flops = table_peak(name, dtype)
        if flops is not None:
            return Peak(flops, "table", name, _dtype_name(dtype))
        threads = None
    elif device.type == "cpu":
        threads = threads or torch.get_num_threads()
    else:
        threads = None

    path = Path(cache) if cache is not None else default_cache()
    key = _cache_key(name, dtype, threads, size)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(f"{path}.lock", timeout=600)
    except OSError:  # a cache folder that cannot be written: measure without the lock
        lock = contextlib.nullcontext()
    # one process measures, the others wait and read its result: the processes of one launch
    # probing at once (mixed_precision: auto) slowed each other and could decide differently
    with lock:
        return _measured(device, dtype, name, threads, path, key, size, budget, refresh)


def _measured(device: torch.device, dtype: torch.dtype, name: str, threads: int | None, path: Path, key: str,
              size: int, budget: float, refresh: bool) -> Peak:
    """:func:`peak_flops` of a CPU or an unlisted GPU: the cache's entry ``key``, or a measurement."""
    entries = read_cache(path, "peak FLOP/s")
    cached = _cached_flops(entries, key)
    if cached is not None and not refresh:
        return Peak(cached, "measured", name, _dtype_name(dtype))

    previous = torch.get_num_threads()
    if threads is not None and threads != previous:
        torch.set_num_threads(threads)
    try:
        flops = measure_peak(device, dtype, size=size, budget=budget)
    finally:
        if threads is not None and threads != previous:
            torch.set_num_threads(previous)
    log.info("measured peak %.1f GFLOP/s (%s, %s, threads=%s)", flops / 1e9, name, _dtype_name(dtype), threads)

    entries = read_cache(path, "peak FLOP/s")  # re-read: another process may have added entries meanwhile
    cached = _cached_flops(entries, key)
    if cached is not None and cached >= flops:
        return Peak(cached, "measured", name, _dtype_name(dtype))  # an earlier probe did better
    entries[key] = {"flops": flops, "device_name": name, "dtype": _dtype_name(dtype), "threads": threads,
                    "torch": torch.__version__, "size": size,
                    "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        write_json(path, entries)
    except OSError as e:
        log.warning("could not write the peak FLOP/s cache %s (%s)", path, e)
    return Peak(flops, "measured", name, _dtype_name(dtype))


_warned_over_peak = False


def mfu(tokens_per_second: float, flops_per_token: float, peak: Peak) -> float:
    """Model FLOPs utilisation: ``tokens_per_second * flops_per_token / peak.flops``, at most 1.0.

    A value above 1 means the probe underestimated the peak (e.g. a busy machine while it ran):
    1.0 is returned and a warning logged once (``lmcore pretrain`` then probes again at the end of
    the run, see :func:`peak_flops` ``refresh``).
    """
    global _warned_over_peak
    if peak.flops <= 0:
        raise ValueError(f"peak FLOP/s must be positive, not {peak.flops}")
    ratio = tokens_per_second * flops_per_token / peak.flops
    if ratio > 1.0:
        if not _warned_over_peak:
            _warned_over_peak = True
            log.warning("achieved %.1f GFLOP/s exceeds the %s peak %.1f GFLOP/s (%s, %s): the peak probe "
                        "underestimated it (it is measured again at the end of the run; the cache is %s); MFU reported as 1.0",
                        ratio * peak.flops / 1e9, peak.source, peak.flops / 1e9, peak.device_name, peak.dtype,
                        default_cache())
        return 1.0
    return ratio


def resolve_precision(mixed_precision: str) -> str:
    """``auto`` -> the faster of ``bf16`` and ``no`` on this machine; other values unchanged.

    On a GPU: ``bf16`` where the GPU supports it. On a CPU: ``bf16`` only where its measured
    bf16 matmul peak beats the fp32 one by 20 % (CPUs with AVX-512 BF16 or AMX run bf16 2-3x
    faster than fp32; CPUs without them emulate it and run it several times slower).
    """
    if mixed_precision != "auto":
        return mixed_precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return cpu_precision()


def cpu_precision(threads: int | None = None) -> str:
    """What ``auto`` picks for training on this machine's CPU (``bf16`` or ``no``), whatever
    GPUs it has (the benchmarks that run on the CPU ask this), at ``threads`` (default: the
    current setting)."""
    cpu = torch.device("cpu")
    bf16, fp32 = peak_flops(cpu, torch.bfloat16, threads), peak_flops(cpu, torch.float32, threads)
    choice = "bf16" if bf16.flops > 1.2 * fp32.flops else "no"
    log.info("mixed_precision auto -> %s (bf16 %.0f vs fp32 %.0f GFLOP/s measured on %s)",
             choice, bf16.flops / 1e9, fp32.flops / 1e9, bf16.device_name)
    return choice
