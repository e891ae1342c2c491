"""The export stage: an lmcore model as a Hugging Face Llama folder that transformers loads and
that gives the same logits and the same token ids."""

from __future__ import annotations

import importlib
import json
import random
import re
import struct
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, make_text, mlflow_runs

from lmcore.config import ExportConfig, TokenizerConfig, TrackingConfig
from lmcore.core.errors import StageError
from lmcore.data.tokenizer import save as save_tokenizer
from lmcore.data.tokenizer import train
from lmcore.export import export
from lmcore.model.decoder import Decoder, DecoderConfig
from lmcore.model.folder import save_decoder

OFF = TrackingConfig(enabled=False)
VOCAB = 300
SENTENCE = "The king, the queen and 12 swords: a fair night!"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer trained on a few lines, saved as the tokenizer stage does."""
    cfg = TokenizerConfig(vocab_size=VOCAB)
    rng = random.Random(0)
    tok = train(cfg, [make_text(rng, 80) for _ in range(20)])
    assert tok.get_vocab_size() <= VOCAB
    folder = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(tok, cfg, folder)
    return folder


def tiny_model(folder: Path, seed: int = 0, **shape) -> Decoder:
    """A tiny Decoder with random weights (norms too, so that their mapping matters), saved to ``folder``."""
    torch.manual_seed(seed)
    model = Decoder(DecoderConfig(**{"vocab_size": VOCAB, "n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 32,
                             **shape})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.5 * torch.randn_like(p))
            elif not name.startswith("lm_head"):  # the tied head is the embedding
                p.copy_(0.2 * torch.randn_like(p))
        if not model.cfg.tie_embeddings:
            model.lm_head.weight.copy_(0.2 * torch.randn_like(model.lm_head.weight))
    save_decoder(model, folder)
    return model


def hf_model(folder: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="eager").eval()


def safetensors_header(path: Path) -> dict:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n])


SHAPES = {
    "tied": {"tie_embeddings": True},
    "untied": {"tie_embeddings": False},
    "grouped_query": {"n_kv_heads": 2, "tie_embeddings": False, "rope_theta": 500.0, "mlp_ratio": 3.0},
}


@pytest.mark.parametrize("case", list(SHAPES))
def test_transformers_loads_the_folder_with_the_same_logits_and_token_ids(case, tmp_path, tokenizer_dir):
    model = tiny_model(tmp_path / "model", **SHAPES[case])
    out = tmp_path / "runs/export"
    res = export(ExportConfig(), tmp_path / "model", tokenizer_dir, out, tmp_path / "metrics/export.json", OFF)

    files = sorted(p.name for p in out.iterdir())
    assert files == ["config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
                     "tokenizer.json", "tokenizer_config.json"]
    assert not [p for p in out.rglob("*") if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"}]
    assert not [p for p in out.parent.iterdir() if p.name != "export"]  # no temporary folder left behind

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["tie_word_embeddings"] is model.cfg.tie_embeddings
    assert cfg["num_key_value_heads"] == model.cfg.kv_heads and cfg["intermediate_size"] == model.cfg.mlp_hidden
    header = safetensors_header(out / "model.safetensors")
    assert header["__metadata__"] == {"format": "pt"}
    assert ("lm_head.weight" in header) is (not model.cfg.tie_embeddings)
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F32"}
    assert res.n_params == model.num_params() and res.dtype == "float32"
    assert res.size_bytes == (out / "model.safetensors").stat().st_size
    metrics = json.loads((tmp_path / "metrics/export.json").read_text())
    assert metrics["n_params"] == model.num_params() and metrics["dtype"] == "float32"

    hf = hf_model(out)
    assert hf.num_parameters() == model.num_params()
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(ids)
        theirs = hf(input_ids=ids).logits
    assert ours.abs().max() > 1.0  # random weights: the logits are far from zero
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)

    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    ours_tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    theirs_tok = AutoTokenizer.from_pretrained(str(out))
    assert theirs_tok(SENTENCE)["input_ids"] == ours_tok.encode(SENTENCE).ids
    assert theirs_tok.decode(ours_tok.encode(SENTENCE).ids) == SENTENCE
    eot, pad = ours_tok.token_to_id("<|endoftext|>"), ours_tok.token_to_id("<|pad|>")
    assert (theirs_tok.bos_token_id, theirs_tok.eos_token_id, theirs_tok.pad_token_id) == (eot, eot, pad)
    assert (hf.config.bos_token_id, hf.config.eos_token_id, hf.config.pad_token_id) == (eot, eot, pad)
    assert (hf.generation_config.eos_token_id, hf.generation_config.pad_token_id) == (eot, pad)


def test_bfloat16_export_holds_the_rounded_weights(tmp_path, tokenizer_dir):
    model = tiny_model(tmp_path / "model", tie_embeddings=False)
    out = tmp_path / "export"
    res = export(ExportConfig(dtype="bfloat16"), tmp_path / "model", tokenizer_dir, out, tmp_path / "m.json", OFF)
    header = safetensors_header(out / "model.safetensors")
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == cfg["dtype"] == "bfloat16" and res.dtype == "bfloat16"

    # transformers upcasting the bf16 weights gives lmcore's model with its weights rounded to bf16
    with torch.no_grad():
        for p in model.parameters():  # the weights only: the RoPE tables stay float32
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(out)(input_ids=ids).logits, model(ids)[0], atol=1e-4, rtol=0)


def test_a_missing_model_folder_names_the_path_and_writes_nothing(tmp_path, tokenizer_dir):
    out = tmp_path / "runs/export"
    missing = tmp_path / "runs/pretrain/final"
    with pytest.raises(StageError, match=re.escape(str(missing))):
        export(ExportConfig(), missing, tokenizer_dir, out, tmp_path / "metrics/export.json", OFF)
    assert not out.exists() and not (tmp_path / "metrics").exists()
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_missing_tokenizer_names_the_path(tmp_path):
    tiny_model(tmp_path / "model")
    with pytest.raises(StageError, match=re.escape(str(tmp_path / "tokenizer"))):
        export(ExportConfig(), tmp_path / "model", tmp_path / "tokenizer", tmp_path / "out", tmp_path / "m.json", OFF)
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_the_model_was_not_trained_with_is_refused_and_the_export_kept(tmp_path, tokenizer_dir):
    """The tokenizer retrained (new params) without pretraining again: the export would pair the
    model with the wrong tokens, and replace a good export."""
    model_dir, out = tmp_path / "model", tmp_path / "runs/export"
    model = tiny_model(model_dir)
    save_decoder(model, model_dir, extra={"tokenizer_sha256": "0" * 64})
    out.mkdir(parents=True)
    (out / "tokenizer.json").write_text("the good export")
    with pytest.raises(StageError, match=r"tokenizer.json: sha256 \w+\.\.\. is not the tokenizer .* was trained with"):
        export(ExportConfig(), model_dir, tokenizer_dir, out, tmp_path / "m.json", OFF)
    assert (out / "tokenizer.json").read_text() == "the good export"


def test_a_model_tensor_without_a_llama_name_is_refused(tmp_path, tokenizer_dir, monkeypatch):
    tiny_model(tmp_path / "model")
    exportmod = importlib.import_module("lmcore.export")
    original = exportmod.hf_name
    monkeypatch.setattr(exportmod, "hf_name", lambda name: None if name == "norm.weight" else original(name))
    with pytest.raises(StageError, match="norm.weight"):
        export(ExportConfig(), tmp_path / "model", tokenizer_dir, tmp_path / "out", tmp_path / "m.json", OFF)
    assert not (tmp_path / "out").exists()


def test_cli_runs_the_stage_on_the_default_layout_and_logs_to_mlflow(tmp_path, tokenizer_dir, monkeypatch):
    import shutil

    from lmcore.cli import main

    tiny_model(tmp_path / "runs/pretrain/final")
    shutil.copytree(tokenizer_dir, tmp_path / "data/tokenizer")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["tracking"] = {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "lmcore-test"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    assert main(["--params", "params.yaml", "export"]) == 0
    assert (tmp_path / "runs/export/model.safetensors").exists()
    assert json.loads((tmp_path / "metrics/export.json").read_text())["dtype"] == "float32"

    import mlflow

    (run,) = mlflow_runs(tmp_path / "mlflow.db")
    assert run.data.tags["lmcore.stage"] == "export" and run.data.params["export.dtype"] == "float32"
    assert run.data.metrics["n_params"] > 0
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "export")}
    assert {"export/config.json", "export/model.safetensors", "export/tokenizer.json"} <= logged


def test_the_export_of_any_feed_forward_width_reads_back_as_the_same_model(tmp_path, tokenizer_dir):
    """The width came back as ratio = width / n_embd, which for n_embd 352 and width 1600 rounds a
    hair above 1600, so lmcore rebuilt 1664 and refused its own export."""
    from lmcore.model.folder import load_lm

    model = tiny_model(tmp_path / "model", n_layer=1, n_head=4, n_embd=352, mlp_ratio=4.5)
    assert model.cfg.mlp_hidden == 1600
    export(ExportConfig(), tmp_path / "model", tokenizer_dir, tmp_path / "export", tmp_path / "m.json", OFF)
    back, _ = load_lm(tmp_path / "export")
    assert back.cfg.mlp_hidden == 1600
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(back(ids)[0], model(ids)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("change", [{"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
                                    {"head_dim": 32}, {"intermediate_size": 100}])
def test_a_llama_folder_lmcore_cannot_compute_exactly_is_refused_by_name(change, tmp_path, tokenizer_dir):
    """A Llama-3 folder written by transformers 5 keeps its RoPE scaling in rope_parameters: it was
    read with plain RoPE, and scored wrong without a word."""
    from lmcore.model.folder import load_lm

    tiny_model(tmp_path / "model")
    export(ExportConfig(), tmp_path / "model", tokenizer_dir, tmp_path / "export", tmp_path / "m.json", OFF)
    cfg = json.loads((tmp_path / "export/config.json").read_text())
    (tmp_path / "export/config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(StageError, match=rf"config.json: .*{re.escape(next(iter(change)))}.*load it with transformers"):
        load_lm(tmp_path / "export")


@pytest.mark.parametrize("change", [{"vocab_size": None}, {"num_attention_heads": 5, "head_dim": None}, {"max_position_embeddings": 4},
                                    {"rms_norm_eps": "small"}])
def test_a_llama_folder_with_a_value_lmcore_cannot_read_is_an_error_naming_it(change, tmp_path, tokenizer_dir):
    """These were a TypeError or a pydantic ValidationError traceback."""
    from lmcore.model.folder import load_lm

    tiny_model(tmp_path / "model")
    export(ExportConfig(), tmp_path / "model", tokenizer_dir, tmp_path / "export", tmp_path / "m.json", OFF)
    cfg = json.loads((tmp_path / "export/config.json").read_text())
    (tmp_path / "export/config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(StageError, match=r"config.json: not a Llama configuration lmcore can hold \(.+\)"):
        load_lm(tmp_path / "export")


def test_llama_folders_of_other_writers_load_or_are_refused_by_name(tmp_path, tokenizer_dir):
    """Older conversions store RoPE's inv_freq buffers (refused as 'no lmcore counterpart'); a
    tied folder without the embedding and a rope_parameters that is not a mapping were a
    KeyError and an AttributeError traceback."""
    from safetensors.torch import load_file, save_file

    from lmcore.model.folder import load_lm

    model = tiny_model(tmp_path / "model")
    export(ExportConfig(), tmp_path / "model", tokenizer_dir, tmp_path / "export", tmp_path / "m.json", OFF)
    weights = tmp_path / "export/model.safetensors"
    tensors = load_file(weights)
    save_file({**tensors, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}, weights)
    back, cfg = load_lm(tmp_path / "export")
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(back(ids)[0], model(ids)[0], atol=1e-5, rtol=0)
    assert cfg["tie_word_embeddings"] is True
    save_file({k: v for k, v in tensors.items() if k != "model.embed_tokens.weight"}, weights)
    with pytest.raises(StageError, match="no model.embed_tokens.weight, which tie_word_embeddings: true"):
        load_lm(tmp_path / "export")
    (tmp_path / "export/config.json").write_text(json.dumps({**cfg, "rope_parameters": "default"}))
    with pytest.raises(StageError, match="rope_parameters = 'default': a mapping"):
        load_lm(tmp_path / "export")
