"""Stage ``export``: the pretrained model as a Hugging Face Llama folder.

lmcore's decoder is a Llama (RoPE in the "rotate half" layout, RMSNorm, SwiGLU, no biases,
grouped-query attention), so exporting is a renaming of tensors, with no permutation (the table
of names is in :mod:`lmcore.model.llama`, which also reads such a folder back).

The folder (``runs/export``) holds ``config.json`` (a ``LlamaConfig``), ``generation_config.json``,
``model.safetensors`` and the tokenizer files, and loads with
``transformers.AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``; vLLM,
llama.cpp's ``convert_hf_to_gguf.py`` and lm-evaluation-harness (``--model hf``) take it as it is.
lmcore never imports ``transformers``: the JSON files and the safetensors file are written
directly. The whole folder is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lmcore.config import ExportConfig, TrackingConfig, flatten
from lmcore.core.errors import StageError
from lmcore.core.io import atomic_path, require, write_json
from lmcore.data.tokenizer import load
from lmcore.model.folder import check_tokenizer, decoder_config, load_decoder
from lmcore.model.llama import hf_name
from lmcore.tracking import stage_run

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

def llama_config(gcfg: Any, eps: float, dtype: str, ids: dict[str, int]) -> dict[str, Any]:
    """``config.json`` of the Llama model equivalent to an lmcore ``DecoderConfig``."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": gcfg.vocab_size,
        "hidden_size": gcfg.n_embd,
        "intermediate_size": gcfg.mlp_hidden,
        "num_hidden_layers": gcfg.n_layer,
        "num_attention_heads": gcfg.n_head,
        "num_key_value_heads": gcfg.kv_heads,
        "head_dim": gcfg.head_dim,
        "max_position_embeddings": gcfg.block_size,
        "hidden_act": "silu",
        "rms_norm_eps": eps,
        # rope_theta for transformers 4.x, vLLM and llama.cpp; rope_parameters for transformers 5
        "rope_theta": gcfg.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": gcfg.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "tie_word_embeddings": gcfg.tie_embeddings,
        "use_cache": True,
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["pad"],
        "torch_dtype": dtype,  # transformers 4.x
        "dtype": dtype,  # transformers 5
    }


def _expected_shapes(c: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    h, v, i, hd = c["hidden_size"], c["vocab_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
        })
    return shapes


def hf_state_dict(model: Any, config: dict[str, Any], dtype: Any) -> dict[str, Any]:
    """The model's tensors under their Llama names, in ``dtype``, checked against ``config``."""
    tied = config["tie_word_embeddings"]
    out: dict[str, Any] = {}
    unknown = []
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue  # the same tensor as the embedding
        new = hf_name(name)
        if new is None:
            unknown.append(name)
            continue
        out[new] = t.detach().to("cpu", dtype).contiguous()
    if unknown:
        raise StageError(f"export: model tensors without a Llama counterpart: {', '.join(unknown)} "
                         "(lmcore/export.py maps lmcore names to Llama names)")
    want = _expected_shapes(config)
    got = {k: tuple(v.shape) for k, v in out.items()}
    if got != want:
        diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        raise StageError("export: tensors do not match the Llama config: "
                         + ", ".join(f"{k} (expected {want.get(k)}, got {got.get(k)})" for k in diff[:6]))
    return out


def _token(value: Any) -> str | None:
    """A token string from ``tokenizer_config.json`` (a string or an ``{"content": ...}`` dict)."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_tokenizer(tokenizer_dir: Path) -> tuple[Any, dict[str, Any], dict[str, Any]]:

    tok = load(tokenizer_dir)
    files = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = require(tokenizer_dir / name, "tokenizer file")
        try:
            files[name] = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise StageError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    return tok, files["tokenizer_config.json"], files["special_tokens_map.json"]


def _special_ids(tok: Any, tok_cfg: dict[str, Any], path: Path) -> tuple[dict[str, int], dict[str, str]]:
    """Ids and strings of bos/eos/pad: eos and pad from ``tokenizer_config.json``; the end-of-text
    token (eos) doubles as bos."""
    eos, pad = _token(tok_cfg.get("eos_token")), _token(tok_cfg.get("pad_token"))
    tokens = {"bos": eos, "eos": eos, "pad": pad}
    ids = {}
    for role, token in tokens.items():
        i = tok.token_to_id(token) if token else None
        if i is None:
            raise StageError(f"{path}/tokenizer_config.json: {role} token {token!r} is not in the vocabulary")
        ids[role] = i
    return ids, tokens


@dataclasses.dataclass
class ExportResult:
    path: Path
    n_params: int
    size_bytes: int
    """Bytes of ``model.safetensors``."""
    dtype: str
    tied: bool


def export(cfg: ExportConfig, model_dir: Path, tokenizer_dir: Path, out: Path, metrics: Path,
           tracking: TrackingConfig = TrackingConfig()) -> ExportResult:
    """Write the model of ``model_dir`` (an lmcore model folder) and the tokenizer of
    ``tokenizer_dir`` to ``out`` as a Hugging Face Llama folder."""


    model_dir, tokenizer_dir, out = Path(model_dir), Path(tokenizer_dir), Path(out)
    require(model_dir, "pretrained model folder")
    require(tokenizer_dir, "tokenizer folder")
    tok, tok_cfg, special_map = _read_tokenizer(tokenizer_dir)
    ids, tokens = _special_ids(tok, tok_cfg, tokenizer_dir)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]

    shape, model_cfg = decoder_config(model_dir)  # checked, with its tokenizer, before the weights are read
    check_tokenizer(model_cfg, shape.vocab_size, tok, tokenizer_dir / "tokenizer.json", model_dir)
    model = load_decoder(model_dir, shape=shape).eval()
    g = model.cfg

    with stage_run("export", tracking, flatten(cfg, "export."), inputs=[model_dir, tokenizer_dir],
                   outputs=[out]) as tr:
        eps = float(getattr(model.norm, "eps", 1e-5))
        config = llama_config(g, eps, cfg.dtype, ids)
        tensors = hf_state_dict(model, config, torch_dtype)
        n_params = sum(t.numel() for t in tensors.values())

        tok_config = {**tok_cfg, "bos_token": tokens["bos"], "eos_token": tokens["eos"], "pad_token": tokens["pad"],
                      "model_max_length": g.block_size, "add_bos_token": False, "add_eos_token": False}
        special = {**special_map, "bos_token": tokens["bos"], "eos_token": tokens["eos"], "pad_token": tokens["pad"]}
        generation = {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"]}

        with atomic_path(out) as tmp:
            tmp.mkdir()
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            for name, obj in (("config.json", config), ("generation_config.json", generation),
                              ("tokenizer_config.json", tok_config), ("special_tokens_map.json", special)):
                (tmp / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            (tmp / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())

        size = (out / "model.safetensors").stat().st_size
        folder = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
        result = ExportResult(out, n_params, size, cfg.dtype, g.tie_embeddings)
        write_json(metrics, {"n_params": n_params, "size_bytes": size, "folder_bytes": folder, "dtype": cfg.dtype})
        tr.metrics({"n_params": n_params, "size_bytes": size, "folder_bytes": folder})
        tr.export_model(out, model_dir)
        log.info("export: %s parameters (%s, %.1f MB) as a Llama folder in %s", f"{n_params:,}", cfg.dtype,
                 size / 1e6, out)
        return result
