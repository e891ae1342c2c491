from __future__ import annotations

import json
import typing

import pytest
import yaml
from conftest import ROOT
from pydantic import BaseModel

from lmcore import config
from lmcore.config import ConfigError
from lmcore.model.decoder import DecoderConfig


def test_repo_params_validate_and_defaults_match():
    params = config.load(ROOT / "params.yaml")
    assert params.pretrain.model.n_embd % params.pretrain.model.n_head == 0
    assert params.prepare.corpus.kind == "shakespeare"
    assert params.prepare.tasks.tasks == ["rotten_tomatoes"]


def _write(tmp_path, data):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_wrong_type_names_key_and_value(tmp_path):
    p = _write(tmp_path, {"pretrain": {"lr": "fast"}})
    with pytest.raises(ConfigError) as e:
        config.load(p)
    msg = str(e.value)
    assert "pretrain.lr" in msg and "'fast'" in msg and "params.yaml" in msg


def test_unknown_key_is_rejected(tmp_path):
    p = _write(tmp_path, {"pretrain": {"learning_rate": 0.1}})
    with pytest.raises(ConfigError, match="unknown key 'pretrain.learning_rate'"):
        config.load(p)


def test_choice_lists_allowed_values(tmp_path):
    p = _write(tmp_path, {"pretrain": {"mixed_precision": "fp32"}})
    with pytest.raises(ConfigError) as e:
        config.load(p)
    assert "pretrain.mixed_precision" in str(e.value) and "'bf16'" in str(e.value)
    p = _write(tmp_path, {"finetune": {"attention": "flash"}})
    with pytest.raises(ConfigError) as e:
        config.load(p)
    assert "finetune.attention = 'flash'" in str(e.value) and "'matmul'" in str(e.value)


def test_model_preset_fills_the_shape_and_explicit_fields_win(tmp_path):
    p = _write(tmp_path, {"pretrain": {"model": {"preset": "mini", "block_size": 128}}})
    m = config.load(p).pretrain.model
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size) == (6, 6, 384, 128)
    assert "preset" not in m.shape()
    p = _write(tmp_path, {"pretrain": {"model": {"preset": "huge"}}})
    with pytest.raises(ConfigError, match="pretrain.model.preset = 'huge'.*'tiny'"):
        config.load(p)
    p = _write(tmp_path, {"pretrain": {"model": {"n_head": 4, "n_kv_heads": 3}}})
    with pytest.raises(ConfigError, match="n_kv_heads"):
        config.load(p)


def test_cross_field_rule(tmp_path):
    p = _write(tmp_path, {"pretrain": {"model": {"n_embd": 100, "n_head": 3}}})
    with pytest.raises(ConfigError, match="divisible"):
        config.load(p)


def test_overrides_and_flatten(tmp_path):
    p = _write(tmp_path, {})
    params = config.load(p, {"pretrain.max_steps": 70, "pretrain.model.n_layer": 2})
    assert params.pretrain.max_steps == 70 and params.pretrain.model.n_layer == 2
    flat = config.flatten(params.pretrain, "pretrain.")
    assert flat["pretrain.model.n_layer"] == 2


def sections_in(annotation) -> list[type]:
    """The sections (models and pydantic dataclasses) inside a field's annotation: ``X``,
    ``X | None``, ``dict[str, X | Y]``, ``list[X]``..."""
    found = []
    if isinstance(annotation, type) and (issubclass(annotation, BaseModel) or hasattr(annotation, "__pydantic_fields__")):
        found.append(annotation)
    for arg in typing.get_args(annotation):
        found += sections_in(arg)
    return found


def walk_schema(section: type, seen: set[type] | None = None):
    """Every (section, field name, FieldInfo) reachable from ``section``."""
    seen = set() if seen is None else seen
    if section in seen:
        return
    seen.add(section)
    fields = section.model_fields if issubclass(section, BaseModel) else section.__pydantic_fields__
    for name, field in fields.items():
        yield section, name, field
        for sub in sections_in(field.annotation):
            yield from walk_schema(sub, seen)


def test_every_field_is_documented():
    walked = list(walk_schema(config.Params))
    missing = [f"{m.__name__}.{n}" for m, n, f in walked if m is not config.Params and not f.description]
    assert not missing, f"fields without a docstring: {missing}"
    reached = {m for m, _, _ in walked}
    # the walk reaches the sections inside mappings, unions and optional values
    assert {config.C4Settings, config.GopherQualitySettings, config.GopherRepetitionSettings, config.FineWebSettings,
            config.LanguageSettings, config.MinHashConfig, config.ModelConfig, config.LocalTask} <= reached
    assert len(walked) > 150
    # and the model's own configuration, outside params.yaml, is documented too
    missing = [f"DecoderConfig.{n}" for _, n, f in walk_schema(DecoderConfig) if not f.description]
    assert not missing


def test_model_shape_is_defined_once():
    shape = set(config.ModelShape.model_fields)
    assert shape == {"n_layer", "n_head", "n_kv_heads", "n_embd", "block_size", "mlp_ratio", "dropout",
                     "tie_embeddings", "rope_theta"}
    assert set(config.ModelConfig.model_fields) == shape | {"preset"}
    assert set(DecoderConfig.model_fields) == shape | {"vocab_size"}
    def spec(f):
        return f.annotation, f.default, f.description, repr(f.metadata)

    for name in shape:  # the same field (default, constraints, docstring), inherited
        assert spec(DecoderConfig.model_fields[name]) == spec(config.ModelShape.model_fields[name]) \
            == spec(config.ModelConfig.model_fields[name])
    m = config.ModelConfig(preset="llama-350m", dropout=0.1)
    g = DecoderConfig(vocab_size=512, **m.shape())
    assert (g.n_layer, g.kv_heads, g.head_dim, g.dropout, g.vocab_size) == (24, 4, 64, 0.1, 512)
    assert DecoderConfig(**json.loads(json.dumps(g.model_dump()))) == g and hash(g) == hash(DecoderConfig(**g.model_dump()))
    with pytest.raises(ValueError):
        g.n_layer = 3  # frozen
    with pytest.raises(ValueError, match="divisible"):  # the shape's own checks hold for the model too
        DecoderConfig(vocab_size=64, n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="vocab_size"):
        DecoderConfig(n_layer=2)
    # a model folder's config.json: the same keys and values as the dataclass gave
    assert g.model_dump() == {"vocab_size": 512, "n_layer": 24, "n_head": 16, "n_kv_heads": 4, "n_embd": 1024,
                              "block_size": 1024, "mlp_ratio": 8 / 3, "dropout": 0.1, "tie_embeddings": True,
                              "rope_theta": 10000.0}


def test_yaml_bare_no_means_no(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("pretrain:\n  mixed_precision: no\nfinetune:\n  mixed_precision: bf16\n")
    params = config.load(p)
    assert params.pretrain.mixed_precision == "no" and params.finetune.mixed_precision == "bf16"


def test_stride_must_fit_the_context(tmp_path):
    p = _write(tmp_path, {"evaluate": {"stride": 512}, "pretrain": {"model": {"block_size": 256}}})
    with pytest.raises(ConfigError, match="evaluate.stride"):
        config.load(p)
