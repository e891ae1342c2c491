"""The decoder's interchangeable kernels compute the same function, and the per-machine choice
between them is measured, cached and honoured."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lmcore.model.decoder import Decoder, DecoderConfig, causal_attention
from lmcore.model.kernels import attention_dtype, attention_kernel, measure_attention
from lmcore.model.reference import reference_forward


def qkv(B=2, H=4, KV=4, T=24, D=16, dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, H, T, D, generator=g).to(dtype).requires_grad_()
    k, v = (torch.randn(B, KV, T, D, generator=g).to(dtype).requires_grad_() for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("kv", [4, 2, 1], ids=["mha", "gqa2", "mqa"])
def test_matmul_attention_equals_sdpa_in_float32(kv):
    q, k, v = qkv(KV=kv)
    gy = torch.randn(q.shape, generator=torch.Generator().manual_seed(4))
    out = {}
    for kernel in ("sdpa", "matmul"):
        y = causal_attention(q, k, v, kernel)
        y.backward(gy)
        out[kernel] = (y.detach(), q.grad, k.grad, v.grad)
        q.grad = k.grad = v.grad = None
    for a, b, name in zip(out["matmul"], out["sdpa"], ("y", "dq", "dk", "dv")):
        assert b.abs().max() > 0.1
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5, msg=name)


def test_matmul_attention_in_bf16_is_as_close_to_float32_as_sdpa():
    q32, k32, v32 = qkv(T=64, D=32)
    gy = torch.randn(q32.shape, generator=torch.Generator().manual_seed(4))
    exact = causal_attention(q32, k32, v32, "sdpa")
    exact.backward(gy)
    exact_grads = (q32.grad, k32.grad, v32.grad)
    errs = {}
    for kernel in ("sdpa", "matmul"):
        q, k, v = (t.detach().bfloat16().requires_grad_() for t in (q32, k32, v32))
        y = causal_attention(q, k, v, kernel)
        assert y.dtype == torch.bfloat16
        y.backward(gy.bfloat16())
        errs[kernel] = max(float((a.float() - b).abs().max() / b.abs().max())
                           for a, b in zip((y, q.grad, k.grad, v.grad), (exact, *exact_grads)))
    assert errs["matmul"] < 2 * errs["sdpa"] + 1e-3, errs


def test_the_decoder_with_matmul_attention_equals_the_textbook_model():
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=96, n_layer=2, n_head=4, n_kv_heads=2, n_embd=64, block_size=32))
    model.use_attention("matmul")
    assert all(b.attn.kernel == "matmul" for b in model.blocks)
    x = torch.randint(0, 96, (3, 33), generator=torch.Generator().manual_seed(1))
    _, loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    g = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    _, ref = reference_forward(model, x[:, :-1], x[:, 1:])
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(g[n], p.grad, atol=1e-5, rtol=1e-4, msg=n)
    with pytest.raises(ValueError, match="attention kernel must be one of"):
        model.use_attention("flash")


def test_dropout_falls_back_to_sdpa():
    q, k, v = qkv()
    torch.manual_seed(0)
    a = causal_attention(q, k, v, "matmul", dropout=0.5)
    torch.manual_seed(0)
    b = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5, is_causal=True)
    torch.testing.assert_close(a, b)


CFG = DecoderConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=32, block_size=16)


def test_a_setting_other_than_auto_is_taken_as_is(tmp_path):
    cache = tmp_path / "kernels.json"
    assert attention_kernel(CFG, 2, 16, torch.float32, "cpu", "matmul", cache=cache) == "matmul"
    assert attention_kernel(CFG, 2, 16, torch.float32, "cpu", "sdpa", cache=cache) == "sdpa"
    assert not cache.exists()
    with pytest.raises(ValueError, match="'auto' or one of"):
        attention_kernel(CFG, 2, 16, torch.float32, "cpu", "flash", cache=cache)


def test_auto_measures_once_and_caches_per_shape(tmp_path):
    cache = tmp_path / "kernels.json"
    first = attention_kernel(CFG, 2, 16, torch.float32, "cpu", "auto", cache=cache)
    entries = json.loads(cache.read_text())
    (key, entry), = entries.items()
    assert first == entry["kernel"] and set(entry["ms"]) == {"sdpa", "matmul"}
    assert "T=16" in key and "float32" in key and f"torch={torch.__version__}" in key
    # the cache is what later runs read: an entry saying otherwise is obeyed
    entry["kernel"] = "matmul" if first == "sdpa" else "sdpa"
    cache.write_text(json.dumps(entries))
    assert attention_kernel(CFG, 2, 16, torch.float32, "cpu", "auto", cache=cache) == entry["kernel"]
    # another shape is measured anew
    attention_kernel(CFG, 2, 8, torch.float32, "cpu", "auto", cache=cache)
    assert len(json.loads(cache.read_text())) == 2


def test_auto_keeps_sdpa_where_matmul_would_keep_too_much_memory(tmp_path):
    big = DecoderConfig(vocab_size=64, n_layer=12, n_head=12, n_embd=768, block_size=1024)
    cache = tmp_path / "kernels.json"
    assert attention_kernel(big, 16, 1024, torch.bfloat16, "cpu", "auto", cache=cache) == "sdpa"
    assert not cache.exists()  # decided without measuring
    assert attention_kernel(big, 16, 1024, torch.bfloat16, "cpu", "matmul", cache=cache) == "matmul"  # asked for


def test_measurement_times_every_kernel():
    times = measure_attention(CFG, 2, 16, torch.float32, reps=1, rounds=1)
    assert set(times) == {"sdpa", "matmul"} and all(0 < t < 5 for t in times.values())


def test_attention_dtype_follows_the_precision():
    assert attention_dtype("no", "cpu") == torch.float32
    assert attention_dtype("fp16", "cuda") == torch.float16
    assert attention_dtype("bf16", "cuda") == torch.bfloat16


def test_tune_malloc_keeps_large_blocks_in_a_fresh_process():
    """In a process with glibc's own malloc, tune_malloc reports the tuning, and a 32 MiB buffer
    allocated and freed again and again stops being page-faulted in anew each time (glibc's
    defaults: 8,192 minor faults, 4 KiB pages, at every allocation)."""
    code = """
import resource, torch
from lmcore.core.machine import tune_malloc
def faults():  # minor page faults of each of 12 allocations of the same 32 MiB result
    x, out = torch.ones(2048, 4096), []
    for _ in range(12):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        y = x * 2.0
        del y
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return out
plain = faults()
print(tune_malloc())
print(*plain)
print(*faults())
"""
    lines = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    name, plain, tuned = lines[0], [int(v) for v in lines[1].split()], [int(v) for v in lines[2].split()]
    if name != "glibc (tuned)":
        pytest.skip(f"allocator here: {name}")
    assert min(plain[-4:]) > 4000, plain  # every allocation faults its pages in again
    assert sum(tuned[-4:]) <= 8192 + 100, tuned  # the freed block is reused (at most one refill)
