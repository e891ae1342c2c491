from __future__ import annotations

import torch

from lmcore.model import GPT, GPTConfig


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=32, block_size=16, **kw))


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
    a = model.generate(prompt, 5, temperature=0)
    b = model.generate(prompt, 5, temperature=0)
    assert torch.equal(a, b) and a.shape == (1, 8)
    eot = int(a[0, 3])
    c = model.generate(prompt, 5, temperature=0, eot_id=eot)
    assert c.shape == (1, 4)
