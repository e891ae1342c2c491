"""Where one training step's time goes: torch.profiler over a few steps of lmcore's Decoder and of
the plain GPT-2 (benchmarks/gpt2_baseline.py) in one identical loop, the loop of
benchmarks/train_throughput.py (autocast, forward with the loss, backward, clipping to 1.0,
fused AdamW, zero_grad), with lmcore's attention kernel and malloc tuning as its training uses them.

Prints, per model, the operators by self time in ms per step (grouped as matrix products,
attention, element-wise and the rest), and with ``--shapes-of OP`` the input shapes of the
operators named (e.g. ``aten::mul``), which tell which line of the model an element-wise pass
comes from.

    python benchmarks/profile_step.py                          # 6x6x384, bf16, batch 8 x 256
    python benchmarks/profile_step.py --shape 2x4x256 --precision fp32
    python benchmarks/profile_step.py --shapes-of aten::mul,aten::copy_
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpt2_baseline

from gpt2_baseline import GPT2  # noqa: E402

from lmcore.core.machine import cpu_flags, cpu_name, git_commit, tune_malloc  # noqa: E402
from lmcore.model.decoder import Decoder, DecoderConfig  # noqa: E402
from lmcore.model.kernels import attention_dtype, attention_kernel  # noqa: E402
from lmcore.train.flops import cpu_precision  # noqa: E402

GROUPS = {
    "matrix products": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear"),
    "attention (SDPA)": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                         "aten::_scaled_dot_product_flash_attention_for_cpu_backward"),
    "softmax (attention, loss)": ("aten::_softmax", "aten::_softmax_backward_data", "aten::_log_softmax",
                                  "aten::_log_softmax_backward_data"),
    "optimizer": ("aten::_fused_adamw_",),
}


def group_of(name: str) -> str:
    for group, ops in GROUPS.items():
        if name in ops:
            return group
    return "element-wise, copies and the rest"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="6x6x384", help="LAYERSxHEADSxWIDTH")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="auto (default): what pretrain's mixed_precision: auto picks on this CPU (bf16 elsewhere is "
                        "emulated for the plain GPT-2 while lmcore runs fp32: two kinds of arithmetic, not two models)")
    p.add_argument("--steps", type=int, default=3, help="profiled steps (after 2 untimed)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--top", type=int, default=14, help="operators listed per model")
    p.add_argument("--shapes-of", default="", help="comma-separated operator names to break down by input shape")
    args = p.parse_args()

    malloc = tune_malloc()
    torch.set_num_threads(args.threads)
    if args.precision == "auto":
        args.precision = "bf16" if cpu_precision(args.threads) == "bf16" else "fp32"
    L, H, C = (int(v) for v in args.shape.lower().split("x"))
    T, B = args.context, args.batch
    cfg = DecoderConfig(vocab_size=args.vocab, n_layer=L, n_head=H, n_embd=C, block_size=T, dropout=0.0)
    dtype = attention_dtype("bf16" if args.precision == "bf16" else "no", "cpu")
    kernel = attention_kernel(cfg, B, T, dtype, "cpu")
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, args.vocab, (B, T + 1), generator=g)
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()
    print(f"machine: {cpu_name()} ({cpu_flags()}), {args.threads} threads; torch {torch.__version__}; commit "
          f"{git_commit(Path(__file__).resolve().parents[1])}; allocator {malloc}; {time.strftime('%Y-%m-%d')}")
    print(f"shape {args.shape}, batch {B} x context {T}, vocab {args.vocab}, {args.precision}; lmcore attention "
          f"{kernel}; {args.steps} profiled steps\n")
    wanted = [s for s in args.shapes_of.split(",") if s]
    for name in ("lmcore", "plain"):
        torch.manual_seed(0)
        model = Decoder(cfg) if name == "lmcore" else GPT2(cfg)
        if name == "lmcore":
            model.use_attention(kernel)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=True)
        ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.precision == "bf16" else contextlib.nullcontext

        def step() -> None:
            with ctx():
                loss = model(x, y)[1]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(2):
            step()
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU], record_shapes=bool(wanted)) as prof:
            for _ in range(args.steps):
                step()
        wall = (time.perf_counter() - t0) / args.steps * 1e3
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events) / args.steps / 1e3
        groups: dict[str, float] = defaultdict(float)
        for e in events:
            groups[group_of(e.key)] += e.self_cpu_time_total / args.steps / 1e3
        print(f"## {name}: {total:.0f} ms of operators per step ({wall:.0f} ms wall under the profiler)")
        print("| group | ms/step | share |\n|---|---|---|")
        for grp, ms in sorted(groups.items(), key=lambda kv: -kv[1]):
            print(f"| {grp} | {ms:.1f} | {100 * ms / total:.0f} % |")
        print("\n| operator | calls/step | ms/step |\n|---|---|---|")
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
            print(f"| `{e.key}` | {e.count / args.steps:.0f} | {e.self_cpu_time_total / args.steps / 1e3:.1f} |")
        if wanted:
            print("\n| operator | input shapes | calls/step | ms/step |\n|---|---|---|---|")
            rows = [e for e in prof.key_averages(group_by_input_shape=True) if e.key in wanted]
            for e in sorted(rows, key=lambda e: -e.self_cpu_time_total)[: 2 * args.top]:
                print(f"| `{e.key}` | {e.input_shapes} | {e.count / args.steps:.0f} | "
                      f"{e.self_cpu_time_total / args.steps / 1e3:.1f} |")
        print()


if __name__ == "__main__":
    main()
