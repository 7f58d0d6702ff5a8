"""Converted configs: one class per family, serialised `lara_*` fields, and the errors users meet."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import transformers

import hf_lara
from hf_lara.integration.config import LaraConfig

from .utils import FAMILIES, SETUPS, hparams, load_base, load_converted, make_inputs, run


@pytest.mark.parametrize("family", FAMILIES)
def test_one_config_class_per_family(family, base_checkpoints):
    config = hf_lara.LaraConfig.from_pretrained(base_checkpoints[family], method="rfa", layers=[1, 0], num_features=8)
    base_class = type(transformers.AutoConfig.from_pretrained(base_checkpoints[family]))
    assert isinstance(config, base_class) and isinstance(config, LaraConfig)
    assert type(config).__name__ == f"Lara{base_class.__name__}" and config.model_type == f"lara_{family}"
    assert (config.lara_method, config.lara_hparams, config.lara_layers) == ("rfa", {"num_features": 8}, [0, 1])
    assert config._attn_implementation == "hf_lara"
    assert transformers.AutoConfig.for_model(f"lara_{family}").__class__ is type(config)


def test_config_round_trip_and_explicit_implementation(base_checkpoints, tmp_path):
    config = hf_lara.LaraConfig.from_pretrained(base_checkpoints["bert"], method="rfa", num_features=8)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert {k: saved[k] for k in ("lara_method", "lara_hparams", "lara_layers")} == {
        "lara_method": "rfa", "lara_hparams": {"num_features": 8}, "lara_layers": None,
    }  # fmt: skip
    assert "attn_implementation" not in json.dumps(saved)
    loaded = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is type(config) and loaded.lara_hparams == {"num_features": 8}
    assert loaded._attn_implementation == "hf_lara"
    assert transformers.AutoConfig.from_pretrained(tmp_path, attn_implementation="sdpa")._attn_implementation == "sdpa"
    # a converted checkpoint can be re-targeted: same method keeps hyper-parameters, new ones override
    again = hf_lara.LaraConfig.from_pretrained(tmp_path, chunk_size=4)
    assert again.lara_hparams == {"num_features": 8, "chunk_size": 4}
    assert hf_lara.LaraConfig.from_pretrained(tmp_path, method="softmax").lara_hparams == {}


def test_user_flow_from_the_issue(base_checkpoints, tmp_path):
    path = base_checkpoints["llama"]
    cfg = hf_lara.LaraConfig.from_pretrained(path, method="lara", num_landmarks=4)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, config=cfg)
    assert type(model).__name__ == "LaraLlamaForCausalLM"
    model = hf_lara.convert(transformers.AutoModelForCausalLM.from_pretrained(path), method="eva", layers=[0])
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert (reloaded.config.lara_method, reloaded.config.lara_layers) == ("eva", [0])


def test_unknown_method(base_checkpoints):
    with pytest.raises(ValueError, match=r"`method` must be one of .*softmax.*got 'performer'"):
        hf_lara.LaraConfig.from_pretrained(base_checkpoints["bert"], method="performer")
    with pytest.raises(ValueError, match="`method` must be one of"):
        hf_lara.convert(load_base(SETUPS["bert"], base_checkpoints["bert"]), method="performer")


def test_bad_hyper_parameter(base_checkpoints):
    path = base_checkpoints["bert"]
    # the estimator's own message, with the method as context
    with pytest.raises(ValueError, match=r"method `rfa`.*`num_features` must be an integer >= 1, got 0"):
        hf_lara.LaraConfig.from_pretrained(path, method="rfa", num_features=0)
    with pytest.raises(ValueError, match=r"Unknown hyper-parameter\(s\) 'num_featurez' for method `rfa`"):
        hf_lara.LaraConfig.from_pretrained(path, method="rfa", hparams={"num_featurez": 8})
    with pytest.raises(ValueError, match=r"Unknown hyper-parameter\(s\) 'num_featurez'.*Did you mean `num_features`"):
        hf_lara.LaraConfig.from_pretrained(path, method="rfa", num_featurez=8)
    with pytest.raises(ValueError, match=r"Unknown hyper-parameter\(s\) 'num_featurez' for method `rfa`"):
        hf_lara.convert(load_base(SETUPS["bert"], path), method="rfa", num_featurez=8)
    with pytest.raises(TypeError, match="JSON serialisable"):
        hf_lara.LaraConfig.from_pretrained(path, method="rfa", num_features=object())
    with pytest.raises(ValueError, match="`layers` must be indices below 2"):
        load_converted(SETUPS["bert"], path, "rfa", layers=[2])
    with pytest.raises(ValueError, match="distinct non-negative"):
        hf_lara.LaraConfig.from_pretrained(path, method="rfa", layers=[-1])


def test_unsupported_family():
    config = transformers.DebertaV2Config(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37
    )
    model = transformers.DebertaV2Model(config)
    with pytest.raises(NotImplementedError, match=r"`deberta-v2`.*Supported families: bert, .*vit"):
        hf_lara.convert(model, method="rfa")
    with pytest.raises(NotImplementedError, match=r"`deberta-v2`.*AttentionInterface.*Supported families: bert"):
        hf_lara.register_family(transformers.DebertaV2Config)


@pytest.mark.parametrize("field", ["lara_method", "lara_hparams", "lara_layers"])
def test_converted_config_with_a_missing_field(field, base_checkpoints, tmp_path):
    setup = SETUPS["gpt2"]
    load_converted(setup, base_checkpoints["gpt2"], "rfa").save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    saved = json.loads(path.read_text())
    del saved[field]
    path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=f"`lara_gpt2` config lacks the field\\(s\\) `{field}`"):
        setup.auto_class.from_pretrained(tmp_path)


def test_converted_class_refuses_a_base_config():
    model_class = hf_lara.integration.FAMILIES["bert"].model_classes[transformers.BertModel]
    with pytest.raises(ValueError, match="needs a converted config"):
        model_class(transformers.BertConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1))
    with pytest.raises(ValueError, match="`method` is required"):
        hf_lara.LaraConfig.from_config(transformers.BertConfig())


def test_family_classes_load_like_any_config(base_checkpoints, tmp_path):
    converted = hf_lara.LaraConfig.from_pretrained(base_checkpoints["llama"], method="rfa")
    converted.save_pretrained(tmp_path)
    assert hf_lara.LaraLlamaConfig.from_pretrained(tmp_path).lara_method == "rfa"
    assert hf_lara.LaraLlamaConfig.from_pretrained(base_checkpoints["llama"], method="ra").lara_method == "ra"
    assert type(hf_lara.LaraConfig.from_dict(converted.to_dict())) is hf_lara.LaraLlamaConfig
    with pytest.raises(ValueError, match="`LaraBertConfig` cannot convert a `llama` checkpoint"):
        hf_lara.LaraBertConfig.from_pretrained(base_checkpoints["llama"], method="rfa")


def test_config_attributes_hyper_parameters_and_hub_kwargs_are_separated(base_checkpoints, tmp_path):
    """Like `AutoConfig.from_pretrained(src, num_labels=2)`: config attributes beside the estimator's arguments."""
    path = base_checkpoints["bert"]
    expected = transformers.AutoConfig.from_pretrained(path, num_labels=3, classifier_dropout=0.2)
    config = hf_lara.LaraConfig.from_pretrained(
        path, method="lara", num_labels=3, classifier_dropout=0.2, num_landmarks=4, hparams={"chunk_size": 2},
        local_files_only=True,
    )  # fmt: skip
    assert config.lara_hparams == {"num_landmarks": 4, "chunk_size": 2}
    assert (config.num_labels, config.id2label, config.classifier_dropout) == (3, expected.id2label, 0.2)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, config=config)
    assert model.classifier.out_features == 3 and type(model).__name__ == "LaraBertForSequenceClassification"
    # a converted checkpoint keeps its method: its hyper-parameters are still recognised by name
    config.save_pretrained(tmp_path)
    again = hf_lara.LaraConfig.from_pretrained(tmp_path, num_landmarks=2, num_labels=2)
    assert again.lara_hparams == {"num_landmarks": 2, "chunk_size": 2} and again.num_labels == 2


@pytest.mark.parametrize("method", ["rfa", "lara", "kernel", "eva"])
def test_config_validation_leaves_the_global_rng_alone(method, base_checkpoints):
    state = torch.random.get_rng_state()
    hf_lara.LaraConfig.from_pretrained(base_checkpoints["llama"], method=method, **hparams(method))
    assert torch.equal(torch.random.get_rng_state(), state)


def test_checkpoint_from_a_newer_version_loads_with_a_warning(base_checkpoints, tmp_path, caplog):
    """An unknown hyper-parameter in config.json is dropped with a warning; `convert` and explicit ones stay strict."""
    setup = SETUPS["llama"]
    model = load_converted(setup, base_checkpoints["llama"], "rfa")
    model.save_pretrained(tmp_path)
    inputs = make_inputs(setup)
    path = tmp_path / "config.json"
    saved = json.loads(path.read_text())
    saved["lara_hparams"]["future_knob"] = 3
    path.write_text(json.dumps(saved))
    with caplog.at_level(logging.WARNING):
        reloaded = setup.auto_class.from_pretrained(tmp_path).eval()
    assert "future_knob" in caplog.text and "does not know" in caplog.text
    assert "future_knob" not in reloaded.config.lara_hparams
    assert torch.equal(run(reloaded, inputs), run(model, inputs))
    with pytest.raises(ValueError, match="Unknown hyper-parameter.*'future_knob'"):
        hf_lara.convert(load_base(setup, base_checkpoints["llama"]), method="rfa", future_knob=3)


@pytest.mark.parametrize("local_windows", [None, 1], ids=["default", "block-aligned"])
def test_eva_local_windows_round_trips(local_windows, base_checkpoints, tmp_path):
    """Causal EVA's `local_windows` (default 2, causal only) is recorded when given and survives save / load: the
    reloaded decoder builds the same estimators and gives the same logits as the converted one."""
    setup = SETUPS["llama"]
    given = {} if local_windows is None else {"local_windows": local_windows}
    model = load_converted(setup, base_checkpoints["llama"], "eva", **given)
    assert model.config.lara_hparams == hparams("eva", **given)
    model.save_pretrained(tmp_path)
    reloaded = setup.auto_class.from_pretrained(tmp_path).eval()
    expected = 2 if local_windows is None else local_windows
    assert {e.local_windows for e in reloaded.lara_estimators().values()} == {expected}
    inputs = make_inputs(setup)
    assert torch.equal(run(reloaded, inputs), run(model, inputs))
