"""Generation speed with and without the KV cache (``lmcore.generate``).

Generates ``--new-tokens`` tokens (default 200) after a ``--prompt-tokens`` prompt (default 16) of
random ids, for batches of 1 and 8, float32, sampling as the evaluate stage does (temperature 0.8,
top-k 50; no stop token, so every row makes all its tokens). The model is the default pipeline's
shape (preset ``small``: 4 layers, 4 heads, width 256, context 256, vocabulary 4096) with random
weights, or a trained model folder with ``--model``. The cases are interleaved in rounds (the
order rotates every round) so that a neighbour on the shared cores slows them alike; the table
gives the median over the rounds of generated tokens per second (all rows, prefill included) and
milliseconds per decoding step.

    python benchmarks/generate_bench.py
    python benchmarks/generate_bench.py --model runs/pretrain/final --rounds 5
    python benchmarks/generate_bench.py --batches 1 4 16 --new-tokens 100
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lmcore.config import MODEL_PRESETS  # noqa: E402
from lmcore.core.machine import cpu_flags, cpu_name  # noqa: E402
from lmcore.generate import GenerationConfig, generate  # noqa: E402
from lmcore.model.decoder import Decoder, DecoderConfig  # noqa: E402


def commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + (" + uncommitted" if git("status", "--porcelain", "--untracked-files=no") else "")


def load_model(folder: str | None, vocab: int) -> Decoder:
    if folder:
        from lmcore.model.folder import load_lm

        return load_lm(folder)[0]
    torch.manual_seed(0)
    return Decoder(DecoderConfig(vocab_size=vocab, **MODEL_PRESETS["small"])).float().eval()


def run(model: Decoder, batch: int, cache: bool, prompt_tokens: int, new_tokens: int, compile: bool = False) -> float:
    """Seconds to generate ``new_tokens`` for each of ``batch`` random prompts (``compile``: the
    compiled decode step, which needs ``cache``)."""
    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(0, model.cfg.vocab_size, (batch, prompt_tokens), generator=g).tolist()
    cfg = GenerationConfig(max_new_tokens=new_tokens, temperature=0.8, top_k=50, seed=0, use_cache=cache,
                           compile=compile)
    t0 = time.perf_counter()
    out = generate(model, prompts, cfg)
    seconds = time.perf_counter() - t0
    assert all(len(c.tokens) == new_tokens for c in out)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a model folder (default: the small preset with random weights)")
    ap.add_argument("--vocab", type=int, default=4096, help="vocabulary of the random model (default 4096)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, args.vocab)
    c = model.cfg
    if args.prompt_tokens + args.new_tokens > c.block_size:
        sys.exit(f"--prompt-tokens + --new-tokens = {args.prompt_tokens + args.new_tokens} exceeds the context "
                 f"{c.block_size}: the cached path would fall back to re-encoding; give fewer tokens")
    cases = [(b, cache) for b in args.batches for cache in (True, False)]
    for b, cache in cases:  # warm-up: a few tokens of each case
        run(model, b, cache, args.prompt_tokens, 4)
    times: dict[tuple[int, bool], list[float]] = {k: [] for k in cases}
    load = []
    for r in range(args.rounds):
        for b, cache in cases[r % len(cases):] + cases[: r % len(cases)]:
            times[(b, cache)].append(run(model, b, cache, args.prompt_tokens, args.new_tokens))
            print(f"round {r + 1}: batch {b}, cache {'on' if cache else 'off'}: {times[(b, cache)][-1]:.2f} s",
                  file=sys.stderr, flush=True)
        load.append(os.getloadavg()[0])

    print(f"Machine: {cpu_name()} ({cpu_flags()}), {os.cpu_count()} cores, {torch.get_num_threads()} torch threads; "
          f"torch {torch.__version__}; load average {min(load):.1f}-{max(load):.1f} during the rounds")
    print(f"Commit: {commit()}; date: {dt.date.today().isoformat()}")
    print(f"Command: python benchmarks/generate_bench.py {' '.join(sys.argv[1:])}".rstrip())
    what = args.model or f"random weights, {c.n_layer} layers x {c.n_head} heads x {c.n_embd}, context {c.block_size}"
    print(f"Model: {what}, vocabulary {c.vocab_size}, {model.num_params() / 1e6:.2f}M parameters, float32; "
          f"{args.prompt_tokens}-token prompts, {args.new_tokens} new tokens, temperature 0.8, top-k 50; "
          f"median of {args.rounds} rounds\n")
    print("| batch | KV cache | generated tokens/s | ms per step | speed-up |")
    print("|---|---|---|---|---|")
    for b in args.batches:
        off = statistics.median(times[(b, False)])
        for cache in (True, False):
            s = statistics.median(times[(b, cache)])
            print(f"| {b} | {'on' if cache else 'off'} | {b * args.new_tokens / s:,.0f} | "
                  f"{1000 * s / args.new_tokens:.1f} | {off / s:.1f}x |")


if __name__ == "__main__":
    main()
