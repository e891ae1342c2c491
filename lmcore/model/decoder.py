"""A Llama-style decoder-only transformer (lmcore's Decoder), readable top to bottom.

What it computes: the token embedding; ``n_layer`` pre-norm blocks, each RMSNorm, causal
self-attention with rotary position embedding (RoPE, Llama's "rotate half" layout; grouped-query
when ``n_kv_heads < n_head``) and the residual, then RMSNorm, a SwiGLU feed-forward and the
residual; a final RMSNorm and the output head, optionally tied to the embedding; the
cross-entropy. No biases; the residual projections start scaled down by depth. The parameters are
exactly Llama's (``blocks.N.attn.q_proj.weight`` and so on; :mod:`lmcore.model.llama` only renames
them).

The same function written the textbook way, one step per line and no trick, is
:func:`lmcore.model.reference.reference_forward`: start reading there. It is the oracle:
``tests/test_model.py`` checks this module's logits, loss and every gradient against it.

There is no parallelism code here: Accelerate wraps the model. Generation (``lmcore.generate``)
runs through :meth:`Decoder.next_token_logits` with a :class:`KVCache`, explicit positions and a
padding mask, or, compiled, through :meth:`Decoder.decode_step`, whose shapes stay the same while
the cache fills.

The training step computes that function faster than the textbook version
(``benchmarks/train_throughput.py``; results in ``benchmarks/RESULTS.md``). The fast paths, in the
order of this file:

- :func:`linear` (where :func:`emulates_bf16`): under bf16 autocast on an x86 CPU without bf16
  dot-product instructions, matrix multiplies run as float32 products of bf16-rounded operands;
- :class:`_RMSNormalize` (:func:`rms_normalize`, on CPU devices): the normalisation with a
  hand-written backward;
- :func:`pair_rows` and :func:`apply_rope`: RoPE is one complex multiply: the q and k weight rows
  are reordered at run time so that each rotary pair sits side by side, which leaves every
  attention score unchanged;
- :func:`causal_attention` (where a model's attention kernel is ``matmul``, chosen per machine and
  shape by :mod:`lmcore.model.kernels`): causal attention as two batched matrix products and a
  float32 softmax with a hand-written backward, instead of ``scaled_dot_product_attention``;
- :meth:`CausalSelfAttention.forward` and :meth:`SwiGLU.forward`: q, k and v come from one matrix
  multiply, and gate and up from another: the separate weights are concatenated at run time (a
  copy of a few MB; its backward splits the gradient; a :class:`KVCache` keeps the fused weights
  while one generation runs);
- :meth:`Block.forward` (and :meth:`Decoder.forward` for the final norm): each RMSNorm's weight is
  folded into the weight of the matmul that follows it;
- :class:`_RowCrossEntropy` (:func:`cross_entropy`): the loss has a leaner backward than
  ``F.cross_entropy`` (no zero-filled N x V gradient).

Each trick says what it saved where it is. The gains were measured on a shared 2-core Skylake
Xeon (no AVX512-BF16) with torch 2.13.

Two of them exist for CPUs only and are decided per tensor, from its device, never by a
global: the bf16 emulation (:func:`emulates_bf16`: a CPU device on an x86 CPU without bf16
instructions, under CPU autocast) and the hand-written RMSNorm backward
(:func:`uses_cpu_kernels`: a CPU device). On CUDA (and any other device) the matmuls and
attention are torch's own bf16 kernels under CUDA autocast and the norm is ``F.rms_norm``
(one fused kernel there). The others are plain torch ops and serve every device alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import platform
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from lmcore.config import ATTENTION_KERNELS, ModelShape


class DecoderConfig(ModelShape):
    """The decoder's configuration: the shape fields of :class:`lmcore.config.ModelShape` (their
    defaults, documentation and checks) and the vocabulary size. Frozen and hashable;
    ``DecoderConfig(**cfg.model_dump())`` gives it back (the ``model`` section of a model folder's
    ``config.json``)."""

    vocab_size: int = Field(ge=1)
    """Number of token ids."""

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_head

    @property
    def mlp_hidden(self) -> int:
        return 64 * math.ceil(self.mlp_ratio * self.n_embd / 64)


# ---------------------------------------------------------------------------------------------
# bf16 on CPUs without bf16 arithmetic


def _x86_without_bf16() -> bool:
    """An x86 CPU without AVX512-BF16 and without AMX: oneDNN emulates its bf16 GEMMs. On a
    2-core Skylake Xeon a 2048 bf16 ``torch.mm`` ran at 17-21 GFLOP/s against 60-100 in float32
    (a Zen 4 with AVX512-BF16: ~385 against ~160)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        return not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes: trust its bf16 kernels
        return False


X86_WITHOUT_BF16 = _x86_without_bf16()
"""This process's CPU has no bf16 arithmetic. It describes the host CPU only: whether a tensor's
bf16 matmuls are emulated is :func:`emulates_bf16` of its device."""


def emulates_bf16(device: torch.device | str) -> bool:
    """Whether bf16 matrix multiplies on ``device`` run as float32 GEMMs of bf16-rounded operands
    (:func:`linear`): only on a CPU device, and only on an x86 CPU without bf16 instructions.
    Never on CUDA or any other accelerator, whose bf16 kernels are native."""
    return torch.device(device).type == "cpu" and X86_WITHOUT_BF16


def uses_cpu_kernels(device: torch.device | str) -> bool:
    """Whether the hand-written CPU kernels (:class:`_RMSNormalize`'s backward) run on ``device``:
    on a CPU device only. Elsewhere the norm is ``F.rms_norm``, which has a fused CUDA kernel
    (and which ``torch.compile`` fuses on any device)."""
    return torch.device(device).type == "cpu"


def emulating_bf16(x: torch.Tensor) -> bool:
    """True for a tensor on a device that :func:`emulates_bf16`, inside CPU bf16 autocast."""
    # the cheapest test first: generation and float32 training ask it for every matmul
    return (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            and emulates_bf16(x.device))


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w.T``, as ``F.linear`` under autocast, but fast where bf16 is emulated.

    A bf16 GEMM rounds its operands to bf16, multiplies them exactly (a product of two bf16
    values fits in float32) and accumulates in float32. Where the CPU has no bf16 instructions
    the same numbers come 3.6x faster (4096x384 @ 384x1024, forward and backward) from rounding
    the operands to bf16 and calling the float32 GEMM; the output is rounded to bf16 as
    autocast's is, and the backward pass rounds the gradients alike. Results agree with the
    bf16 GEMM's up to the order of summation.
    """
    if emulating_bf16(x):
        with torch.autocast("cpu", enabled=False):
            return F.linear(x.to(torch.bfloat16).float(), w.to(torch.bfloat16).float()).to(torch.bfloat16)
    return F.linear(x, w)


# ---------------------------------------------------------------------------------------------
# layers


class _RMSNormalize(torch.autograd.Function):
    """x * rsqrt(mean(x^2) + eps) over the last dimension, with a hand-written backward.

    Autograd's version of the textbook formula (pow, mean, add, rsqrt, mul) runs about a dozen
    passes over x forward and backward; torch 2.13 has no fused RMSNorm kernel on CPU
    (``F.rms_norm`` is the same composite, and was no faster). Here: one reduction and one
    multiply forward, four passes backward; with the weight, 1.8x faster than the composite
    (16 x 256 x 384, float32, forward and backward). Used on CPU devices only
    (:func:`uses_cpu_kernels`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float) -> torch.Tensor:
        ms = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1])
        r = ms.add_(eps).rsqrt_()
        ctx.save_for_backward(x, r)
        return x * r

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, r = ctx.saved_tensors
        # d(x r)/dx = r g - x r^3 mean(g x)
        coef = (g * x).mean(-1, keepdim=True).mul_(r.pow(3))
        return torch.addcmul(g * r, x, coef, value=-1.0), None


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without its weight, computed in float32, returned in ``x``'s dtype: the
    hand-written backward on a CPU (:func:`uses_cpu_kernels`), ``F.rms_norm`` elsewhere."""
    if uses_cpu_kernels(x.device):
        if not (torch.is_grad_enabled() and x.requires_grad):  # no backward: the forward alone, without
            xf = x.float()  # the autograd.Function's bookkeeping (generation, evaluation)
            if x.numel() <= 64 * x.shape[-1]:  # a few rows (decoding): one call, ~20 % faster at 1-8 rows
                return F.rms_norm(xf, (x.shape[-1],), eps=eps).to(x.dtype)
            return (xf * torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(x.shape[-1])
                    .add_(eps).rsqrt_()).to(x.dtype)
        return _RMSNormalize.apply(x.float(), eps).to(x.dtype)
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, project: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` normalised and scaled; with ``project``, the (out, dim) weight of the projection
        that follows, that projection of it with the scale folded into the weight (one pass over
        ``x`` fewer). Called as a module either way, so that a wrapper's hooks see it (Accelerate's
        FSDP2 makes the final norm its own unit, gathered by a pre-forward hook)."""
        if project is None:
            return rms_normalize(x, self.eps) * self.weight
        return linear(rms_normalize(x, self.eps), project * self.weight)


def rope_cache(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles, shape (seq_len, head_dim // 2): position t turns the
    pair of dimensions (i, i + head_dim/2) by t * theta^(-2i/head_dim) (the "rotate half" layout
    of Llama and Hugging Face)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return freqs.cos(), freqs.sin()


def pair_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder the output rows of a q or k weight so that each head's rotary pair (i, i + D/2)
    becomes the adjacent pair (2i, 2i + 1).

    Queries and keys reordered alike give the same dot products, so attention is unchanged, and
    RoPE becomes a multiply by e^(i * angle) of the adjacent pairs read as complex numbers: one
    kernel instead of slicing, negating, concatenating, two multiplies and an add (forward and
    backward of q and k: 8x faster in float32, 3x with bf16 inputs, at 16 x 256 x 384)."""
    d = w.shape[0] // heads
    return w.view(heads, 2, d // 2, -1).transpose(1, 2).reshape(w.shape)


def rotation(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotation :func:`apply_rope` takes, from the float32 cos and sin of the angles (..., D/2):
    e^(i * angle) as a complex tensor, or, while ``torch.compile`` traces, the real pairs (cos,
    sin) in a last dimension of 2. Inductor generates no code for complex numbers (the complex
    multiply stays a separate kernel); the real form fuses with its neighbours: the compiled
    decode step ran 7-10 % faster with it (Zen 2, the default model, batch 1)."""
    if torch.compiler.is_compiling():
        return torch.stack((cos, sin), dim=-1)
    return torch.complex(cos, sin)


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate (B, T, heads, D) queries or keys in the pair-adjacent layout of :func:`pair_rows` by
    ``rot`` (T, 1, D/2) from :func:`rotation`: one complex multiply, or the same arithmetic on real
    pairs; float32 inside, returned in ``x``'s dtype."""
    if rot.is_complex():
        xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
        return torch.view_as_real(xc * rot).flatten(-2).to(x.dtype)
    pairs = x.float().unflatten(-1, (-1, 2))
    a, b, cos, sin = pairs[..., 0], pairs[..., 1], rot[..., 0], rot[..., 1]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2).to(x.dtype)


_causal_bias: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}
CAUSAL_BIASES_KEPT = 4
"""Masks kept, the most recently used: fine-tuning pads each batch to its longest example, so
the sizes vary from batch to batch and one mask per size was never freed (~0.7 GB up to 1,024)."""


def causal_bias(T: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(T, T): 0 on and below the diagonal, -inf above; the last few sizes, dtypes and devices
    kept (made anew inside ``torch.compile``, which folds it into the graph)."""
    if torch.compiler.is_compiling():
        return torch.full((T, T), float("-inf"), dtype=dtype, device=device).triu_(1)
    key = (T, dtype, torch.device(device))
    bias = _causal_bias.pop(key, None)
    if bias is None:
        bias = torch.full((T, T), float("-inf"), dtype=dtype, device=device).triu_(1)
        while len(_causal_bias) >= CAUSAL_BIASES_KEPT:
            del _causal_bias[next(iter(_causal_bias))]  # the least recently used
    _causal_bias[key] = bias  # last: the most recently used
    return bias


class _CausalMatmulAttention(torch.autograd.Function):
    """softmax(q k^T * scale + causal mask) v for (B, H, T, D) tensors of one dtype, as batched
    matrix products (one ``baddbmm`` adds the mask), the softmax in float32 rounded to the
    inputs' dtype (the "eager" attention of Hugging Face's models; torch's CPU softmax of bf16 computes in
    float32 and rounds once, bit-identical to ``softmax(s, dtype=float32).to(bf16)`` without that
    float32 buffer and its copy: 0.91 against 1.06 ms at 48 x 256 x 256, Zen 5; fp16 differs from
    that form by one unit in the last place at some lengths), and a hand-written backward:
    four ``bmm`` and one fused softmax backward, nothing else kept but q, k, v and the
    probabilities.

    Why: torch 2.13's CPU ``scaled_dot_product_attention`` (a flash kernel) keeps its scores in
    float32 and runs small blocks; with bf16 inputs it reached ~80 GFLOP/s on a 2-core Zen 4, while
    bf16 ``bmm`` of these sizes runs several times faster. Forward and backward at 8 x 6 heads x
    256 x 64, bf16, same machine: 10.9 ms against 26.8 for SDPA; in float32 the two are level. The
    probabilities are materialised and kept (B x H x T x T), so for long contexts SDPA's memory is
    better: the choice is made by measuring both at the run's shape, within a memory limit
    (:mod:`lmcore.model.kernels`)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float
                ) -> torch.Tensor:
        B, H, T, D = q.shape
        q3, k3, v3 = q.reshape(B * H, T, D), k.reshape(B * H, T, D), v.reshape(B * H, T, D)
        s = torch.baddbmm(bias.expand(B * H, T, T), q3, k3.transpose(1, 2), alpha=scale)
        # computed in float32 inside, written in s's dtype (no float32 copy); the explicit dtype keeps
        # CUDA autocast, which would return float32 for softmax, from changing it
        p = torch.softmax(s, -1, dtype=s.dtype)
        ctx.save_for_backward(q3, k3, v3, p)
        ctx.scale = scale
        return torch.bmm(p, v3).view(B, H, T, D)

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        q3, k3, v3, p = ctx.saved_tensors
        shape = gy.shape
        gy3 = gy.reshape(q3.shape)
        gv = torch.bmm(p.transpose(1, 2), gy3)
        gs = torch._softmax_backward_data(torch.bmm(gy3, v3.transpose(1, 2)), p, -1, p.dtype)  # p * (g - sum(g p))
        gq = torch.bmm(gs, k3).mul_(ctx.scale)
        gk = torch.bmm(gs.transpose(1, 2), q3).mul_(ctx.scale)
        return gq.view(shape), gk.view(shape), gv.view(shape), None, None


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: str = "sdpa",
                     dropout: float = 0.0) -> torch.Tensor:
    """Causal self-attention of (B, heads, T, D) queries over (B, kv_heads, T, D) keys and values
    (grouped-query when fewer key/value heads), with ``kernel``: ``sdpa`` (torch's
    ``scaled_dot_product_attention``, on every device) or ``matmul`` (:class:`_CausalMatmulAttention`,
    which takes one dtype and no dropout: other calls use SDPA). Which is faster depends on the
    machine, the precision and the shape: :mod:`lmcore.model.kernels` measures it."""
    if kernel == "matmul" and dropout == 0.0 and q.dtype == k.dtype == v.dtype:
        if k.shape[1] != q.shape[1]:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return _CausalMatmulAttention.apply(q, k, v, causal_bias(q.shape[2], q.dtype, q.device), q.shape[-1] ** -0.5)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


class KVCache:
    """Keys and values of the tokens seen so far, per layer: generation feeds each new token once.

    Layer i keeps a (batch, kv_heads, max_len, head_dim) tensor of keys and one of values,
    allocated at its first use in the dtype and on the device of the keys; ``length`` positions are
    filled. Keys are stored after RoPE, in the pair-adjacent layout of :func:`pair_rows`, the layout
    of the queries that read them. Pass the cache to :meth:`Decoder.next_token_logits` (or
    :meth:`Decoder.residual_stream`), which appends the new tokens' keys and values and advances
    ``length``; ``lmcore.generate`` drives it.

    It also keeps each layer's fused weights (q/k/v and gate/up, with the norm folded in) and the
    output head (with the final norm's weight folded in), built at the first step: the weights do
    not change while one generation runs, and building them anew for every token took 40 % of a
    step at batch 1 (small preset).

    For :meth:`Decoder.decode_step` (a step whose shapes do not change as the cache fills, what
    ``torch.compile`` captures once) ``at`` holds the position the next token is written at as a
    one-element tensor, and ``append`` then returns every position, written or not: the buffers
    start zeroed (a masked-out key or value must be finite: 0 x NaN would poison the output), and
    on CUDA they and the fused weights are marked as static addresses, so that a CUDA graph
    updates the buffers in place and reads the weights where they are. Each generation builds its
    own cache, so a CUDA graph is recorded again for each call (a step's time; torch stops
    re-recording a function after ``cudagraph_unexpected_rerecord_limit`` times and runs it
    compiled without the graph)."""

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.length = 0
        self.at: torch.Tensor | None = None
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.weights: dict[tuple[int, str], torch.Tensor] = {}

    def layer(self, i: int) -> LayerCache:
        return LayerCache(self, i)

    def weight(self, key: tuple[int, str], build: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The (out, in) weight ``key``, built by ``build`` at the first call; one with more
        outputs than inputs is kept transposed, an (in, out) contiguous tensor returned as its
        ``.t()`` view (which :func:`linear` takes as any weight).

        Decoding multiplies one row per sequence by every weight, and the default model's 10.6 MB
        of float32 weights do not stay in cache between tokens. From memory (2 threads, Zen 4,
        distinct matrices beyond the caches) ``x @ w_t`` took 201 us against 716 for
        ``F.linear(x, w)`` at 4096 x 256, 106 against 248 at 1408 x 256, 71 against 134 at
        768 x 256, 28 against 33 at 256 x 256, but 115 against 87 at 256 x 704 (more inputs than
        outputs): the rule above."""
        if key not in self.weights:
            w = build().detach()
            w = w.t().contiguous().t() if w.shape[0] > w.shape[1] else w.contiguous()
            self.weights[key] = _static_on_cuda(w)  # a CUDA graph reads it in place, not copied in per token
        return self.weights[key]

    def append(self, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write layer ``i``'s (B, kv_heads, T, D) keys and values at positions ``length ..
        length + T - 1``; return the keys and values of every position up to there. With ``at``
        set: write the one new position ``at`` and return all ``max_len`` positions."""
        if self.at is not None:
            keys, values = self.keys[i], self.values[i]
            keys.index_copy_(2, self.at, k)
            values.index_copy_(2, self.at, v)
            return keys, values
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {self.length} + {k.shape[2]} positions exceed its {self.max_len}")
        if i not in self.keys:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.keys[i] = _static_on_cuda(torch.zeros(shape, dtype=k.dtype, device=k.device))
            self.values[i] = _static_on_cuda(torch.zeros(shape, dtype=v.dtype, device=v.device))
        keys, values = self.keys[i], self.values[i]
        if keys.shape[:2] != k.shape[:2]:
            raise ValueError(f"KV cache holds {tuple(keys.shape[:2])} (batch, kv heads); got {tuple(k.shape[:2])}")
        keys[:, :, self.length : end] = k
        values[:, :, self.length : end] = v
        return keys[:, :, :end], values[:, :, :end]


def _static_on_cuda(t: torch.Tensor) -> torch.Tensor:
    """``t``, marked (on CUDA) as a static address for ``torch.compile``'s CUDA graphs."""
    if t.device.type == "cuda":
        torch._dynamo.mark_static_address(t)
    return t


@dataclasses.dataclass(frozen=True)
class LayerCache:
    """Layer ``index``'s view of a :class:`KVCache`."""

    cache: KVCache
    index: int

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.append(self.index, k, v)

    def weight(self, name: str, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The layer's weight ``name`` (see :meth:`KVCache.weight`)."""
        return self.cache.weight((self.index, name), build)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.dropout = cfg.dropout
        self.kernel = "sdpa"
        """How the causal attention of training and scoring runs (:data:`ATTENTION_KERNELS`; set
        by :meth:`Decoder.use_attention`). Generation and masked calls always use SDPA."""

    def forward(self, x: torch.Tensor, rot: torch.Tensor, norm_weight: torch.Tensor,
                attn_mask: torch.Tensor | None = None, cache: LayerCache | None = None) -> torch.Tensor:
        """``x``: the RMS-normalised input before the norm's weight, which is folded in here.
        With ``cache``, the keys and values of ``x`` are appended to it and the queries attend to
        every cached position (``attn_mask`` must then say which)."""
        B, T, C = x.shape
        H, KV = self.n_head, self.n_kv

        def fused() -> torch.Tensor:  # q, k and v in one matmul; q and k rows in the pair-adjacent RoPE layout
            w = torch.cat([pair_rows(self.q_proj.weight, H), pair_rows(self.k_proj.weight, KV), self.v_proj.weight])
            return w * norm_weight

        w = fused() if cache is None else cache.weight("qkv", fused)
        qkv = linear(x, w).view(B, T, H + 2 * KV, self.head_dim)
        qk = apply_rope(qkv[:, :, : H + KV], rot)  # q and k heads rotated together
        q, k = qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2)  # (B, heads, T, D) views
        v = qkv[:, :, H + KV :].transpose(1, 2)
        if cache is not None:
            k, v = cache.append(k, v)
        drop = self.dropout if self.training else 0.0
        gqa = KV != H  # each key/value head serves n_head / n_kv query heads
        emulated = emulating_bf16(x)
        if emulated:  # attention in float32 on the bf16-rounded q, k, v (see `linear`): 2x faster
            q, k, v = q.float(), k.float(), v.float()
        with torch.autocast("cpu", enabled=False) if emulated else contextlib.nullcontext():
            if attn_mask is None and cache is None:  # causal
                y = causal_attention(q, k, v, self.kernel, drop)
            elif attn_mask is None:  # from a cache, one query that sees every key
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, enable_gqa=gqa)
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop, enable_gqa=gqa)
        o = self.o_proj.weight if cache is None else cache.weight("o", lambda: self.o_proj.weight)
        return linear(y.transpose(1, 2).reshape(B, T, C), o)


class SwiGLU(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor, norm_weight: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        """``x``: the RMS-normalised input before the norm's weight, which is folded in here.
        ``cache``: where generation keeps the fused weight."""
        def fused() -> torch.Tensor:
            return torch.cat([self.gate_proj.weight, self.up_proj.weight]) * norm_weight

        w = fused() if cache is None else cache.weight("gate_up", fused)
        gate, up = linear(x, w).chunk(2, dim=-1)  # gate and up in one matmul
        down = self.down_proj.weight if cache is None else cache.weight("down", lambda: self.down_proj.weight)
        return linear(F.silu(gate) * up, down)


class Block(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.n_embd)
        self.mlp = SwiGLU(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rot, attn_mask=None, cache=None):
        # each norm's weight multiplies the columns of the next matmul's weight instead of the
        # activations, (x * g) @ W.T = x @ (W * g).T: a pass over the weights instead of passes
        # over the activations, forward and backward
        # (the norm, fused q/k/v and this folding: 10 % faster than norm + 3 projections)
        # (dropout only where it does something: the module call costs ~10 us a token in decoding)
        drop = self.drop if self.training and self.drop.p > 0 else _identity
        h = rms_normalize(x, self.attn_norm.eps)
        x = x + drop(self.attn(h, rot, self.attn_norm.weight, attn_mask, cache))
        h = rms_normalize(x, self.mlp_norm.eps)
        return x + drop(self.mlp(h, self.mlp_norm.weight, cache))


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


# ---------------------------------------------------------------------------------------------
# the loss


class _RowCrossEntropy(torch.autograd.Function):
    """Per-row cross-entropy of (N, V) logits in float32, with a leaner backward than autograd's.

    ``F.cross_entropy(logits.float())`` writes a float32 copy of bf16 logits, and its backward
    zero-fills an N x V gradient, scatters into it and runs the log-softmax backward: several
    passes over N x V floats (16.8M at batch 16 x 256, vocabulary 4096). Here the forward is one
    fused softmax that reads the logits in their own dtype and writes the float32 probabilities,
    which the backward scales in place (softmax - one_hot, scaled): no exp in the backward. The
    loss of row r with target t is ``max_r - x_t + log(sum_r)``, the log-softmax's own formula,
    with ``log(sum_r) = -log(p_max)`` read from the largest probability (at least 1 / V, so
    nothing underflows however far the target's logit lies below the maximum).

    Forward and backward of 2048 x 4096 logits (2 threads, Zen 4, tcmalloc): 10.5 ms against
    12.9 for the log-softmax form this replaced (an exp in its backward), in float32; 13.5
    against 14.7 from bf16 logits; level under glibc's malloc, where fresh N x V buffers'
    page faults dominate (33-36 ms). That form was itself 2x faster than ``F.cross_entropy``. Chunking the rows to stay in cache was 5x slower on
    the shared 2-core machine (hundreds of small ops, each waiting for both threads). Plain torch
    ops, used on every device: on a GPU it also keeps one float32 N x V buffer fewer alive than
    ``F.cross_entropy`` of float32 logits (the zero-filled gradient)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
        dtype = torch.promote_types(logits.dtype, torch.float32)
        probs = torch.softmax(logits, dim=-1, dtype=dtype)
        valid = targets != ignore_index
        safe = torch.where(valid, targets, 0)
        top = logits.amax(dim=-1, keepdim=True)  # amax: max with indices took 7x longer
        log_sum = -torch.log(probs.amax(dim=-1, keepdim=True))  # log(sum_v exp(x_v - max)): p_max = 1 / sum
        loss = (top.to(dtype) - logits.gather(1, safe[:, None]).to(dtype) + log_sum).squeeze(1)
        ctx.save_for_backward(probs, safe, valid)
        ctx.dtype = logits.dtype
        return torch.where(valid, loss, 0.0)

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor):
        probs, safe, valid = ctx.saved_tensors
        scale = torch.where(valid, grad_rows, 0.0)
        rows = torch.arange(len(safe), device=probs.device)
        # softmax, scaled, written in the logits' dtype at once (a new buffer: a retained graph may
        # run this again); the target's entry, (p_t - 1) * scale, computed in float32 first
        grad = torch.empty(probs.shape, dtype=ctx.dtype, device=probs.device)
        torch.mul(probs, scale[:, None], out=grad)
        grad[rows, safe] = ((probs[rows, safe] - 1) * scale).to(ctx.dtype)
        return grad, None, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean") -> torch.Tensor:
    """``F.cross_entropy(logits.float(), targets, ...)`` for (N, V) logits (see
    :class:`_RowCrossEntropy`)."""
    rows = _RowCrossEntropy.apply(logits, targets, ignore_index)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if reduction == "mean":
        return rows.sum() / (targets != ignore_index).sum()
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', not {reduction!r}")


# ---------------------------------------------------------------------------------------------
# the model


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_cache(cfg.block_size, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2 style: shrink the residual projections by depth
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def residual_stream(self, idx: torch.Tensor, attn_mask: torch.Tensor | None = None, *,
                        positions: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                        cache: KVCache | None = None) -> torch.Tensor:
        """The residual stream after the last block, before the final norm: (B, T, n_embd).

        For generation: ``positions`` (B, T) gives each token's RoPE position (default
        ``cache.length ..``, or ``0 .. T - 1``); ``key_mask`` (B, cached + T), True for real tokens,
        masks out padding keys (each token still sees itself, so padding rows stay finite);
        ``cache`` (:class:`KVCache`) holds the earlier tokens' keys and values and receives
        these. With either of the last two the causal mask is built here (no ``attn_mask``; none
        at all for one new token after a cache without ``key_mask``)."""
        T = idx.shape[1]
        start = 0 if cache is None else cache.length
        if start + T > self.cfg.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.cfg.block_size}")
        if positions is None:
            # e^(i * angle) per position, broadcast over heads: (T, 1, head_dim / 2)
            span = slice(start, start + T)
            rot = rotation(self.rope_cos[span].float(), self.rope_sin[span].float())[:, None]
        else:
            low, high = torch.stack(torch.aminmax(positions)).tolist() if positions.numel() else (0, 0)
            if not 0 <= low <= high < self.cfg.block_size:
                raise ValueError(f"positions must lie in 0 .. {self.cfg.block_size - 1} (block_size)")
            rot = self._rotation_at(positions)
        if cache is not None or key_mask is not None:
            if attn_mask is not None:
                raise ValueError("give attn_mask, or key_mask/cache (which build the mask), not both")
            if key_mask is not None or T > 1:  # one new token without padding sees every cached key: no mask
                attn_mask = self._decode_mask(idx.shape[0], start, T, key_mask, idx.device)
        x = self.embed(idx)
        for i, block in enumerate(self.blocks):
            x = block(x, rot, attn_mask, None if cache is None else cache.layer(i))
        if cache is not None:
            cache.length += T
        return x

    @staticmethod
    def _decode_mask(batch: int, start: int, T: int, key_mask: torch.Tensor | None, device) -> torch.Tensor:
        """Which of the ``start + T`` keys each of the T new queries sees: (T, L), or (B, 1, T, L)
        with ``key_mask``: earlier or same position, a real key (or the query's own key)."""
        L = start + T
        q = torch.arange(start, L, device=device)[:, None]
        k = torch.arange(L, device=device)[None, :]
        allowed = k <= q
        if key_mask is None:
            return allowed
        if key_mask.shape != (batch, L):
            raise ValueError(f"key_mask has shape {tuple(key_mask.shape)}; expected (batch, cached + new tokens) "
                             f"= {(batch, L)}")
        return ((allowed & key_mask[:, None, :].bool()) | (k == q))[:, None]

    def hidden_states(self, idx: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final normalised hidden states, shape (B, T, n_embd)."""
        return self.norm(self.residual_stream(idx, attn_mask))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                reduction: str = "mean", return_logits: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits (B, T, vocab) and, given ``targets`` (-100 = ignore), the cross-entropy.

        ``return_logits=False`` (with targets) gives ``(None, loss)``: what the training step and
        validation ask for. Accelerate's mixed precision converts every output of the prepared
        model to float32, and the bf16 logits' copy (B x T x vocab) was 6 % of a training step
        (2 x 256, batch 8, Zen 4)."""
        # the final norm's weight folded into the output projection, as in Block
        logits = self.norm(self.residual_stream(idx), project=self.lm_head.weight)
        loss = None
        if targets is not None:
            loss = cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction=reduction)
        elif not return_logits:
            raise ValueError("return_logits=False needs targets: there would be nothing to return")
        return (logits if return_logits else None), loss

    def next_token_logits(self, idx: torch.Tensor, *, positions: torch.Tensor | None = None,
                          key_mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Float32 logits (B, vocab) after the last token of ``idx``: the output head runs on that
        position only (arguments as for :meth:`residual_stream`)."""
        h = self.residual_stream(idx, positions=positions, key_mask=key_mask, cache=cache)[:, -1]
        if cache is None:  # the norm's weight on the B rows, not folded into the vocab x n_embd head (a copy)
            return linear(self.norm(h), self.lm_head.weight).float()
        return self._cached_head(h, cache)

    def _rotation_at(self, positions: torch.Tensor) -> torch.Tensor:
        """The RoPE rotation (:func:`rotation`) at (B, T) ``positions``, broadcast over heads."""
        return rotation(self.rope_cos[positions].float(), self.rope_sin[positions].float())[:, :, None]

    def _cached_head(self, h: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Float32 logits of the final hidden rows ``h`` (B, n_embd), the final norm's weight
        folded into the head weight that ``cache`` keeps for the whole generation."""
        head = cache.weight((-1, "head"), lambda: self.lm_head.weight * self.norm.weight)
        return linear(rms_normalize(h, self.norm.eps), head).float()

    def decode_step(self, idx: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor,
                    cache: KVCache) -> torch.Tensor:
        """Float32 logits (B, vocab) of one new token per row: :meth:`next_token_logits` for
        ``idx`` (B, 1) at RoPE ``positions`` (B, 1), its keys and values written into ``cache`` at
        ``cache.at``, attending to the keys that ``key_mask`` (B, cache.max_len) marks (its own
        included). No shape depends on how many positions are filled and nothing reads a tensor
        on the host, so ``torch.compile`` captures it once per batch size, and a CUDA graph can
        replay it (``lmcore.generate`` compiles it; it also runs as it is). The caller moves
        ``cache.at`` and ``cache.length`` on; the cache's weights must have been built by an
        earlier call of :meth:`next_token_logits` (the prompt's)."""
        rot = self._rotation_at(positions)
        attn_mask = key_mask[:, None, None, :]
        x = self.embed(idx)
        for i, block in enumerate(self.blocks):
            x = block(x, rot, attn_mask, cache.layer(i))
        return self._cached_head(x[:, -1], cache)

    def use_attention(self, kernel: str) -> None:
        """Compute causal attention with ``kernel`` (:data:`ATTENTION_KERNELS`) in every block;
        :func:`lmcore.model.kernels.attention_kernel` says which is faster here."""
        if kernel not in ATTENTION_KERNELS:
            raise ValueError(f"attention kernel must be one of {ATTENTION_KERNELS}, not {kernel!r}")
        for block in self.blocks:
            block.attn.kernel = kernel

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if embeddings else n - self.embed.weight.numel()

    def matmul_params(self) -> int:
        """Parameters that take part in a matrix multiply: every linear layer including the output
        projection (counted once even when tied); the embedding lookup table is excluded."""
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))

    def flops_per_token(self) -> int:
        """Training FLOPs per token = 6 * matmul_params + 12 * n_layer * n_embd * block_size.

        6 = 2 FLOPs per multiply-add x 3 (forward, and backward for inputs and weights). The
        attention term counts QK^T and AV (2 * 2 * T * n_embd per token and layer, forward)
        times 3, over the full T x T score matrix (the causal half is not subtracted), as in
        the PaLM paper's MFU appendix. Norms, RoPE, softmax and the loss are not counted.
        """
        c = self.cfg
        return 6 * self.matmul_params() + 12 * c.n_layer * c.n_embd * c.block_size
