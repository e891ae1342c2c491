"""Hugging Face Llama names of lmcore's parameters, and Llama folders loaded as lmcore models.

lmcore's decoder is a Llama (RoPE in the "rotate half" layout, RMSNorm, SwiGLU, no biases,
grouped-query attention), so the two differ only in tensor names:

    embed.weight                      -> model.embed_tokens.weight
    blocks.{i}.attn_norm.weight       -> model.layers.{i}.input_layernorm.weight
    blocks.{i}.attn.{q,k,v,o}_proj    -> model.layers.{i}.self_attn.{q,k,v,o}_proj
    blocks.{i}.mlp_norm.weight        -> model.layers.{i}.post_attention_layernorm.weight
    blocks.{i}.mlp.{gate,up,down}_proj -> model.layers.{i}.mlp.{gate,up,down}_proj
    norm.weight                       -> model.norm.weight
    lm_head.weight                    -> lm_head.weight (left out when tied to the embedding)

:func:`hf_name` maps one way (``lmcore.export`` writes the folder with it); :func:`load_llama`
reads such a folder back.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file

from lmcore.core.errors import StageError
from lmcore.core.io import require
from lmcore.model.decoder import Decoder, DecoderConfig

_RENAMES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), r) for p, r in (
        (r"embed\.weight", "model.embed_tokens.weight"),
        (r"norm\.weight", "model.norm.weight"),
        (r"lm_head\.weight", "lm_head.weight"),
        (r"blocks\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
        (r"blocks\.(\d+)\.mlp_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
        (r"blocks\.(\d+)\.attn\.(q_proj|k_proj|v_proj|o_proj)\.weight", r"model.layers.\1.self_attn.\2.weight"),
        (r"blocks\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight", r"model.layers.\1.mlp.\2.weight"),
    )
]


def hf_name(name: str) -> str | None:
    """The Hugging Face Llama name of an lmcore parameter (None: no counterpart)."""
    for pattern, repl in _RENAMES:
        if pattern.fullmatch(name):
            return pattern.sub(repl, name)
    return None


def load_llama(folder: Path, c: dict[str, Any]) -> Decoder:
    """An lmcore Decoder holding the weights of a Llama folder (the reverse of lmcore.export)."""


    where = folder / "config.json"
    unsupported = {k: c.get(k) for k, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False),
                                             ("rope_scaling", None)) if c.get(k, ok) != ok}
    rope = c.get("rope_parameters") or {}  # transformers 5 writes the RoPE settings here, scaling included
    if not isinstance(rope, dict):
        raise StageError(f"{where}: rope_parameters = {rope!r}: a mapping (rope_type, rope_theta) or null")
    if rope.get("rope_type", "default") != "default":
        unsupported["rope_parameters.rope_type"] = rope["rope_type"]
    try:
        if float(c.get("rms_norm_eps", 1e-5)) != 1e-5:
            unsupported["rms_norm_eps"] = c["rms_norm_eps"]
        n_embd, n_head, width = int(c["hidden_size"]), int(c["num_attention_heads"]), int(c["intermediate_size"])
        if c.get("head_dim") is not None and int(c["head_dim"]) * n_head != n_embd:
            unsupported["head_dim"] = c["head_dim"]
        if width % 64:
            unsupported["intermediate_size"] = width
        if unsupported:
            raise StageError(f"{where}: {unsupported} differ from lmcore's Llama (silu, no biases, no RoPE scaling, "
                             "rms_norm_eps 1e-5, head_dim = hidden_size / num_attention_heads, a feed-forward width "
                             "that is a multiple of 64): load it with transformers instead")
        # the ratio that gives back exactly this width (lmcore rounds ratio x n_embd up to a multiple of 64,
        # and width / n_embd x n_embd can land a hair above the width)
        ratio = next(r for r in (width / n_embd, (width - 0.5) / n_embd) if 64 * math.ceil(r * n_embd / 64) == width)
        gcfg = DecoderConfig(vocab_size=int(c["vocab_size"]), n_layer=int(c["num_hidden_layers"]), n_head=n_head,
                         n_kv_heads=int(c.get("num_key_value_heads", n_head)), n_embd=n_embd,
                         block_size=int(c["max_position_embeddings"]), mlp_ratio=ratio,
                         tie_embeddings=bool(c.get("tie_word_embeddings", False)),
                         rope_theta=float(c.get("rope_theta", rope.get("rope_theta", 1e4))))
    except KeyError as e:
        raise StageError(f"{where}: missing key {e}") from None
    except (ValueError, TypeError, StopIteration) as e:  # a null, a string, a shape lmcore cannot hold
        raise StageError(f"{where}: not a Llama configuration lmcore can hold "
                         f"({' '.join(str(e).split())[:300] or type(e).__name__})") from None
    model = Decoder(gcfg)
    ours = {hf_name(k): k for k in model.state_dict() if hf_name(k)}
    weights = require(folder / "model.safetensors", "model weights (model.safetensors)")
    state = {}
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise StageError(f"{weights}: not readable safetensors ({' '.join(str(e).split())[:300]})") from None
    for name, t in tensors.items():
        if name.endswith(".rotary_emb.inv_freq"):  # older conversions saved RoPE's buffer: computed here
            continue
        if name not in ours:
            raise StageError(f"{weights}: tensor '{name}' has no lmcore counterpart")
        state[ours[name]] = t.float()
    if gcfg.tie_embeddings:
        if "embed.weight" not in state:
            raise StageError(f"{weights}: no model.embed_tokens.weight, which tie_word_embeddings: true in "
                             f"{where} shares with the output head")
        state["lm_head.weight"] = state["embed.weight"]
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of another shape than config.json says
        raise StageError(f"{weights}: does not match {folder / 'config.json'} "
                         f"({' '.join(str(e).split())[:300]})") from None
    missing = [k for k in missing if not k.startswith("rope_")]  # buffers, not weights
    if missing or unexpected:
        raise StageError(f"{weights}: missing tensors {missing[:5]}, unexpected {unexpected[:5]}")
    return model
