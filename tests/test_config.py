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
    # a field left null keeps the preset's value (params.yaml's n_kv_heads: null)
    p = _write(tmp_path, {"pretrain": {"model": {"preset": "llama-350m", "n_kv_heads": None}}})
    assert config.load(p).pretrain.model.n_kv_heads == 4
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


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    """PyYAML keeps the last of two equal keys: a second ``pretrain:`` pasted at the end would
    silently replace the first section."""
    p = tmp_path / "params.yaml"
    p.write_text("pretrain:\n  max_steps: 12\n  seed: 3\nevaluate:\n  stride: 8\npretrain:\n  max_steps: 5\n")
    with pytest.raises(ConfigError, match=r"params.yaml: line 6: duplicate key 'pretrain' \(first at line 1\)"):
        config.load(p)
    p.write_text("pretrain:\n  max_steps: 12\n  max_steps: 5000\n")
    with pytest.raises(ConfigError, match=r"line 3: duplicate key 'max_steps' \(first at line 2\)"):
        config.load(p)
    # keys merged from an anchor may still be overridden, as YAML means
    p.write_text("finetune:\n  defaults: &d\n    lr: 0.001\n  tasks:\n    rotten_tomatoes:\n      <<: *d\n      lr: 0.002\n")
    assert config.load(p).finetune.for_task("rotten_tomatoes").lr == 0.002


def test_a_params_file_that_is_not_utf8_names_the_line(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_bytes(b"pretrain:\n  max_steps: 12\ntracking:\n  experiment: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"params.yaml: line 4: not UTF-8 text \(byte 0xe9\)"):
        config.load(p)
    p.unlink()
    p.mkdir()
    with pytest.raises(ConfigError, match="params.yaml: not a file"):
        config.load(p)


@pytest.mark.parametrize("section, value, why", [
    ({"pretrain": {"seed": -1}}, "pretrain.seed = -1", "greater than or equal to 0"),
    ({"pretrain": {"seed": 10**23}}, "pretrain.seed = 100000000000000000000000", "less than 4294967296"),
    ({"finetune": {"tasks": {"rotten_tomatoes": {"seed": -3}}}}, "finetune.tasks.rotten_tomatoes.seed = -3", "greater"),
    ({"pretrain": {"model": {"mlp_ratio": float("inf")}}}, "pretrain.model.mlp_ratio = inf", "finite"),
    ({"prepare": {"corpus": {"shard_mb": float("inf")}}}, "prepare.corpus.shard_mb = inf", "finite"),
    ({"evaluate": {"temperature": float("nan")}}, "evaluate.temperature = nan", "finite"),
    ({"prepare": {"tasks": {"tasks": ["../../runs"]}}}, "prepare.tasks.tasks.0 = '../../runs'", "letters, digits"),
    ({"prepare": {"tasks": {"local": {"/abs/x": {"files": {"train": "t.jsonl"}, "label_names": ["a", "b"]}},
                            "tasks": ["rotten_tomatoes"]}}}, "prepare.tasks.local = '/abs/x'", "letters, digits"),
    ({"prepare": {"tasks": {"local": {"reviews.v2": {"files": {"train": "t.jsonl"}, "label_names": ["a", "b"]}},
                            "tasks": ["rotten_tomatoes"]}}}, "prepare.tasks.local = 'reviews.v2'", "letters, digits"),
    # YAML's true/false where a number belongs (pydantic read them as 1 and 0)
    ({"encode": {"batch_size": True}}, "encode.batch_size = True", "a boolean; give a number"),
    ({"pretrain": {"lr": False}}, "pretrain.lr = False", "a boolean; give a number"),
    ({"pretrain": {"threads": True}}, "pretrain.threads = True", "a boolean; give a number"),
    ({"evaluate": {"seed": True}}, "evaluate.seed = True", "a boolean; give a number"),  # Seed | None
    ({"prepare": {"tasks": {"local": {"x": {"files": {"train": "t.jsonl"}, "label_names": ["a", "b"], "metrics": []}},
                            "tasks": ["x"]}}, "finetune": {"tasks": {"x": {}}}},
     "prepare.tasks.local.x.metrics = []", "at least 1 item"),  # a task with nothing to score
    ({"clean": {"filters": {"language": {"languages": ["en", False]}}}}, "languages.1 = False",
     "YAML reads a bare no, off, false as false: quote the word, e.g. 'no'"),
    # the filter sections (dataclasses) too: threshold true kept nothing after the whole clean ran
    ({"clean": {"filters": {"language": {"threshold": True}}}}, "filters.language: threshold = true",
     "a boolean; give a number"),
    ({"clean": {"filters": {"gopher_quality": {"by_language": {"fr": {"min_doc_words": True}}}}}},
     "by_language.fr: min_doc_words = true", "a boolean; give a number"),
    ({"clean": {"filters": {"gopher_quality": {"min_doc_words": 1000, "max_doc_words": 10}}}},
     "min_doc_words (1000) must be <= max_doc_words (10)", "no document could pass"),
    ({"clean": {"filters": {"gopher_repetition": {"dup_n_grams": [[5, -1.0]]}}}}, "dup_n_grams.0.1 = -1.0",
     "greater than or equal to 0"),
    ({"clean": {"filters": {"c4": {"max_word_length": 0}}}}, "max_word_length = 0 would drop every line", "-1"),
    ({"evaluate": {"multiple_choice": [{"name": "a", "path": "x"}, {"name": "a", "path": "y"}]}},
     "name(s) a given to more than one multiple-choice file", "each needs its own"),
    ({"pretrain": {"schedule": "wsd", "max_steps": 100, "warmup_steps": 90, "decay_fraction": 0.5}},
     "warmup_steps (90) + decay_fraction x max_steps (50) must be <= max_steps (100)", "wsd"),
    ({"pretrain": {"schedule": "wsd", "max_steps": 20, "warmup_steps": 2, "decay_fraction": 0.02}},
     "decay_fraction (0.02) x max_steps (20) rounds to 0 decay steps", "wsd"),
    ({"tracking": {"tracking_uri": ""}}, "tracking.tracking_uri = ''", "a URI with a scheme"),
    ({"tracking": {"server": {"port": 5433}}}, "port (5433) must differ from postgres_port", "PostgreSQL"),
    ({"prepare": {"corpus": {"kind": "files"}}}, "prepare.corpus: paths is empty", "kind 'files'"),
])
def test_values_that_would_fail_deep_inside_a_stage_are_refused_at_load(tmp_path, section, value, why):
    """A seed out of what NumPy and torch accept, an infinite or NaN float, a task name that is a
    path (prepare and finetune write and replace folders by it) or no MLflow model name."""
    with pytest.raises(ConfigError) as e:
        config.load(_write(tmp_path, section))
    assert value in str(e.value) and why in str(e.value), str(e.value)


def test_the_registry_task_metric_must_be_one_every_task_reports(tmp_path):
    """A metric no listed task reports (a typo, or MCC asked of a task without it) used to fail
    only at ``lmcore promote``, after every task had trained."""
    ok = {"tracking": {"registry": {"task_metric": "f1"}}}  # rotten_tomatoes reports accuracy and f1
    assert config.load(_write(tmp_path, ok)).tracking.registry.task_metric == "f1"
    with pytest.raises(ConfigError) as e:
        config.load(_write(tmp_path, {"tracking": {"registry": {"task_metric": "acc"}}}))
    assert "tracking.registry.task_metric = 'acc': task rotten_tomatoes reports score, accuracy, f1" in str(e.value)
    cola = {"prepare": {"tasks": {"kind": "glue_dir", "glue_dir": "glue", "tasks": ["sst2", "cola"]}},
            "finetune": {"tasks": {"sst2": {}, "cola": {}}}, "tracking": {"registry": {"task_metric": "accuracy"}}}
    with pytest.raises(ConfigError, match="task cola reports score, matthews"):
        config.load(_write(tmp_path, cola))
    cola["tracking"]["registry"]["enabled"] = False  # nothing is registered: nothing to check
    config.load(_write(tmp_path, cola))


def test_an_override_into_an_empty_or_wrong_section(tmp_path):
    """A flow's launch parameter set into `launch:` left empty, or written as a list: a TypeError
    traceback instead of the key."""
    p = tmp_path / "params.yaml"
    p.write_text("launch:\n")
    assert config.load(p, {"launch.num_processes": 2}).launch.num_processes == 2
    p.write_text("launch: [a]\n")
    with pytest.raises(ConfigError, match=r"launch = \['a'\]: a section .* to set launch.num_processes"):
        config.load(p, {"launch.num_processes": 2})


def test_a_warmup_as_long_as_training_and_muon_under_fp16_are_refused():
    """warmup_steps == max_steps trained at a rate that never reached its peak nor decayed;
    Muon under fp16 had AdamW's gradients unscaled twice by Accelerate's loss scaler."""
    import pytest

    from lmcore import config

    with pytest.raises(config.ConfigError, match=r"pretrain.*warmup_steps \(10\) must be < max_steps \(10\)"):
        config.from_dict({"pretrain": {"max_steps": 10, "warmup_steps": 10}})
    assert config.from_dict({"pretrain": {"max_steps": 10, "warmup_steps": 9}}).pretrain.warmup_steps == 9
    with pytest.raises(config.ConfigError, match=r"pretrain.*optimizer 'muon' with mixed_precision 'fp16'"):
        config.from_dict({"pretrain": {"optimizer": "muon", "mixed_precision": "fp16"}})
    assert config.from_dict({"pretrain": {"optimizer": "muon", "mixed_precision": "bf16"}}).pretrain.optimizer == "muon"
