from __future__ import annotations

import pytest
import torch

import lmcore.model.decoder as model_module
from lmcore.generate import generate_ids
from lmcore.model.decoder import Decoder, DecoderConfig
from lmcore.model.llama import hf_name
from lmcore.model.reference import reference_forward


@pytest.fixture(autouse=True)
def seeded():
    """Every test draws its random inputs from the same seed, whatever ran before it on the worker."""
    torch.manual_seed(0)


def tiny(**kw) -> Decoder:
    torch.manual_seed(0)
    return Decoder(DecoderConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=32, block_size=16, **kw))


def test_causal_mask_future_tokens_do_not_change_past_logits():
    model = tiny().eval()
    x = torch.randint(0, 64, (2, 16))
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 7) % 64
    with torch.no_grad():
        a, _ = model(x)
        b, _ = model(y)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-5)
    assert not torch.allclose(a[:, 10:], b[:, 10:], atol=1e-3)


def test_overfits_one_batch():
    model = tiny()
    x = torch.randint(0, 64, (4, 17))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        _, loss = model(x[:, :-1], x[:, 1:])
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 3.5 and float(loss.detach()) < 0.1


def test_tied_embeddings_and_counts():
    model = tiny()
    assert model.lm_head.weight is model.embed.weight
    untied = tiny(tie_embeddings=False)
    assert untied.num_params() - model.num_params() == 64 * 32
    assert model.flops_per_token() > 6 * model.num_params(embeddings=False)


def test_ignore_index_and_sum_reduction():
    model = tiny().eval()
    x = torch.randint(0, 64, (2, 9))
    t = x[:, 1:].clone()
    t[0, :4] = -100
    with torch.no_grad():
        _, s = model(x[:, :-1], t, reduction="sum")
        _, m = model(x[:, :-1], t)
    assert torch.allclose(s / (t != -100).sum(), m, atol=1e-5)


def test_greedy_generation_is_deterministic_and_stops_at_eot():
    model = tiny().eval()
    prompt = torch.tensor([[1, 2, 3]])
    a = generate_ids(model, prompt, 5, temperature=0)
    b = generate_ids(model, prompt, 5, temperature=0)
    assert torch.equal(a, b) and a.shape == (1, 8)
    eot = int(a[0, 3])
    c = generate_ids(model, prompt, 5, temperature=0, eot_id=eot)
    assert c.shape == (1, 4)


# ---------------------------------------------------------------------------------------------
# the fast training step computes the textbook model (lmcore.model.reference)


def randomised(**kw) -> Decoder:
    """A small model with every parameter random (norm weights too, so that their folding into
    the next matmul is exercised)."""
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(**{"vocab_size": 96, "n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 32, **kw}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    return model


def grads(model: Decoder, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def batch(vocab: int = 96, B: int = 3, T: int = 32):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, vocab, (B, T + 1), generator=g)
    y = x[:, 1:].clone()
    y[0, :5] = -100
    return x[:, :-1], y


@pytest.mark.parametrize("shape", [{"n_kv_heads": 2}, {"tie_embeddings": False, "rope_theta": 500.0}],
                         ids=["gqa2-tied", "mha-untied"])
def test_the_textbook_model_is_hugging_face_llama(shape):
    """The oracle itself: the same logits and loss as transformers' LlamaForCausalLM holding the
    same weights."""
    transformers = pytest.importorskip("transformers")
    model = randomised(**shape)
    c = model.cfg
    hf_cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.mlp_hidden, num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head, num_key_value_heads=c.kv_heads, max_position_embeddings=c.block_size,
        rms_norm_eps=1e-5, rope_theta=c.rope_theta, tie_word_embeddings=c.tie_embeddings, attention_bias=False,
        mlp_bias=False, attn_implementation="eager")
    hf = transformers.LlamaForCausalLM(hf_cfg).float().eval()
    state = {hf_name(k): v for k, v in model.state_dict().items() if hf_name(k)}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all(k == "lm_head.weight" or "rotary" in k for k in missing), (missing, unexpected)
    x, y = batch()
    with torch.no_grad():
        logits, loss = reference_forward(model, x, y)
        theirs = hf(input_ids=x).logits
    assert logits.abs().max() > 1.0  # random weights: far from zero
    torch.testing.assert_close(theirs, logits, atol=1e-4, rtol=1e-5)
    ref_loss = torch.nn.functional.cross_entropy(theirs.reshape(-1, theirs.size(-1)), y.reshape(-1))
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("shape", [{}, {"n_kv_heads": 2}, {"n_kv_heads": 1}, {"tie_embeddings": False}],
                         ids=["mha", "gqa2", "mqa", "untied"])
def test_fast_step_equals_the_textbook_model_in_float32(shape):
    model = randomised(**shape)
    x, y = batch()
    logits, loss = model(x, y)
    g = grads(model, loss)
    ref_logits, ref_loss = reference_forward(model, x, y)
    ref_g = grads(model, ref_loss)
    torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-6)
    for name in ref_g:
        torch.testing.assert_close(g[name], ref_g[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("emulate", [False, True], ids=["native-bf16-path", "emulated-bf16-path"])
def test_fast_step_under_bf16_autocast_is_as_close_to_float32_as_the_textbook_model(monkeypatch, emulate):
    """Both bf16 paths (a CPU with bf16 instructions, and the float32 emulation used without
    them) stay as close to the float32 result as the textbook model under autocast does."""
    monkeypatch.setattr(model_module, "X86_WITHOUT_BF16", emulate)
    model = randomised(n_kv_heads=2)
    x, y = batch()
    ref_logits, ref_loss = reference_forward(model, x, y)
    ref_g = grads(model, ref_loss)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(x, y)
        tb_logits, tb_loss = reference_forward(model, x, y)
    assert logits.dtype == tb_logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    g, tb_g = grads(model, loss), grads(model, tb_loss)

    def err(a, b):
        return float((a.detach().float() - b.detach().float()).abs().max() / b.detach().float().abs().max())

    assert err(logits, ref_logits) < 3 * err(tb_logits, ref_logits) + 1e-3
    assert abs(float(loss.detach() - ref_loss.detach())) < 3 * abs(float(tb_loss.detach() - ref_loss.detach())) + 2e-3
    for name in ref_g:
        assert err(g[name], ref_g[name]) < 3 * err(tb_g[name], ref_g[name]) + 5e-3, name


def test_emulated_bf16_linear_matches_the_bf16_gemm():
    x = torch.randn(64, 96)
    w = torch.randn(80, 96)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gemm = torch.nn.functional.linear(x, w)
        with torch.autocast("cpu", enabled=False):
            emulated = torch.nn.functional.linear(x.bfloat16().float(), w.bfloat16().float()).bfloat16()
    # the same rounded operands, float32 accumulation: at most one bf16 rounding step apart
    assert ((gemm.float() - emulated.float()).abs() <= gemm.float().abs() * 2**-7 + 1e-6).all()


def test_linear_emulates_only_under_bf16_autocast(monkeypatch):
    monkeypatch.setattr(model_module, "X86_WITHOUT_BF16", True)
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    assert model_module.linear(x, w).dtype == torch.float32
    torch.testing.assert_close(model_module.linear(x, w), x @ w.T)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model_module.linear(x, w)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), x.bfloat16().float() @ w.bfloat16().float().T, atol=0.02, rtol=0.01)


def test_paired_rope_leaves_attention_scores_unchanged():
    """Reordering q and k rows into rotary pairs, then rotating as complex numbers, gives the same
    q.k as "rotate half" RoPE on the original layout."""
    heads, D, T, C = 3, 16, 10, 24
    wq, wk = torch.randn(heads * D, C), torch.randn(heads * D, C)
    x = torch.randn(2, T, C)
    cos, sin = model_module.rope_cache(T, D, 10000.0)
    rot = torch.complex(cos, sin)[:, None]
    q = model_module.apply_rope((x @ model_module.pair_rows(wq, heads).T).view(2, T, heads, D), rot)
    k = model_module.apply_rope((x @ model_module.pair_rows(wk, heads).T).view(2, T, heads, D), rot)
    c2, s2 = torch.cat([cos, cos], -1)[:, None], torch.cat([sin, sin], -1)[:, None]

    def rotate_half(t):
        return t * c2 + torch.cat([-t[..., D // 2 :], t[..., : D // 2]], -1) * s2

    q_ref, k_ref = rotate_half((x @ wq.T).view(2, T, heads, D)), rotate_half((x @ wk.T).view(2, T, heads, D))
    scores = torch.einsum("bthd,bshd->bhts", q, k)
    torch.testing.assert_close(scores, torch.einsum("bthd,bshd->bhts", q_ref, k_ref), atol=1e-4, rtol=1e-5)


def test_rope_on_real_pairs_equals_the_complex_multiply_and_is_what_compile_traces():
    # the real form (cos, sin pairs) is what `rotation` gives inside torch.compile: the same
    # rotation, forward and backward
    T, heads, D = 10, 3, 16
    cos, sin = model_module.rope_cache(T, D, 10000.0)
    x = torch.randn(2, T, heads, D, requires_grad=True)
    g = torch.randn(2, T, heads, D)
    complex_rot, real_rot = torch.complex(cos, sin)[:, None], torch.stack((cos, sin), -1)[:, None]
    assert model_module.rotation(cos, sin).is_complex()
    out = []
    for rot in (complex_rot, real_rot):
        y = model_module.apply_rope(x, rot)
        (dx,) = torch.autograd.grad(y, x, g)
        out.append((y, dx))
    torch.testing.assert_close(out[1], out[0], atol=1e-6, rtol=1e-6)
    traced = torch.compile(lambda c, s: model_module.rotation(c, s), backend="eager", fullgraph=True)(cos, sin)
    assert not traced.is_complex() and traced.shape == (T, D // 2, 2)
    torch.testing.assert_close(traced, torch.stack((cos, sin), -1))


def test_rms_normalize_backward():
    x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: model_module._RMSNormalize.apply(t, 1e-5), (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_equals_torch(dtype, reduction):
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(50, 33, generator=g)).to(dtype).requires_grad_()
    targets = torch.randint(0, 33, (50,), generator=g)
    targets[::7] = -100
    ours = model_module.cross_entropy(logits, targets, reduction=reduction)
    (go,) = torch.autograd.grad(ours.sum(), logits)
    ref = F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction=reduction)
    (gr,) = torch.autograd.grad(ref.sum(), logits)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(go, gr, atol=1e-6 if dtype == torch.float32 else 4e-3, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_of_a_target_far_below_the_maximum_is_exact(dtype):
    # a probability far below float32's smallest (exp(-300)): the loss is still the log-softmax's
    import torch.nn.functional as F

    logits = torch.zeros(3, 8, dtype=dtype)
    logits[:, 2] = 150.0
    logits[1, 5] = -150.0
    targets = torch.tensor([5, 5, 2])
    ours = model_module.cross_entropy(logits, targets, reduction="none")
    ref = F.cross_entropy(logits.float(), targets, reduction="none")
    assert ref[1] > 299 and torch.isfinite(ours).all()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-6)


def test_cross_entropy_backward_gradcheck():
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 4, -100, 2, 2, 1])
    assert torch.autograd.gradcheck(lambda z: model_module.cross_entropy(z, targets), (logits,))


def test_hidden_states_and_the_head_give_forward_logits():
    model = randomised(n_kv_heads=2).eval()
    x, _ = batch()
    with torch.no_grad():
        logits, _ = model(x)
        h = model.hidden_states(x)
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
        h_masked = model.hidden_states(x, attn_mask=mask)
    torch.testing.assert_close(model.lm_head(h), logits, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(h_masked, h, atol=1e-5, rtol=1e-5)


def test_parameter_names_stay_llama_compatible():
    names = set(dict(tiny(n_kv_heads=1).named_parameters()))
    assert names == {"embed.weight", "norm.weight"} | {
        f"blocks.{i}.{p}.weight" for i in range(2)
        for p in ("attn_norm", "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
                  "mlp_norm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}


def test_a_model_cast_to_bfloat16_still_runs():
    model = randomised(n_kv_heads=2)
    x, y = batch()
    with torch.no_grad():
        logits, loss = model(x, y)
        logits16, loss16 = model.to(torch.bfloat16)(x, y)
    assert logits16.dtype == torch.bfloat16 and loss16.dtype == torch.float32
    assert abs(float(loss16) - float(loss)) < 0.05 * float(loss)


# ---------------------------------------------------------------------------------------------
# CPU-only paths are decided by the tensor's device (no GPU needed to check it)


@pytest.mark.cuda
@pytest.mark.parametrize("x86_without_bf16", [False, True])
def test_bf16_emulation_and_cpu_kernels_are_for_cpu_devices_only(monkeypatch, x86_without_bf16):
    monkeypatch.setattr(model_module, "X86_WITHOUT_BF16", x86_without_bf16)
    assert model_module.emulates_bf16(torch.device("cpu")) is x86_without_bf16
    assert model_module.emulates_bf16("cpu") is x86_without_bf16
    assert model_module.uses_cpu_kernels(torch.device("cpu"))
    for device in (torch.device("cuda"), torch.device("cuda", 1), "cuda:0", torch.device("meta"), "mps", "xpu"):
        assert not model_module.emulates_bf16(device), device
        assert not model_module.uses_cpu_kernels(device), device
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model_module.emulating_bf16(torch.empty(2, 3)) is x86_without_bf16
        assert not model_module.emulating_bf16(torch.empty(2, 3, device="meta"))


@pytest.mark.cuda
def test_a_model_off_the_cpu_takes_none_of_the_cpu_paths(monkeypatch):
    """A model on another device (meta here: the stand-in for CUDA on a machine without one) runs
    neither the bf16 emulation nor the hand-written RMSNorm, even on a CPU that would emulate and
    inside CPU bf16 autocast: its matmuls stay in the tensors' dtype (the emulation would return
    bf16) and the norm is F.rms_norm."""
    monkeypatch.setattr(model_module, "X86_WITHOUT_BF16", True)

    def cpu_kernel(*args):
        raise AssertionError("the hand-written CPU RMSNorm ran on a non-CPU tensor")

    monkeypatch.setattr(model_module._RMSNormalize, "apply", cpu_kernel)
    cfg = DecoderConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_heads=2, n_embd=32, block_size=16)
    with torch.device("meta"):
        model = Decoder(cfg)
        x = torch.randint(0, 64, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(x, x)
    assert logits.device.type == "meta" and logits.dtype == torch.float32
    loss.backward()
    assert model.blocks[0].attn.q_proj.weight.grad.device.type == "meta"
    with pytest.raises(AssertionError, match="hand-written"):  # the same model on the CPU does use it
        tiny()(torch.randint(0, 64, (1, 4)))


def test_causal_masks_of_many_lengths_are_not_all_kept():
    """Fine-tuning pads each batch to its own longest example: one mask per length was kept for
    the life of the process (~0.7 GB of bf16 masks up to 1,024)."""
    from lmcore.model import decoder

    decoder._causal_bias.clear()
    for T in range(10, 30):
        bias = decoder.causal_bias(T, torch.float32, torch.device("cpu"))
        assert bias.shape == (T, T) and bias[0, 1] == float("-inf") and bias[1, 0] == 0
    assert len(decoder._causal_bias) == decoder.CAUSAL_BIASES_KEPT
    assert decoder.causal_bias(29, torch.float32, torch.device("cpu")) is bias  # the recent ones are reused
    decoder.causal_bias(26, torch.float32, torch.device("cpu"))  # 26 used again: 27 is now the oldest
    decoder.causal_bias(5, torch.float32, torch.device("cpu"))
    assert [k[0] for k in decoder._causal_bias] == [28, 29, 26, 5]
