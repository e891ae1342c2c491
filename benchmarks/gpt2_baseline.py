"""A plain GPT-2 decoder with lmcore's model interface, the baseline of ``benchmarks/quality.py``.

GPT-2 as published (Radford et al. 2019; the layout of OpenAI's ``model.py`` and Hugging Face's
``GPT2LMHeadModel``): learned absolute position embeddings added to the token embeddings,
pre-norm LayerNorm (with bias) before attention and MLP plus a final LayerNorm, one fused
query/key/value projection with bias, causal attention through ``scaled_dot_product_attention``,
a 4x MLP with GELU (tanh approximation, GPT-2's ``gelu_new``), biases on every linear layer
except the output head, the output head tied to the token embedding. Initialisation as GPT-2:
normal(0, 0.02) for linear layers and both embeddings, zero biases, LayerNorm 1/0, and the two
residual output projections (``attn.c_proj``, ``mlp.c_proj``) at 0.02 / sqrt(2 x layers).

It takes lmcore's :class:`lmcore.model.decoder.DecoderConfig` (``mlp_ratio``, ``n_kv_heads`` and
``rope_theta`` are Llama options and ignored: GPT-2's MLP is 4x wide and every head has its own
keys and values) and offers what ``lmcore.train.pretrain.pretrain(..., build_model=GPT2)`` uses:
``forward(idx, targets=None, reduction="mean", return_logits=True) -> (logits, loss)`` (targets of -100 ignored),
``num_params()``, ``matmul_params()``, ``flops_per_token()`` and ``cfg``.

Parameter names keep lmcore's conventions where its optimiser looks at them: the embeddings
contain ``embed`` (no weight decay, as lmcore's tied embedding) and the blocks live under
``blocks.`` (the matrices Muon would take).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmcore.model.decoder import DecoderConfig


class GPT2Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class GPT2MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class GPT2Block(nn.Module):
    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=1e-5)
        self.attn = GPT2Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=1e-5)
        self.mlp = GPT2MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x)))
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPT2(nn.Module):
    """GPT-2 with lmcore's interface (see the module docstring)."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)  # GPT-2's wte
        self.pos_embed = nn.Embedding(cfg.block_size, cfg.n_embd)  # GPT-2's wpe
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(GPT2Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=1e-5)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.embed.weight  # GPT-2 always ties them
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                reduction: str = "mean", return_logits: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits (B, T, vocab) and, given ``targets`` (-100 = ignore), the cross-entropy
        (``return_logits=False``: ``(None, loss)``, as lmcore's Decoder)."""
        T = idx.shape[1]
        if T > self.cfg.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.cfg.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.embed(idx) + self.pos_embed(pos))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-100, reduction=reduction)
        return (logits if return_logits else None), loss

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())  # the tied head is counted once
        return n if embeddings else n - self.embed.weight.numel() - self.pos_embed.weight.numel()

    def matmul_params(self) -> int:
        """Weights of every linear layer, the output projection included (once, though tied);
        the lookup tables (token and position embeddings) and biases are excluded."""
        return sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))

    def flops_per_token(self) -> int:
        """6 x matmul_params + 12 x layers x width x context: lmcore's formula
        (:meth:`lmcore.model.decoder.Decoder.flops_per_token`)."""
        c = self.cfg
        return 6 * self.matmul_params() + 12 * c.n_layer * c.n_embd * c.block_size
