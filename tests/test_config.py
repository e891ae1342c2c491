from __future__ import annotations

import pytest
import yaml
from conftest import ROOT

from lmcore import config
from lmcore.config import ConfigError


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


def test_every_field_is_documented():
    def walk(model):
        for name, field in model.model_fields.items():
            yield model.__name__, name, field
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, config.Section):
                yield from walk(ann)

    missing = [f"{m}.{n}" for m, n, f in walk(config.Params) if m != "Params" and not f.description]
    assert not missing, f"fields without a docstring: {missing}"


def test_yaml_bare_no_means_no(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("pretrain:\n  mixed_precision: no\nfinetune:\n  mixed_precision: bf16\n")
    params = config.load(p)
    assert params.pretrain.mixed_precision == "no" and params.finetune.mixed_precision == "bf16"


def test_stride_must_fit_the_context(tmp_path):
    p = _write(tmp_path, {"evaluate": {"stride": 512}, "pretrain": {"model": {"block_size": 256}}})
    with pytest.raises(ConfigError, match="evaluate.stride"):
        config.load(p)
