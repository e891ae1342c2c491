"""Training throughput and MFU of lmcore's Decoder beside Hugging Face GPT-2 and Llama of the same shape.

Every model trains on the same random token batches with the same step: bf16 autocast (how
lmcore's pretrain runs: Accelerate's bf16 mixed precision is autocast, parameters stay fp32),
forward with the model's own loss, backward, gradient clipping to 1.0, fused AdamW, zero_grad.
The models are interleaved in rounds (the order rotates every round) so that a neighbour on the
shared cores slows them all alike; the table gives the median tokens/s over all timed steps.

FLOPs per token = 6 x the weights of every matrix multiply (output projection included, lookup-only
embedding tables excluded) + 12 x layers x width x context; MFU = achieved FLOP/s over the matmul
peak measured in the same run (lmcore.train.flops' probe: the best of several 2048 x 2048 ``torch.mm``
calls, before and after the rounds; the larger of the two), in bf16 and in float32.

    python benchmarks/train_throughput.py                       # small (4x256) and mini (6x384)
    python benchmarks/train_throughput.py --shapes 6x6x384 --rounds 5 --steps 4
    python benchmarks/train_throughput.py --baseline HEAD~3     # also the model of a commit
    python benchmarks/train_throughput.py --precision fp32      # plain float32 instead of autocast
    python benchmarks/train_throughput.py --compile             # torch.compile every model

Both MFUs are printed because on a CPU without bf16 instructions (AVX512-BF16, AMX) the bf16
peak is a fraction of the float32 one, and a model can then beat it (lmcore multiplies bf16-rounded
operands with the float32 GEMM there: see ``lmcore.model.decoder.linear``).

transformers is a benchmark-only dependency (installed with the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import datetime
import contextlib
import gc
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpt2_baseline

from lmcore.config import ATTENTION_KERNELS  # noqa: E402
from lmcore.core.machine import cpu_flags, cpu_name, git_commit, tune_malloc  # noqa: E402
from lmcore.model.decoder import Decoder, DecoderConfig  # noqa: E402
from lmcore.model.kernels import attention_dtype, attention_kernel  # noqa: E402
from lmcore.train.flops import cpu_precision  # noqa: E402

# ---------------------------------------------------------------------------------------------
# the models


def lmcore_model(L: int, H: int, C: int, T: int, vocab: int) -> tuple[nn.Module, DecoderConfig]:
    cfg = DecoderConfig(vocab_size=vocab, n_layer=L, n_head=H, n_embd=C, block_size=T, dropout=0.0)
    return Decoder(cfg), cfg


def model_module_at(rev: str):
    """The model module as of git revision ``rev`` (``lmcore/model/decoder.py``, or
    ``lmcore/model.py`` before the layered package), imported as a module of its own; its model
    class is ``Decoder`` (``GPT`` before the rename)."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    for path in ("lmcore/model/decoder.py", "lmcore/model.py"):
        res = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, capture_output=True, text=True)
        if res.returncode == 0:
            src = res.stdout
            break
    else:
        raise SystemExit(f"--baseline {rev}: neither lmcore/model/decoder.py nor lmcore/model.py at that revision")
    name = f"lmcore_model_at_{rev.replace('~', '_').replace('^', '_')}"
    spec = importlib.util.spec_from_loader(name, loader=None)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    exec(compile(src, f"{rev}:{path}", "exec"), mod.__dict__)
    if not hasattr(mod, "Decoder"):
        mod.Decoder, mod.DecoderConfig = mod.GPT, mod.GPTConfig
    return mod


def hf_gpt2(L: int, H: int, C: int, T: int, vocab: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab, n_positions=T, n_embd=C, n_layer=L, n_head=H, n_inner=4 * C,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
                     bos_token_id=0, eos_token_id=0, use_cache=False, attn_implementation="sdpa")
    cfg.loss_type = "ForCausalLM"
    return GPT2LMHeadModel(cfg)


def hf_llama(L: int, H: int, C: int, T: int, vocab: int, mlp_hidden: int, kv_heads: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=C, intermediate_size=mlp_hidden, num_hidden_layers=L,
                      num_attention_heads=H, num_key_value_heads=kv_heads, max_position_embeddings=T,
                      rms_norm_eps=1e-5, rope_theta=10000.0, attention_bias=False, mlp_bias=False,
                      attention_dropout=0.0, tie_word_embeddings=True, use_cache=False,
                      bos_token_id=0, eos_token_id=0, attn_implementation="sdpa")
    cfg.loss_type = "ForCausalLM"
    return LlamaForCausalLM(cfg)


def matmul_weights(model: nn.Module) -> int:
    """Weights of every matrix multiply: nn.Linear and GPT-2's Conv1D (a transposed linear), each
    module once (a tied output projection counts once, as a matmul); embeddings are lookups."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D":
            n += m.weight.numel()
    return n


def flops_per_token(model: nn.Module, L: int, C: int, T: int) -> int:
    return 6 * matmul_weights(model) + 12 * L * C * T


# ---------------------------------------------------------------------------------------------
# the peak


def measured_peak(dtype: torch.dtype) -> float:
    """Matmul peak in FLOP/s on this CPU in ``dtype``, measured now (not a cached figure) with
    lmcore.train.flops' probe: large 2048 x 2048 torch.mm calls, the best of several within ~1 s."""
    try:
        from lmcore.train.flops import measure_peak
    except ImportError:  # a checkout without lmcore/flops.py: the same kind of probe here
        def measure_peak(device, dtype, size=2048, budget=1.0):
            a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
            torch.mm(a, b)
            best, t_end = float("inf"), time.perf_counter() + budget
            while time.perf_counter() < t_end:
                t = time.perf_counter()
                torch.mm(a, b)
                best = min(best, time.perf_counter() - t)
            return 2 * size**3 / best
    return measure_peak(torch.device("cpu"), dtype)


# ---------------------------------------------------------------------------------------------
# the training step


class Runner:
    def __init__(self, name: str, shape: str, model: nn.Module, is_hf: bool, fpt: int, args) -> None:
        self.name, self.shape, self.model, self.is_hf, self.fpt = name, shape, model, is_hf, fpt
        self.args = args
        model.train()
        self.opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=True)
        self.fwd = torch.compile(model) if args.compile else model
        self.times: list[float] = []
        self.first_step_s = 0.0
        self.losses: list[float] = []

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.is_hf:
            # the model's own loss; shift_labels: the targets are already shifted, so every model
            # predicts the same B x T next tokens (labels= alone would drop the last position)
            return self.fwd(input_ids=x, labels=y, shift_labels=y).loss
        return self.fwd(x, y)[1]

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if self.args.precision == "bf16" else contextlib.nullcontext()
        t = time.perf_counter()
        with ctx:
            loss = self.loss(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t
        self.losses.append(float(loss.detach()))
        return dt


def parse_shape(s: str) -> tuple[int, int, int]:
    L, H, C = (int(v) for v in s.lower().split("x"))
    return L, H, C


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="4x4x256,6x6x384", help="comma-separated LAYERSxHEADSxWIDTH")
    p.add_argument("--context", type=int, default=256, help="tokens per sequence (block size)")
    p.add_argument("--vocab", type=int, default=4096, help="vocabulary (the default pipeline's tokenizer: 4096)")
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--models", default="lmcore,gpt2,llama",
                   help="any of lmcore, gpt2, llama (Hugging Face), plain (benchmarks/gpt2_baseline.py: a GPT-2 as "
                        "plain as nanoGPT's, same loop)")
    p.add_argument("--baseline", metavar="REV", help="also run the model module as of this git revision")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per model before the rounds")
    p.add_argument("--steps", type=int, default=2, help="timed steps per model per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds over the models")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="bf16 autocast or plain fp32; auto (default): what pretrain's mixed_precision: auto picks "
                        "here (on a CPU without bf16 instructions bf16 is emulated, ~1 GFLOP/s for the peers: no "
                        "fair comparison)")
    p.add_argument("--compile", action="store_true", help="torch.compile every model (compile time reported)")
    p.add_argument("--attention", choices=("auto", *ATTENTION_KERNELS), default="auto",
                   help="lmcore's attention kernel (auto: what pretrain would choose here, measured and cached)")
    p.add_argument("--malloc", choices=("tuned", "system"), default="tuned",
                   help="tuned: glibc malloc keeps large freed blocks, as lmcore's training processes do "
                        "(lmcore.core.machine.tune_malloc; every model of the run benefits alike)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    malloc = tune_malloc() if args.malloc == "tuned" else "system"
    torch.set_num_threads(args.threads)
    if args.precision == "auto":  # the CPU's choice at the threads measured (every model here runs on the CPU)
        args.precision = "bf16" if cpu_precision(args.threads) == "bf16" else "fp32"
    T, B = args.context, args.batch
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    commit = git_commit(Path(__file__).resolve().parents[1])  # of the code measured (read now: a commit may land during the run)
    if args.baseline:
        root = Path(__file__).resolve().parents[1]
        args.baseline = subprocess.run(["git", "rev-parse", "--short", args.baseline], cwd=root, capture_output=True,
                                       text=True, check=True).stdout.strip()
        names.insert(names.index("lmcore") + 1 if "lmcore" in names else 0, f"lmcore@{args.baseline}")
    peaks0 = {dt: measured_peak(dt) for dt in (torch.bfloat16, torch.float32)}

    runners: list[Runner] = []
    kernels: dict[str, str] = {}
    for shape in args.shapes.split(","):
        L, H, C = parse_shape(shape)
        torch.manual_seed(args.seed)
        lm, gcfg = lmcore_model(L, H, C, T, args.vocab)
        dtype = attention_dtype("bf16" if args.precision == "bf16" else "no", "cpu")
        kernels[f"{L}x{H}x{C}"] = attention_kernel(gcfg, B, T, dtype, "cpu", args.attention)
        lm.use_attention(kernels[f"{L}x{H}x{C}"])
        for name in names:
            if name == "lmcore":
                model, fpt = lm, lm.flops_per_token()
                assert fpt == flops_per_token(lm, L, C, T)
            elif name.startswith("lmcore@"):
                old = model_module_at(args.baseline)
                torch.manual_seed(args.seed)
                model = old.Decoder(old.DecoderConfig(vocab_size=args.vocab, n_layer=L, n_head=H, n_embd=C,
                                                      block_size=T))
                if hasattr(model, "use_attention"):  # the kernel HEAD runs, or the comparison measures the kernels
                    model.use_attention(kernels[f"{L}x{H}x{C}"])
                fpt = flops_per_token(model, L, C, T)
            elif name == "gpt2":
                torch.manual_seed(args.seed)
                model = hf_gpt2(L, H, C, T, args.vocab)
                fpt = flops_per_token(model, L, C, T)
            elif name == "plain":
                from gpt2_baseline import GPT2  # lazy: benchmark script beside this one

                torch.manual_seed(args.seed)
                model = GPT2(gcfg)
                fpt = flops_per_token(model, L, C, T)
            elif name == "llama":
                torch.manual_seed(args.seed)
                model = hf_llama(L, H, C, T, args.vocab, gcfg.mlp_hidden, gcfg.kv_heads)
                fpt = flops_per_token(model, L, C, T)
            else:
                raise SystemExit(f"unknown model {name!r}")
            runners.append(Runner(name, f"{L}x{H}x{C}", model, name in ("gpt2", "llama"), fpt, args))

    g = torch.Generator().manual_seed(args.seed)
    batches = [torch.randint(0, args.vocab, (B, T + 1), generator=g) for _ in range(4)]
    xy = [(b[:, :-1].contiguous(), b[:, 1:].contiguous()) for b in batches]

    for r in runners:  # warm-up (and compilation) outside the timed rounds
        t = time.perf_counter()
        r.step(*xy[0])
        r.first_step_s = time.perf_counter() - t
        for i in range(args.warmup - 1):
            r.step(*xy[(i + 1) % len(xy)])
        print(f"# warm-up {r.shape} {r.name}: first step {r.first_step_s:.1f} s", file=sys.stderr, flush=True)

    k = 0
    for rnd in range(args.rounds):
        order = runners[rnd % len(runners):] + runners[: rnd % len(runners)]
        for r in order:
            for _ in range(args.steps):
                r.times.append(r.step(*xy[k % len(xy)]))
                k += 1
        gc.collect()
        print(f"# round {rnd + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    peaks1 = {dt: measured_peak(dt) for dt in (torch.bfloat16, torch.float32)}
    peak = max(peaks0[torch.bfloat16], peaks1[torch.bfloat16])
    peak32 = max(peaks0[torch.float32], peaks1[torch.float32])

    tokens = B * T
    print(f"\nmachine: {cpu_name()} ({cpu_flags()}), {args.threads} threads; torch {torch.__version__}; "
          f"commit {commit}; allocator {malloc}; lmcore attention: "
          + ", ".join(f"{k} {v}" for k, v in kernels.items()))
    print(f"date {datetime.date.today().isoformat()}; command: python benchmarks/train_throughput.py {' '.join(sys.argv[1:])}")
    print(f"batch {B} x context {T} = {tokens} tokens/step, vocab {args.vocab}, {args.precision}"
          f"{' autocast' if args.precision == 'bf16' else ''}, fused AdamW, clip 1.0"
          f"{', torch.compile' if args.compile else ''}; {args.rounds} rounds x {args.steps} steps "
          f"after {args.warmup} warm-up")
    print(f"matmul peak (best 2048x2048 torch.mm before and after the rounds, {args.threads} threads): "
          f"bf16 {peak / 1e9:.0f} GFLOP/s ({peaks0[torch.bfloat16] / 1e9:.0f}, {peaks1[torch.bfloat16] / 1e9:.0f}), "
          f"fp32 {peak32 / 1e9:.0f} GFLOP/s ({peaks0[torch.float32] / 1e9:.0f}, {peaks1[torch.float32] / 1e9:.0f})\n")
    head = ("| shape | model | params | matmul params | FLOPs/token | tokens/s (median) | min-max | vs fastest HF "
            "| GFLOP/s | MFU (bf16 peak) | MFU (fp32 peak) |")
    if args.compile:
        head += " first step s |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for shape in dict.fromkeys(r.shape for r in runners):
        group = [r for r in runners if r.shape == shape]
        tps = {r.name: tokens / statistics.median(r.times) for r in group}
        hf_best = max((tps[r.name] for r in group if r.is_hf), default=None)
        for r in group:
            n_params = sum(p.numel() for p in r.model.parameters())
            ratio = f"{tps[r.name] / hf_best:.2f}x" if hf_best else "-"
            flops = tps[r.name] * r.fpt
            spread = f"{tokens / max(r.times):,.0f}-{tokens / min(r.times):,.0f}"
            row = (f"| {shape} | {r.name} | {n_params / 1e6:.2f}M | {matmul_weights(r.model) / 1e6:.2f}M | "
                   f"{r.fpt / 1e6:.1f}M | {tps[r.name]:,.0f} | {spread} | {ratio} | {flops / 1e9:.0f} | "
                   f"{100 * flops / peak:.0f}% | {100 * flops / peak32:.0f}% |")
            if args.compile:
                row += f" {r.first_step_s:.0f} |"
            print(row)
    print("\nlosses after the last step (random tokens, ln(vocab) = "
          f"{torch.log(torch.tensor(float(args.vocab))):.2f}): "
          + ", ".join(f"{r.shape} {r.name} {r.losses[-1]:.2f}" for r in runners))


if __name__ == "__main__":
    main()
