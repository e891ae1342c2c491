"""Each of the decoder's hand-written fast paths against the plain torch form it replaces, forward
and backward, at the training step's shapes, on this machine: the evidence for keeping one form
everywhere or choosing per machine (as ``lmcore.model.kernels`` does for attention).

- RMSNorm: ``_RMSNormalize`` (hand-written backward) against ``F.rms_norm``, float32 input (the
  residual stream), output in the compute dtype;
- loss: ``cross_entropy`` (``_RowCrossEntropy``) against ``F.cross_entropy(logits.float())``
  (what autocast runs) on B*T x vocab logits;
- RoPE: the complex multiply of the pair-adjacent layout (``apply_rope``) against Llama's
  rotate-half form, on q and k together;
- attention: ``causal_attention`` with each kernel (what the probe times);
- q/k/v and gate/up projections: the weights joined at run time with the norm's weight folded in
  (``CausalSelfAttention.forward``, ``SwiGLU.forward``: one ``torch.cat``, one multiply of the
  weights, one matrix product) against separate products of the activations scaled by the norm's
  weight (Llama's form); the input is the normalised residual, gradients to it and every weight;
- the weights alone: the run-time join (rows reordered for RoPE, concatenated, multiplied by the
  norm's weight; forward and backward) against weights kept joined between steps (the multiply
  only): what storing the parameters in the step's layout would save.

Best of ``--reps`` after two warm-ups, ms, with glibc malloc tuned as in training.

    python benchmarks/kernel_alternatives.py
    python benchmarks/kernel_alternatives.py --width 384 --heads 6 --batch 8 --context 256
    python benchmarks/kernel_alternatives.py --dtypes fp32   # a CPU without bf16 instructions
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmcore.core.machine import cpu_flags, cpu_name, git_commit, tune_malloc  # noqa: E402
from lmcore.config import ATTENTION_KERNELS  # noqa: E402
from lmcore.model.decoder import (  # noqa: E402
    DecoderConfig,
    _RMSNormalize,
    apply_rope,
    cross_entropy,
    linear,
    pair_rows,
)
from lmcore.model.kernels import measure_attention  # noqa: E402


def best_ms(fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor], reps: int) -> float:
    times = []
    for _ in range(reps + 2):
        for t in leaves:
            t.grad = None
        t0 = time.perf_counter()
        out = fn()
        out.backward(torch.ones_like(out))
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times[2:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--dtypes", default="bf16,fp32",
                   help="comma-separated: bf16, fp32 (leave bf16 out where the CPU has no bf16 instructions: "
                        "its matrix products are emulated, ~1 GFLOP/s)")
    args = p.parse_args()
    malloc = tune_malloc()
    torch.set_num_threads(args.threads)
    B, T, C, H, V = args.batch, args.context, args.width, args.heads, args.vocab
    D = C // H
    g = torch.Generator().manual_seed(0)
    print(f"machine: {cpu_name()} ({cpu_flags()}), {args.threads} threads; torch {torch.__version__}; commit "
          f"{git_commit(Path(__file__).resolve().parents[1])}; allocator {malloc}; {time.strftime('%Y-%m-%d')}")
    print(f"batch {B} x context {T}, width {C}, {H} heads, vocab {V}; forward + backward, best of {args.reps} (ms)\n")
    print("| path | dtype | lmcore's form | torch's form | torch / lmcore |\n|---|---|---|---|---|")
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    for key in args.dtypes.split(","):
        if key not in dtypes:
            p.error(f"--dtypes: {key!r} is not one of {', '.join(dtypes)}")
        dtype = dtypes[key]
        name = str(dtype).removeprefix("torch.")
        x = torch.randn(B, T, C, generator=g).requires_grad_()
        ours = best_ms(lambda: _RMSNormalize.apply(x, 1e-5).to(dtype), [x], args.reps)
        theirs = best_ms(lambda: F.rms_norm(x, (C,), eps=1e-5).to(dtype), [x], args.reps)
        print(f"| RMSNorm | {name} | {ours:.2f} | {theirs:.2f} | {theirs / ours:.2f}x |")

        logits = torch.randn(B * T, V, generator=g).to(dtype).requires_grad_()
        targets = torch.randint(0, V, (B * T,), generator=g)
        ours = best_ms(lambda: cross_entropy(logits, targets, reduction="sum"), [logits], args.reps)
        theirs = best_ms(lambda: F.cross_entropy(logits.float(), targets, reduction="sum"), [logits], args.reps)
        print(f"| loss | {name} | {ours:.2f} | {theirs:.2f} | {theirs / ours:.2f}x |")

        qk = torch.randn(B, T, 2 * H, D, generator=g).to(dtype).requires_grad_()
        angle = torch.randn(T, 1, D // 2, generator=g)
        rot = torch.polar(torch.ones_like(angle), angle)
        cos, sin = torch.cat([angle.cos()] * 2, -1).to(dtype), torch.cat([angle.sin()] * 2, -1).to(dtype)

        def rotate_half() -> torch.Tensor:
            x1, x2 = qk[..., : D // 2], qk[..., D // 2 :]
            return qk * cos + torch.cat([-x2, x1], -1) * sin

        ours = best_ms(lambda: apply_rope(qk, rot), [qk], args.reps)
        theirs = best_ms(rotate_half, [qk], args.reps)
        print(f"| RoPE | {name} | {ours:.2f} | {theirs:.2f} | {theirs / ours:.2f}x |")

        cfg = DecoderConfig(vocab_size=V, n_layer=1, n_head=H, n_embd=C, block_size=T)
        times = measure_attention(cfg, B, T, dtype, reps=args.reps)
        assert set(times) == set(ATTENTION_KERNELS)
        print(f"| attention (matmul / sdpa) | {name} | {1e3 * times['matmul']:.2f} | {1e3 * times['sdpa']:.2f} | "
              f"{times['sdpa'] / times['matmul']:.2f}x |")

        for row, ours, theirs, leaves in projections(cfg, B, T, g):
            autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

            def under_autocast(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
                def run() -> torch.Tensor:
                    with autocast:
                        return fn()
                return run

            a = best_ms(under_autocast(ours), leaves, args.reps)
            b = best_ms(under_autocast(theirs), leaves, args.reps)
            print(f"| {row} | {name} | {a:.2f} | {b:.2f} | {b / a:.2f}x |")


def projections(cfg: DecoderConfig, B: int, T: int, g: torch.Generator
                ) -> list[tuple[str, Callable[[], torch.Tensor], Callable[[], torch.Tensor], list[torch.Tensor]]]:
    """The two joined projections of a block, each as (row name, lmcore's form, the separate form,
    the tensors that get gradients); both forms return the sum of their outputs (SwiGLU: of
    silu(gate) * up), so that one backward covers every product. Then the two joins alone against
    weights kept joined."""
    C, H, KV, D, F_ = cfg.n_embd, cfg.n_head, cfg.kv_heads, cfg.head_dim, cfg.mlp_hidden
    h = torch.randn(B, T, C, generator=g).requires_grad_()
    norm = (1 + 0.1 * torch.randn(C, generator=g)).requires_grad_()

    def weight(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=g) / cols**0.5).requires_grad_()

    wq, wk, wv = weight(H * D, C), weight(KV * D, C), weight(KV * D, C)
    wg, wu = weight(F_, C), weight(F_, C)

    def qkv_joined() -> torch.Tensor:
        w = torch.cat([pair_rows(wq, H), pair_rows(wk, KV), wv]) * norm
        return linear(h, w).sum()

    def qkv_separate() -> torch.Tensor:
        x = h * norm
        return linear(x, wq).sum() + linear(x, wk).sum() + linear(x, wv).sum()

    def gate_up_joined() -> torch.Tensor:
        gate, up = linear(h, torch.cat([wg, wu]) * norm).chunk(2, dim=-1)
        return (F.silu(gate) * up).sum()

    def gate_up_separate() -> torch.Tensor:
        x = h * norm
        return (F.silu(linear(x, wg)) * linear(x, wu)).sum()

    kept_qkv = weight((H + 2 * KV) * D, C)  # the same weights, kept in the step's layout
    kept_gate_up = weight(2 * F_, C)

    return [("q/k/v projections (joined / separate)", qkv_joined, qkv_separate, [h, norm, wq, wk, wv]),
            ("gate/up projections (joined / separate)", gate_up_joined, gate_up_separate, [h, norm, wg, wu]),
            ("q/k/v weights alone (joined each step / kept joined)",
             lambda: torch.cat([pair_rows(wq, H), pair_rows(wk, KV), wv]) * norm, lambda: kept_qkv * norm,
             [norm, wq, wk, wv, kept_qkv]),
            ("gate/up weights alone (joined each step / kept joined)",
             lambda: torch.cat([wg, wu]) * norm, lambda: kept_gate_up * norm, [norm, wg, wu, kept_gate_up])]


if __name__ == "__main__":
    main()
