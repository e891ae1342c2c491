"""Generation: the KV cache gives the tokens of full re-encoding, left-padded batches give each
prompt's own tokens, seeded sampling, the logits processors, stopping at end of text, and the
``lmcore generate`` command (prompts from arguments, a file or stdin; streamed or not)."""

from __future__ import annotations

import copy
import io
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_text

from lmcore.generate import (
    GenerationConfig,
    cache_length,
    TextStream,
    apply_repetition_penalty,
    generate,
    generate_ids,
    next_tokens,
    positions_of,
    stream,
    top_k_filter,
    top_p_filter,
)
from lmcore.model.decoder import Decoder, DecoderConfig, KVCache

VOCAB = 64
PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4], [60, 61, 62, 63, 0, 1]]


@pytest.fixture(autouse=True)
def seeded():
    """Every test draws its random inputs from the same seed, whatever ran before it on the worker."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: threads only add waiting on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def randomised(block: int = 32, **kw) -> Decoder:
    """A tiny model with large random weights: peaked, varied logits (an untrained model's are
    nearly flat and its greedy output one repeated token)."""
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=32, block_size=block, **kw))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.dim() > 1 else 1.0)
    return model.eval()


def greedy(n: int, **kw) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n, temperature=0, **kw)


def tokens(model, prompts, cfg, **kw) -> list[list[int]]:
    return [c.tokens for c in generate(model, prompts, cfg, **kw)]


# ---------------------------------------------------------------------------------------------
# the cache


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_cache_step_by_step_gives_the_full_forward_logits(kv_heads):
    model = randomised(n_kv_heads=kv_heads)
    x = torch.randint(0, VOCAB, (3, 12))
    with torch.no_grad():
        full, _ = model(x)
        cache = KVCache(model.cfg.block_size)
        steps = [model.next_token_logits(x[:, :5], cache=cache)]  # a prefill of 5, then one at a time
        steps += [model.next_token_logits(x[:, t : t + 1], cache=cache) for t in range(5, 12)]
    assert cache.length == 12
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 4:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_the_shape_static_decode_step_gives_the_logits_of_the_growing_cache(kv_heads):
    # a left-padded batch: the static step attends to every position of the cache under a key
    # mask (padding and unwritten positions off, its own key on) and writes at cache.at
    model = randomised(n_kv_heads=kv_heads)
    block = model.cfg.block_size
    x = torch.randint(1, VOCAB, (3, 12))
    real = torch.ones(3, 12, dtype=torch.bool)
    real[1, :3] = real[2, :6] = False
    positions = (real.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        growing, static = KVCache(block), KVCache(block)
        want = [model.next_token_logits(x[:, :5], positions=positions[:, :5], key_mask=real[:, :5], cache=growing)]
        got = [model.next_token_logits(x[:, :5], positions=positions[:, :5], key_mask=real[:, :5], cache=static)]
        mask = torch.zeros(3, block, dtype=torch.bool)
        mask[:, :5] = real[:, :5]
        for t in range(5, 12):
            want.append(model.next_token_logits(x[:, t : t + 1], positions=positions[:, t : t + 1],
                                                 key_mask=real[:, : t + 1], cache=growing))
            mask[:, t] = True
            static.at = torch.tensor([t])
            got.append(model.decode_step(x[:, t : t + 1], positions[:, t : t + 1], mask, static))
            static.at, static.length = None, static.length + 1
            mask[:, t] = real[:, t]
        for i in growing.keys:  # the same keys where written, zeros beyond
            assert torch.equal(static.keys[i][:, :, 12:], torch.zeros_like(static.keys[i][:, :, 12:]))
            torch.testing.assert_close(static.keys[i][:, :, :12], growing.keys[i][:, :, :12])
    torch.testing.assert_close(torch.stack(got, 1), torch.stack(want, 1), atol=1e-5, rtol=1e-5)


def test_the_compiled_decode_step_gives_the_eager_tokens_and_compiles_once_per_batch_size():
    from torch._dynamo.utils import counters

    model = randomised(n_kv_heads=2)
    free = tokens(model, PROMPTS, greedy(12))
    stop = free[1][4]  # row 1 stops early: its later tokens are padding, masked out
    eager = generate(model, PROMPTS, greedy(12), stop_id=stop)
    compiled = generate(model, PROMPTS, greedy(12, compile=True), stop_id=stop)
    assert [(c.tokens, c.stopped) for c in compiled] == [(c.tokens, c.stopped) for c in eager]
    assert compiled[1].stopped and not all(c.stopped for c in compiled)
    graphs = counters["stats"]["unique_graphs"]
    # the same batch size, another number of new tokens: no new graph
    assert tokens(model, PROMPTS, greedy(9, compile=True)) == [t[:9] for t in free]
    assert counters["stats"]["unique_graphs"] == graphs
    assert tokens(model, PROMPTS[:1], greedy(12, compile=True)) == free[:1]  # batch 1: its own graph
    assert counters["stats"]["unique_graphs"] == graphs + 1
    # another model of the same shape (a copy, other weights): the same graph, its own tokens
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-1.0)
    assert tokens(other, PROMPTS, greedy(12, compile=True)) == tokens(other, PROMPTS, greedy(12)) != free
    assert counters["stats"]["unique_graphs"] == graphs + 1
    # up to the last position of the cache, then the sliding window without it, as the eager loop
    small = randomised(block=16)
    assert tokens(small, PROMPTS, greedy(30, compile=True)) == tokens(small, PROMPTS, greedy(30))


def test_compiling_on_a_cpu_without_a_cxx_compiler_is_refused_with_a_clear_error(tmp_path):
    """inductor's CPU kernels are C++: where no compiler runs, the compiled decode step is refused
    up front (a StageError that says what to do), not with inductor's traceback at the first step."""
    import torch._inductor.config as inductor_config

    from lmcore.core.errors import StageError
    from lmcore.core.machine import cxx_compiler

    assert cxx_compiler() is not None  # this machine compiles (the test above ran compiled)
    with inductor_config.patch({"cpp.cxx": (None, str(tmp_path / "no-g++"))}):
        assert cxx_compiler() is None
        with pytest.raises(StageError, match=r"GenerationConfig.compile\): torch.compile builds its CPU kernels "
                                             r"with a C\+\+ compiler and none runs here .*apt-get install g\+\+"):
            generate(randomised(), PROMPTS, greedy(4, compile=True))
    assert cxx_compiler() is not None


def test_cache_refuses_more_than_it_holds():
    model = randomised(block=8)
    cache = KVCache(8)
    with torch.no_grad():
        model.next_token_logits(torch.zeros(1, 8, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="exceeds block_size 8"):
            model.next_token_logits(torch.zeros(1, 1, dtype=torch.long), cache=cache)
    small = KVCache(4)  # shorter than the context: its own limit
    with torch.no_grad():
        model.next_token_logits(torch.zeros(1, 4, dtype=torch.long), cache=small)
        with pytest.raises(ValueError, match=r"KV cache full: 4 \+ 1 positions exceed its 4"):
            model.next_token_logits(torch.zeros(1, 1, dtype=torch.long), cache=small)


def test_the_cache_holds_the_generation_not_the_whole_context():
    """A Llama folder's context of 131,072 positions made a KV cache of gigabytes at batch 1 for a
    short reply; the cache now holds the prompt and the new tokens (a power of two, >= 64)."""
    assert [cache_length(n, 131_072) for n in (1, 64, 65, 200, 256, 257)] == [64, 64, 128, 256, 256, 512]
    assert cache_length(300, 256) == 256 and cache_length(10, 32) == 32
    model = randomised(block=4096)
    made: list[KVCache] = []
    real_init = KVCache.__init__

    def spy(self, max_len):
        real_init(self, max_len)
        made.append(self)

    KVCache.__init__ = spy
    try:
        got = tokens(model, PROMPTS, greedy(8))
    finally:
        KVCache.__init__ = real_init
    assert [c.max_len for c in made] == [64]
    assert got == tokens(model, PROMPTS, greedy(8, use_cache=False))


def test_greedy_tokens_are_the_argmax_of_the_full_forward_step_by_step():
    """Independent of the cache, the positions and the padding: the plain forward of the whole
    sequence at every step (the cache-against-no-cache tests compare two paths that share them)."""
    model = randomised(n_kv_heads=2)
    for prompt in PROMPTS:
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(10):
                logits, _ = model(torch.tensor([seq]))
                seq.append(int(logits[0, -1].argmax()))
        assert tokens(model, [prompt], greedy(10)) == [seq[len(prompt):]]


def test_odd_inputs_are_errors_or_answers_not_crashes():
    model = randomised()
    with pytest.raises(ValueError, match="pad_id 64 is outside the model's vocabulary 0 .. 63"):
        generate(model, PROMPTS, greedy(3), pad_id=VOCAB)
    with pytest.raises(ValueError, match="pad_id -1"):
        generate(model, PROMPTS, greedy(3), pad_id=-1)
    # a tiny temperature is nearly greedy (it gave inf / inf = NaN probabilities)
    tiny = GenerationConfig(max_new_tokens=6, temperature=1e-40, top_k=None, seed=0)
    assert tokens(model, PROMPTS, tiny) == tokens(model, PROMPTS, greedy(6))
    with pytest.raises(ValueError, match=r"idx must be \(batch, tokens\), not of shape \(3,\)"):
        generate_ids(model, torch.tensor([1, 2, 3]), 4)
    empty = torch.zeros((0, 3), dtype=torch.long)
    assert generate_ids(model, empty, 4) is empty


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_greedy_with_the_cache_gives_exactly_the_tokens_without_it(kv_heads):
    model = randomised(n_kv_heads=kv_heads)
    cached = tokens(model, PROMPTS, greedy(20))
    assert cached == tokens(model, PROMPTS, greedy(20, use_cache=False))
    assert len({tuple(t) for t in cached}) == len(PROMPTS)  # the prompts lead to different texts
    assert all(len(set(t)) > 3 for t in cached)  # and not one repeated token
    for p in PROMPTS:  # one prompt at a time too
        assert tokens(model, [p], greedy(20)) == tokens(model, [p], greedy(20, use_cache=False))


def test_past_the_context_both_paths_slide_the_same_window(caplog):
    model = randomised(block=16)
    with caplog.at_level("WARNING", logger="lmcore.generate"):
        cached = tokens(model, PROMPTS, greedy(30))
    assert "without the KV cache" in caplog.text  # said once per call
    assert caplog.text.count("exceed the model's context") == 1
    assert [len(t) for t in cached] == [30] * len(PROMPTS)
    assert cached == tokens(model, PROMPTS, greedy(30, use_cache=False))
    long_prompt = [list(range(1, 21))]  # longer than the context from the start
    assert tokens(model, long_prompt, greedy(5)) == tokens(model, long_prompt, greedy(5, use_cache=False))


def test_a_long_generation_grows_its_buffers_and_a_huge_limit_allocates_nothing_up_front():
    """The token buffers were allocated for prompt + max_new_tokens at the start: a limit of 10^11
    asked for 800 GB before the first token (a traceback in the CLI)."""
    model = randomised(block=16)
    long = tokens(model, PROMPTS, greedy(150))  # past the first buffer (64 columns): doubled twice
    assert [len(t) for t in long] == [150] * len(PROMPTS)
    assert long == tokens(model, PROMPTS, greedy(150, use_cache=False))
    first = next(stream(model, PROMPTS, greedy(10**11)))  # one step of a practically endless generation
    assert len(first) == len(PROMPTS) and all(t is not None for t in first)


def test_a_left_padded_batch_gives_each_prompt_its_own_tokens():
    model = randomised(n_kv_heads=2)
    batch = tokens(model, PROMPTS, greedy(20))
    assert batch == [tokens(model, [p], greedy(20))[0] for p in PROMPTS]
    # the padding id does not matter: it is masked out
    assert tokens(model, PROMPTS, greedy(20), pad_id=17) == batch


def test_rows_of_one_length_decode_without_a_mask_until_one_stops():
    # equal prompts need no key mask; once a row stops, its later tokens are masked out and the
    # other rows go on exactly as they would alone
    model = randomised()
    prompts = [[1, 2, 3], [7, 8, 9], [60, 61, 62]]
    free = tokens(model, prompts, greedy(12))
    assert free == [tokens(model, [p], greedy(12))[0] for p in prompts]
    # a token of row 0 that stops it early and the others at least two tokens later, or never
    j, stop = next((j, t) for j, t in enumerate(free[0]) if t not in free[0][:j]
                   and all(t not in row[: j + 3] for row in free[1:]))
    assert j < 9
    done = generate(model, prompts, greedy(12), stop_id=stop)
    assert done[0].tokens == free[0][:j] and done[0].stopped
    for row, c in zip(free[1:], done[1:]):
        cut = row.index(stop) if stop in row else len(row)
        assert c.tokens == row[:cut]


def test_positions_start_at_each_rows_first_token():
    real = torch.tensor([[False, False, True, True], [True, True, True, True]])
    assert positions_of(real).tolist() == [[0, 0, 0, 1], [0, 1, 2, 3]]


# ---------------------------------------------------------------------------------------------
# sampling


def test_the_same_seed_gives_the_same_sample_and_another_seed_another():
    model = randomised()
    cfg = GenerationConfig(max_new_tokens=20, temperature=1.0, seed=7)
    a = tokens(model, PROMPTS, cfg)
    assert a == tokens(model, PROMPTS, cfg)
    assert a != tokens(model, PROMPTS, GenerationConfig(max_new_tokens=20, temperature=1.0, seed=8))
    assert a != tokens(model, PROMPTS, greedy(20))
    # the cache does not change what a seed samples
    assert a == tokens(model, PROMPTS, GenerationConfig(max_new_tokens=20, temperature=1.0, seed=7, use_cache=False))


def test_tiny_top_p_and_top_k_1_keep_only_the_argmax():
    logits = torch.randn(5, VOCAB)
    kept = torch.isfinite(top_p_filter(logits, 1e-6))
    assert kept.sum(1).tolist() == [1] * 5 and kept[torch.arange(5), logits.argmax(1)].all()
    kept_k = torch.isfinite(top_k_filter(logits, 1))
    assert torch.equal(kept_k, kept)
    model = randomised()
    want = tokens(model, PROMPTS, greedy(15))
    assert tokens(model, PROMPTS, GenerationConfig(max_new_tokens=15, temperature=1.5, top_p=1e-6, seed=3)) == want
    assert tokens(model, PROMPTS, GenerationConfig(max_new_tokens=15, temperature=1.5, top_k=1, seed=3)) == want


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([[0.2, 0.5, 0.3]]).log()  # probabilities 0.2, 0.5, 0.3
    kept = lambda p: torch.isfinite(top_p_filter(logits, p))[0].tolist()  # noqa: E731
    assert kept(0.4) == [False, True, False]
    assert kept(0.7) == [False, True, True]
    assert kept(0.9) == [True, True, True]
    assert kept(1.0) == [True, True, True]


def test_top_k_and_top_p_restrict_what_is_sampled():
    logits = torch.tensor([[0.1, 0.2, 0.3, 3.0, 2.5, 0.0]]).repeat(200, 1)
    gen = torch.Generator().manual_seed(0)
    k2 = next_tokens(logits, GenerationConfig(temperature=1.0, top_k=2), generator=gen)
    assert set(k2.tolist()) == {3, 4}
    p = next_tokens(logits, GenerationConfig(temperature=1.0, top_p=0.5), generator=gen)
    assert set(p.tolist()) == {3}


def test_repetition_penalty_lowers_the_probability_of_seen_tokens():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 1.0]]  # positive divided, negative multiplied, unseen kept
    before, after = logits.softmax(-1), out.softmax(-1)
    assert after[0, 0] < before[0, 0] and after[0, 1] < before[0, 1]
    assert after[0, 2] > before[0, 2] and after[0, 3] > before[0, 3]
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.0), logits)


def test_repetition_penalty_in_the_loop_repeats_less():
    model = randomised()
    plain = tokens(model, PROMPTS, greedy(30))
    penalised = tokens(model, PROMPTS, greedy(30, repetition_penalty=3.0))

    def repeats(rows: list[list[int]]) -> int:  # generated tokens already in the row's prompt or output
        return sum(t in p + r[:j] for p, r in zip(PROMPTS, rows) for j, t in enumerate(r))

    assert repeats(penalised) < repeats(plain)
    # greedy with the penalty: the cache still changes nothing
    assert penalised == tokens(model, PROMPTS, greedy(30, repetition_penalty=3.0, use_cache=False))


def test_rows_stop_at_end_of_text_and_stop_counting():
    model = randomised()
    free = tokens(model, PROMPTS, greedy(12))
    stop = free[1][4]  # row 1's fifth token
    assert stop not in free[1][:4]
    steps = list(stream(model, PROMPTS, greedy(12), stop_id=stop))
    done = generate(model, PROMPTS, greedy(12), stop_id=stop)
    assert done[1].tokens == free[1][:4] and done[1].stopped
    assert [s[1] for s in steps[:5]] == free[1][:5]  # the stop token is yielded once...
    assert all(s[1] is None for s in steps[5:])  # ...then nothing
    for row, c in zip(free, done):  # every row: its free run up to its first stop token
        cut = row.index(stop) if stop in row else len(row)
        assert c.tokens == row[:cut] and c.stopped == (stop in row)
    everyone = generate(model, [PROMPTS[1]] * 3, greedy(12), stop_id=stop)
    assert len(list(stream(model, [PROMPTS[1]] * 3, greedy(12), stop_id=stop))) == 5  # all stopped: the loop ends
    assert all(c.tokens == free[1][:4] for c in everyone)


def test_sampling_fields_are_defined_once():
    import argparse

    from lmcore.cli.generate import add_sampling_flags, settings
    from lmcore.config import EvaluateConfig, Sampling

    names = ["max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed"]
    assert list(Sampling.model_fields) == names
    assert list(GenerationConfig.model_fields) == names + ["use_cache", "compile"]
    for name in names:  # the same type, constraints and docstring everywhere
        f, g, e = Sampling.model_fields[name], GenerationConfig.model_fields[name], EvaluateConfig.model_fields[name]
        assert f.description and g.description == e.description == f.description
        assert repr(g.metadata) == repr(e.metadata) == repr(f.metadata)
    # the library's defaults (plain sampling) and evaluate's (params.yaml) differ only in their values
    lib, ev = GenerationConfig(), EvaluateConfig()
    assert (lib.max_new_tokens, lib.temperature, lib.top_k, lib.top_p, lib.repetition_penalty, lib.seed,
            lib.use_cache) == (64, 1.0, None, None, 1.0, None, True)
    assert (ev.max_new_tokens, ev.temperature, ev.top_k, ev.top_p, ev.repetition_penalty, ev.seed) == \
        (64, 0.8, 50, 1.0, 1.0, 1234)
    with pytest.raises(ValueError, match="evaluate.top_k"):
        from lmcore.config import from_dict

        from_dict({"evaluate": {"top_k": 0}})
    # the lmcore generate flags: one per field, typed and documented by it, evaluate's values as defaults
    p = argparse.ArgumentParser()
    add_sampling_flags(p)
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--compile", action="store_true")
    flags = {a.dest: a for a in p._actions if a.dest in names}
    assert list(flags) == names
    assert all(a.option_strings == ["--" + n.replace("_", "-")] for n, a in flags.items())
    assert flags["top_k"].type is int and flags["top_p"].type is float and flags["seed"].type is int
    assert "Nucleus sampling" in flags["top_p"].help and "evaluate.top_p" in flags["top_p"].help
    assert settings(p.parse_args([]), ev) == GenerationConfig(temperature=0.8, top_k=50, top_p=1.0, seed=1234)
    got = settings(p.parse_args(["--top-k", "0", "--seed", "3", "--no-cache"]), ev)
    assert (got.top_k, got.seed, got.temperature, got.use_cache, got.compile) == (None, 3, 0.8, False, False)
    assert settings(p.parse_args(["--compile"]), ev).compile
    with pytest.raises(Exception, match="--compile and --no-cache do not go together"):
        settings(p.parse_args(["--compile", "--no-cache"]), ev)
    with pytest.raises(ValueError, match="compile = True needs use_cache = True"):
        GenerationConfig(compile=True, use_cache=False)
    with pytest.raises(Exception, match=r"--temperature = -1.0 is invalid.*; --top-p = 2.0 is invalid"):
        settings(p.parse_args(["--temperature", "-1", "--top-p", "2"]), ev)


def test_settings_are_checked_by_name():
    for kw, name in ((dict(temperature=-1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_k=0), "top_k"),
                     (dict(repetition_penalty=0), "repetition_penalty")):
        with pytest.raises(ValueError, match=name):
            GenerationConfig(**kw)
    with pytest.raises(ValueError, match="prompt 1 has no tokens"):
        next(stream(randomised(), [[1], []]))
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        next(stream(randomised(), [[VOCAB]]))


def test_the_model_shortcut_keeps_its_behaviour():
    model = randomised()
    prompt = torch.tensor([PROMPTS[0]])
    out = generate_ids(model, prompt, 6, temperature=0)
    assert out[0, 3:].tolist() == tokens(model, [PROMPTS[0]], greedy(6))[0]
    a = generate_ids(model, prompt, 6, temperature=1.0, generator=torch.Generator().manual_seed(1))
    b = generate_ids(model, prompt, 6, temperature=1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# text and the command line


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tiny byte-level BPE tokenizer trained on ASCII text, and a random model of its vocabulary
    saved as ``runs/pretrain/final`` and ``data/tokenizer`` under a project root."""
    from lmcore.config import TokenizerConfig
    from lmcore.data import tokenizer as tokmod
    from lmcore.model.folder import save_decoder

    root = tmp_path_factory.mktemp("generate")
    rng = random.Random(0)
    cfg = TokenizerConfig(vocab_size=300)
    tok = tokmod.train(cfg, [make_text(rng, 200) for _ in range(20)])
    tokmod.save(tok, cfg, root / "data/tokenizer")
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(vocab_size=tok.get_vocab_size(), n_layer=2, n_head=2, n_embd=32, block_size=64))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2 if p.dim() > 1 else 1.0)
    save_decoder(model, root / "runs/pretrain/final")
    return root


def test_text_stream_prints_characters_split_across_tokens_whole(folder):
    from lmcore.data.tokenizer import load

    tok = load(folder / "data/tokenizer")
    text = " naïve 日本 — ok"
    ids = tok.encode(text).ids
    assert len(ids) > len(text.split())  # the non-ASCII characters come as single bytes
    s = TextStream(tok, tok.encode("The king").ids)
    pieces = [s.push(t) for t in ids]
    pieces.append(s.flush())
    assert "".join(pieces) == text == s.text()
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p) < len(ids)  # some bytes waited for the rest of their character


def lmcore_generate(root: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lmcore.cli", "--root", str(root), "generate",  # no params.yaml in root: defaults
           "--max-new-tokens", "24", "--temperature", "0.9", "--seed", "5", *args]
    return subprocess.run(cmd, cwd=root, input=stdin or "", capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"})


def test_cli_prompt_streamed_equals_not_streamed(folder):
    streamed = lmcore_generate(folder, "--prompt", "The king")
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout.startswith("The king") and len(streamed.stdout) > len("The king\n")
    assert "tokens/s, KV cache on, seed 5" in streamed.stderr
    whole = lmcore_generate(folder, "--prompt", "The king", "--no-stream", "--no-cache")
    assert whole.returncode == 0, whole.stderr
    assert whole.stdout == streamed.stdout
    assert "KV cache off" in whole.stderr
    greedy_eager = lmcore_generate(folder, "--prompt", "The king", "--temperature", "0")
    compiled = lmcore_generate(folder, "--prompt", "The king", "--temperature", "0", "--compile")
    assert compiled.returncode == 0, compiled.stderr
    assert compiled.stdout == greedy_eager.stdout
    assert "decode step compiled" in compiled.stderr and "decode step compiled" not in greedy_eager.stderr


def test_cli_prompts_from_a_file_and_from_stdin(folder):
    prompts = ["The king", "Love and war", "A"]
    (folder / "prompts.txt").write_text("\n".join(prompts) + "\n\n")
    from_file = lmcore_generate(folder, "--file", str(folder / "prompts.txt"))
    assert from_file.returncode == 0, from_file.stderr
    out = from_file.stdout
    assert out.startswith("==> 1/3 <==\nThe king")  # each text once complete, in prompt order
    assert out.index("\n\n==> 2/3 <==\nLove and war") < out.index("\n\n==> 3/3 <==\nA")
    assert "for 3 prompt(s)" in from_file.stderr
    from_stdin = lmcore_generate(folder, "--no-stream", stdin="\n".join(prompts) + "\n")
    assert from_stdin.returncode == 0, from_stdin.stderr
    assert from_stdin.stdout == out


def test_cli_batch_gives_each_prompt_its_text_alone(folder, tmp_path, capsys):
    from lmcore.cli import main

    (tmp_path / "defaults.yaml").write_text("{}\n")

    def run(*args: str) -> str:
        code = main(["--params", str(tmp_path / "defaults.yaml"), "--root", str(folder), "generate",
                     "--temperature", "0", "--max-new-tokens", "16", *args])
        out, err = capsys.readouterr()
        assert code == 0, err
        return out

    alone = run("--prompt", "The king")
    assert f"==> 1/2 <==\n{alone}\n==> 2/2 <==\nLove and war" in run("--prompt", "The king", "--prompt", "Love and war")
    # in batches of one (the memory of a thousand prompts): the same texts, in the same order
    three = ("--prompt", "The king", "--prompt", "Love and war", "--prompt", "A")
    assert run(*three, "--batch-size", "1") == run(*three) == run(*three, "--batch-size", "2")
    assert main(["--params", str(tmp_path / "defaults.yaml"), "--root", str(folder), "generate", "--prompt", "x",
                 "--batch-size", "0"]) == 2
    assert "--batch-size = 0: at least 1" in capsys.readouterr().err


def test_cli_errors_name_what_is_wrong(folder, tmp_path, capsys):
    from lmcore.cli import main

    (tmp_path / "defaults.yaml").write_text("{}\n")

    def run(*args: str, params: str = "defaults.yaml") -> tuple[int, str]:
        code = main(["--params", str(tmp_path / params), "--root", str(folder), "generate", *args])
        return code, capsys.readouterr().err

    code, err = run("--prompt", "x", params="none.yaml")  # named on the command line: it must exist
    assert code == 2 and err == f"lmcore generate: error: {tmp_path / 'none.yaml'}: params file not found\n"
    code, err = run("--model", str(tmp_path / "nothing"), "--prompt", "x")
    assert code == 2 and "nothing: no model folder here" in err
    code, err = run("--prompt", "x", "--top-p", "1.5")
    assert code == 2 and "--top-p = 1.5" in err
    if not torch.cuda.is_available():
        code, err = run("--prompt", "x", "--device", "cuda")
        assert code == 2 and "--device cuda: no CUDA device here" in err
    import torch._inductor.config as inductor_config

    with inductor_config.patch({"cpp.cxx": (None, str(tmp_path / "no-g++"))}):
        code, err = run("--prompt", "x", "--compile")
    assert code == 2 and err.startswith("lmcore generate: error: --compile: torch.compile builds its CPU kernels")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "ok"}) + "\n{oops\n")
    code, err = run("--file", str(tmp_path / "bad.jsonl"))
    assert code == 2 and "bad.jsonl: line 2: not valid JSON" in err
    (tmp_path / "params.yaml").write_text("evaluate:\n  top_p: 2\n")
    code = main(["--params", str(tmp_path / "params.yaml"), "--root", str(folder), "generate", "--prompt", "x"])
    assert code == 2 and "evaluate.top_p" in capsys.readouterr().err
    # a fine-tuned classifier, a truncated weights file: named, no traceback
    import shutil

    from lmcore.model.folder import read_config

    clf = tmp_path / "clf"
    shutil.copytree(folder / "runs/pretrain/final", clf)
    (clf / "config.json").write_text(json.dumps({**read_config(clf), "task": {"name": "sst2"}}))
    code, err = run("--model", str(clf), "--prompt", "x")
    assert code == 2 and f"{clf} holds a model fine-tuned on a task (a classifier), not a language model" in err
    cut = tmp_path / "cut"
    shutil.copytree(folder / "runs/pretrain/final", cut)
    with open(cut / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    code, err = run("--model", str(cut), "--prompt", "x")
    assert code == 2 and f"{cut / 'model.safetensors'}: cannot be loaded into the model its config.json" in err


def test_cli_jsonl_prompts_may_hold_newlines_and_params_give_the_defaults(folder, tmp_path, capsys, monkeypatch):
    from lmcore.cli import main

    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "ROMEO.\nThe king"}) + "\n" + json.dumps("A") + "\n")
    (tmp_path / "params.yaml").write_text("evaluate:\n  temperature: 0\n  max_new_tokens: 5\n")
    code = main(["--params", str(tmp_path / "params.yaml"), "--root", str(folder), "generate",
                 "--file", str(tmp_path / "p.jsonl"), "--no-stream"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith("==> 1/2 <==\nROMEO.\nThe king") and "\n\n==> 2/2 <==\nA" in out
    assert "seed 1234" in err  # evaluate.seed's default
    monkeypatch.setattr(sys, "stdin", io.StringIO("The king\n"))
    code = main(["--params", str(tmp_path / "params.yaml"), "--root", str(folder), "generate"])
    out2, _ = capsys.readouterr()
    assert code == 0 and out2.startswith("The king")


def test_a_llama_folders_own_end_of_text_stops_generation_not_its_first_special_token():
    """The first three special tokens were taken as end of text, padding and separator, true of
    lmcore's tokenizers only: a Llama tokenizer lists <unk>, <s>, </s>, so generation stopped at
    <unk> and never at </s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from lmcore.data.tokenizer import SpecialIds, special_ids

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(["a few words of text"] * 5, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    llama = {"model_type": "llama", "bos_token_id": 1, "eos_token_id": 2}
    assert special_ids(tok, llama).eot == tok.token_to_id("</s>") == 2
    assert special_ids(tok, llama).pad == 2  # no pad_token_id: the end of text
    assert special_ids(tok, {**llama, "eos_token_id": [2, 1], "pad_token_id": 0}) == SpecialIds(2, 0, 2)
    assert special_ids(tok, {**llama, "pad_token_id": -1}).pad == 2  # "none" in some conversions: not an id
    assert special_ids(tok).eot == 0  # lmcore's convention, for its own folders
    assert special_ids(tok, {"model": {"n_layer": 1}, "eos_token_id": 2}).eot == 0


def test_cli_sampling_without_a_seed_prints_the_seed_that_repeats_it(folder, capsys):
    from lmcore.cli import main

    args = ["--root", str(folder), "generate", "--prompt", "Once", "--max-new-tokens", "12", "--temperature", "1"]
    assert main(args) == 0
    first = capsys.readouterr()
    seed = re.search(r"seed (\d+)\)", first.err)
    assert seed, first.err
    assert main([*args, "--seed", seed.group(1)]) == 0
    assert capsys.readouterr().out == first.out
