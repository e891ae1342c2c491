"""Greedy generation: lmcore's ``generate`` on a trained model folder against ``transformers``'
``LlamaForCausalLM.generate`` on the same model exported by the export stage.

Both decode greedily with their KV caches, float32, from the same random prompts, for a fixed
number of new tokens (no stop token). The cases are interleaved in rounds; the table gives the
median tokens/s (all rows, prefill included) and how many rows produced the same tokens.

``--compile`` adds lmcore with ``GenerationConfig(compile=True)`` (the decode step compiled by
``torch.compile``); its compilation happens in the untimed warm-up and is reported apart, and
transformers is then also run with its static cache compiled (``cache_implementation="static"``,
``compile_config``), the same kind of peer.

    python benchmarks/generate_vs_hf.py --model runs/pretrain/final --export runs/export
    python benchmarks/generate_vs_hf.py --model ... --export ... --batches 1 8 --new-tokens 200 --rounds 5
    python benchmarks/generate_vs_hf.py --model ... --export ... --compile
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmcore.core.machine import cpu_flags, cpu_name, git_commit  # noqa: E402
from lmcore.generate import GenerationConfig, generate  # noqa: E402
from lmcore.model.folder import load_decoder  # noqa: E402


def lmcore_run(model, ids: torch.Tensor, n: int, compile: bool = False) -> tuple[float, list[list[int]]]:
    cfg = GenerationConfig(max_new_tokens=n, temperature=0.0, compile=compile)
    t0 = time.perf_counter()
    out = generate(model, ids.tolist(), cfg)
    secs = time.perf_counter() - t0
    assert all(len(c.tokens) == n for c in out), "lmcore generated another number of tokens"
    return secs, [c.tokens for c in out]


def hf_run(model, ids: torch.Tensor, n: int, compile: bool = False) -> tuple[float, list[list[int]]]:
    extra = {}
    if compile:  # its static cache and compiled forward; on a CPU only when asked (_compile_all_devices)
        from transformers import CompileConfig

        config = CompileConfig(mode="reduce-overhead" if model.device.type == "cuda" else "default")
        config._compile_all_devices = True
        extra = {"cache_implementation": "static", "compile_config": config}
    t0 = time.perf_counter()
    # no end-of-text (main() clears it) and no min_new_tokens: exactly n tokens, with no per-token
    # stop check or logits processor that lmcore's side (no stop_id) does not do either
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, use_cache=True,
                         pad_token_id=0, **extra)
    secs = time.perf_counter() - t0
    assert out.shape[1] - ids.shape[1] == n, "transformers generated another number of tokens"
    return secs, out[:, ids.shape[1]:].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="an lmcore model folder (runs/pretrain/final)")
    ap.add_argument("--export", type=Path, required=True, help="its Hugging Face export (runs/export)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--compile", action="store_true", help="also lmcore's compiled decode step")
    args = ap.parse_args()
    from transformers import LlamaForCausalLM  # lazy: a benchmark-only dependency

    if args.threads:
        torch.set_num_threads(args.threads)
    ours = load_decoder(args.model).eval()
    theirs = LlamaForCausalLM.from_pretrained(args.export, dtype=torch.float32).eval()
    theirs.generation_config.eos_token_id = None  # both sides generate exactly --new-tokens, unstopped
    vocab = ours.cfg.vocab_size
    prompts = {b: torch.randint(1, vocab, (b, args.prompt_tokens), generator=torch.Generator().manual_seed(b))
               for b in args.batches}
    runners = {"lmcore": lambda ids, n: lmcore_run(ours, ids, n), "transformers": lambda ids, n: hf_run(theirs, ids, n)}
    if args.compile:
        runners["lmcore compiled"] = lambda ids, n: lmcore_run(ours, ids, n, compile=True)
        runners["transformers compiled"] = lambda ids, n: hf_run(theirs, ids, n, compile=True)
    cases = [(name, b) for b in args.batches for name in runners]
    times: dict[tuple[str, int], list[float]] = {c: [] for c in cases}
    tokens: dict[tuple[str, int], list[list[int]]] = {}
    with torch.no_grad():
        warmup: dict[tuple[str, int], float] = {}
        for name, b in cases:  # warm-up, at the timed length (the compiled cases compile for its cache size)
            warmup[(name, b)] = runners[name](prompts[b], args.new_tokens)[0]
        for r in range(args.rounds):
            order = cases[r % len(cases):] + cases[: r % len(cases)]
            for name, b in order:
                secs, toks = runners[name](prompts[b], args.new_tokens)
                times[(name, b)].append(secs)
                tokens[(name, b)] = toks
    print(f"machine: {cpu_name()} ({cpu_flags()}), {torch.get_num_threads()} threads; torch {torch.__version__}; "
          f"commit {git_commit(Path(__file__).resolve().parents[1])}; {dt.date.today()}; "
          f"command: python benchmarks/generate_vs_hf.py {' '.join(sys.argv[1:])}")
    print(f"model {args.model} ({ours.num_params() / 1e6:.2f}M parameters), greedy, float32, prompt "
          f"{args.prompt_tokens} tokens, {args.new_tokens} new tokens, {args.rounds} rounds\n")
    pairs = [("lmcore", "transformers")] + ([("lmcore compiled", "transformers compiled"),
                                             ("lmcore compiled", "transformers")] if args.compile else [])
    print("| batch | lmcore | tokens/s | transformers | tokens/s | ratio | same tokens (rows) |")
    print("|---|---|---|---|---|---|---|")
    for ours_name, hf_name in pairs:
        for b in args.batches:
            ours_s, hf_s = statistics.median(times[(ours_name, b)]), statistics.median(times[(hf_name, b)])
            same = sum(a == h for a, h in zip(tokens[(ours_name, b)], tokens[(hf_name, b)]))
            print(f"| {b} | {ours_name} | {b * args.new_tokens / ours_s:,.0f} | {hf_name} | "
                  f"{b * args.new_tokens / hf_s:,.0f} | {hf_s / ours_s:.2f}x | {same}/{b} |")
    if args.compile:
        print(f"\nwarm-up of {args.new_tokens} tokens (s; the compiled cases compile in it): " + ", ".join(
            f"{name} batch {b} {secs:.1f}" for (name, b), secs in warmup.items()))


if __name__ == "__main__":
    main()
