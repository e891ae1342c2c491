"""Peak FLOP/s (measured and cached on CPU, looked up for known GPUs) and MFU."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import torch

from lmcore.core.machine import cpu_name
from lmcore.train import flops
from lmcore.train.flops import Peak, dtype_of, mfu, peak_flops, table_peak

CPU = torch.device("cpu")
SMALL = {"size": 256, "budget": 0.1}  # a tiny probe: tests stay fast; real runs use 2048 x 2048


def test_dtype_of():
    assert dtype_of("bf16") is torch.bfloat16
    assert dtype_of("fp16") is torch.float16
    assert dtype_of("no") is torch.float32
    with pytest.raises(ValueError, match="mixed_precision"):
        dtype_of("fp8")


def test_cpu_probe_is_plausible_and_cached(tmp_path: Path):
    cache = tmp_path / "peak_flops.json"
    first = peak_flops(CPU, torch.float32, threads=1, cache=cache, **SMALL)
    assert first.source == "measured" and first.dtype == "float32" and first.device_name == cpu_name()
    # one core of anything that runs torch: between 0.1 GFLOP/s and 10 TFLOP/s
    assert 1e8 < first.flops < 1e13

    entries = json.loads(cache.read_text())
    assert len(entries) == 1
    (key, entry), = entries.items()
    assert entry["flops"] == first.flops
    assert entry["device_name"] == cpu_name() and entry["dtype"] == "float32" and entry["threads"] == 1
    assert entry["torch"] == torch.__version__
    assert cpu_name() in key and "float32" in key and "threads=1" in key and torch.__version__ in key

    def no_probe(*args, **kwargs):
        raise AssertionError("the second call should read the cache, not probe")

    with pytest.MonkeyPatch.context() as mp:  # read from the cache: no probe at all (no timing needed)
        mp.setattr(flops, "measure_peak", no_probe)
        second = peak_flops(CPU, torch.float32, threads=1, cache=cache, **SMALL)
    assert second == first


def test_refresh_keeps_the_highest_measurement(tmp_path: Path):
    """A probe slowed by other work must not replace a better one; a faster one does."""
    cache = tmp_path / "peak_flops.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(flops, "measure_peak", lambda *a, **k: 5e10)
        assert peak_flops(CPU, torch.float32, threads=1, cache=cache, **SMALL).flops == 5e10
        mp.setattr(flops, "measure_peak", lambda *a, **k: 2e10)  # a busy machine
        assert peak_flops(CPU, torch.float32, threads=1, cache=cache, **SMALL).flops == 5e10  # cached
        assert peak_flops(CPU, torch.float32, threads=1, cache=cache, refresh=True, **SMALL).flops == 5e10
        mp.setattr(flops, "measure_peak", lambda *a, **k: 9e10)
        assert peak_flops(CPU, torch.float32, threads=1, cache=cache, refresh=True, **SMALL).flops == 9e10
    (entry,) = json.loads(cache.read_text()).values()
    assert entry["flops"] == 9e10


def test_cache_entries_per_dtype_and_threads(tmp_path: Path):
    cache = tmp_path / "peak_flops.json"
    fp32 = peak_flops(CPU, torch.float32, threads=1, cache=cache, **SMALL)
    bf16 = peak_flops(CPU, torch.bfloat16, threads=1, cache=cache, **SMALL)
    assert bf16.dtype == "bfloat16" and bf16.flops > 0
    entries = json.loads(cache.read_text())
    assert len(entries) == 2
    assert {e["dtype"] for e in entries.values()} == {"float32", "bfloat16"}
    assert {e["flops"] for e in entries.values()} == {fp32.flops, bf16.flops}
    # a doctored entry is what comes back: the cache, not a new probe, answers
    key = next(k for k, e in entries.items() if e["dtype"] == "bfloat16")
    entries[key]["flops"] = 123.0e9
    cache.write_text(json.dumps(entries))
    assert peak_flops(CPU, torch.bfloat16, threads=1, cache=cache, **SMALL).flops == 123.0e9
    # another thread count is another entry (and the caller's thread setting is restored: set to 1
    # first, or on a 2-core machine the probe at 2 threads would change nothing to restore)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        peak_flops(CPU, torch.float32, threads=2, cache=cache, **SMALL)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert len(json.loads(cache.read_text())) == 3


def test_default_cache_follows_lmcore_cache(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("LMCORE_CACHE", str(tmp_path))
    assert flops.default_cache() == tmp_path / "peak_flops.json"
    peak_flops(CPU, torch.float32, threads=1, **SMALL)
    assert (tmp_path / "peak_flops.json").exists()


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe{}"])  # the second: not UTF-8 (it crashed)
def test_unreadable_cache_is_measured_again(tmp_path: Path, content: bytes):
    cache = tmp_path / "peak_flops.json"
    cache.write_bytes(content)
    assert peak_flops(CPU, torch.float32, threads=1, cache=cache, **SMALL).flops > 0
    assert len(json.loads(cache.read_text())) == 1


def test_slow_dtype_probe_stays_short(monkeypatch):
    """fp16 matmuls on CPUs without native fp16 run at ~1 GFLOP/s: the probe must stop growing the
    matrix once a product takes over budget / 20, and stop repeating once the budget is spent, not
    take minutes at 2048. A clock of its own: each product "takes" 2 n^3 / 1 GFLOP/s."""
    import types

    clock, sizes = [0.0], []

    def mm(a, b, out=None):
        sizes.append(a.shape[0])
        clock[0] += 2 * a.shape[0] ** 3 / 1e9
        return out

    monkeypatch.setattr(flops, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(torch, "mm", mm)
    assert flops.measure_peak(CPU, torch.float16, size=2048, budget=0.2) == pytest.approx(1e9)
    assert max(sizes) == 256  # 34 ms at 256 is over 0.2 / 20: no larger matrix
    assert clock[0] < 0.2 + 3 * 0.034  # the budget, and the warm-up and first products beyond it


@pytest.mark.cuda
@pytest.mark.parametrize("name, dtype, expected", [
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12),
    ("NVIDIA A100-PCIE-40GB", torch.float16, 312e12),
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4e12),
    ("NVIDIA H100 PCIe", torch.bfloat16, 756e12),
    ("NVIDIA H100 NVL", torch.bfloat16, 835e12),
    ("NVIDIA H200", torch.bfloat16, 989.4e12),
    ("NVIDIA H200 NVL", torch.bfloat16, 835e12),
    ("NVIDIA L4", torch.bfloat16, 121e12),
    ("NVIDIA L40S", torch.bfloat16, 362.05e12),
    ("NVIDIA A10", torch.bfloat16, 125e12),
    ("NVIDIA GeForce RTX 4090", torch.bfloat16, 165.2e12),
    ("NVIDIA GeForce RTX 3090", torch.bfloat16, 71e12),
    ("Tesla V100-SXM2-16GB", torch.float16, 125e12),
    ("Tesla V100-PCIE-32GB", torch.float16, 112e12),
    ("Tesla T4", torch.float16, 65e12),
    # no table figure: measured instead
    ("Tesla V100-SXM2-16GB", torch.bfloat16, None),   # no bf16 tensor cores
    ("NVIDIA A100-SXM4-80GB", torch.float32, None),   # fp32 is always measured
    ("NVIDIA A10G", torch.bfloat16, None),            # no vendor datasheet
    ("NVIDIA GeForce RTX 3090 Ti", torch.bfloat16, None),
    ("NVIDIA GeForce RTX 4090 Laptop GPU", torch.bfloat16, None),
    ("Some Future GPU 9000", torch.bfloat16, None),
])
def test_table_lookup(name, dtype, expected):
    assert table_peak(name, dtype) == expected


@pytest.mark.cuda
def test_known_gpu_uses_the_table(monkeypatch, tmp_path: Path):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    peak = peak_flops(torch.device("cuda", 0), torch.bfloat16, cache=tmp_path / "c.json")
    assert peak == Peak(312e12, "table", "NVIDIA A100-SXM4-80GB", "bfloat16")
    assert not (tmp_path / "c.json").exists()


def test_mfu(caplog, monkeypatch):
    monkeypatch.setattr(flops, "_warned_over_peak", False)
    peak = Peak(100e9, "measured", "cpu", "bfloat16")
    assert mfu(1000.0, 25e6, peak) == pytest.approx(0.25)  # 1000 tok/s x 25 MFLOP = 25 GFLOP/s of 100
    assert mfu(0.0, 25e6, peak) == 0.0
    with caplog.at_level(logging.WARNING, logger="lmcore.train.flops"):
        assert mfu(10_000.0, 25e6, peak) == 1.0  # 250 GFLOP/s "achieved": capped
        assert mfu(20_000.0, 25e6, peak) == 1.0
    assert len([r for r in caplog.records if "underestimated" in r.getMessage()]) == 1  # warned once
    with pytest.raises(ValueError):
        mfu(1.0, 1.0, Peak(0.0, "measured", "cpu", "float32"))


def test_processes_probing_at_once_measure_once_and_agree(tmp_path: Path, monkeypatch):
    """The processes of one launch resolve mixed_precision: auto each on its own: on an empty
    cache they probed at once, slowed each other and could read different peaks (and pick
    different precisions). One measures, the others wait and read its result."""
    import threading

    calls = []

    def slow_probe(device, dtype, size, budget):
        calls.append(dtype)
        time.sleep(0.5)
        return 1e9 * len(calls)  # a second probe would read another peak

    monkeypatch.setattr(flops, "measure_peak", slow_probe)
    cache, got = tmp_path / "peak_flops.json", []
    threads = [threading.Thread(target=lambda: got.append(peak_flops(CPU, torch.float32, threads=1, cache=cache,
                                                                      **SMALL).flops)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [torch.float32] and got == [1e9, 1e9]
