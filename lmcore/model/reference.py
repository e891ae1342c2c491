"""The textbook decoder: the oracle that :mod:`lmcore.model.decoder` is tested against.

:func:`reference_forward` computes, from a :class:`~lmcore.model.decoder.Decoder`'s own parameters,
the function that the Llama paper and Hugging Face's ``LlamaForCausalLM`` describe, written the
plain way, one step per line and no trick:

1. token embedding;
2. per block: RMSNorm with its weight, separate q, k and v projections, "rotate half" RoPE, keys
   and values repeated for grouped-query attention, causal attention, the output projection and
   the residual; then RMSNorm with its weight, the SwiGLU feed-forward
   (``down(silu(gate(h)) * up(h))``) and the residual;
3. the final RMSNorm with its weight and the output head (the embedding, when tied);
4. ``F.cross_entropy`` on float32 logits.

The decoder computes the same function faster (fused projections, norm weights folded into the
next matmul, paired-row complex RoPE, a leaner loss backward); ``tests/test_model.py`` checks
logits, loss and every gradient against this one. Start reading here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmcore.model.decoder import Decoder


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dimension, computed in float32."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def rope_cos_sin(T: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (T, head_dim) of the angles ``t * theta^(-2i/head_dim)``, each repeated for the
    two halves of a head ("rotate half" layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(T, dtype=torch.float32), inv_freq)
    angles = torch.cat([freqs, freqs], -1)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE: dimension ``i`` of each head turns with dimension ``i + head_dim / 2``."""
    D = x.shape[-1]
    rotated = torch.cat([-x[..., D // 2 :], x[..., : D // 2]], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


def reference_forward(model: Decoder, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, T, vocab) and mean cross-entropy (``-100`` = ignore) of ``model``'s parameters,
    computed the textbook way (see the module docstring); gradients flow to the parameters."""
    cfg = model.cfg
    B, T = idx.shape
    H, KV, D, C = cfg.n_head, cfg.kv_heads, cfg.head_dim, cfg.n_embd
    cos, sin = rope_cos_sin(T, D, cfg.rope_theta)

    x = model.embed(idx)
    for b in model.blocks:
        a, m = b.attn, b.mlp
        h = rms_norm(x, b.attn_norm.weight)
        q = rotate_half(a.q_proj(h).view(B, T, H, D).transpose(1, 2), cos, sin)
        k = rotate_half(a.k_proj(h).view(B, T, KV, D).transpose(1, 2), cos, sin).repeat_interleave(H // KV, dim=1)
        v = a.v_proj(h).view(B, T, KV, D).transpose(1, 2).repeat_interleave(H // KV, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + a.o_proj(y.transpose(1, 2).reshape(B, T, C))
        h = rms_norm(x, b.mlp_norm.weight)
        x = x + m.down_proj(F.silu(m.gate_proj(h)) * m.up_proj(h))
    logits = model.lm_head(rms_norm(x, model.norm.weight))
    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
    return logits, loss
