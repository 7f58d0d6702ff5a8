"""The family registry: built-in families wired into every Auto class, and `register_family` for new ones."""

from __future__ import annotations

import pytest
import torch
import transformers

import hf_lara
from hf_lara.integration import FAMILIES as REGISTRY
from hf_lara.integration.compat import auto_model_mappings
from hf_lara.integration.families import family_model_classes

from .utils import FAMILIES, assert_close, hparams, run

BUILTIN = ["bert", "deit", "distilbert", "gpt2", "llama", "mistral", "qwen2", "roberta", "vit"]


def test_builtin_families():
    assert set(BUILTIN) <= set(hf_lara.supported_families()) and set(FAMILIES) == set(BUILTIN)


@pytest.mark.parametrize("family", BUILTIN)
def test_every_auto_class_of_the_family_maps_the_converted_config(family):
    entry = REGISTRY[family]
    for auto_class, classes in family_model_classes(entry.base_config_class).items():
        converted = auto_model_mappings()[auto_class][entry.config_class]
        assert converted is entry.model_classes[classes[0]], auto_class.__name__
        assert issubclass(converted, classes[0]) and converted.config_class is entry.config_class


def test_expected_auto_classes_are_covered():
    def mapped(family, auto_class):
        return auto_model_mappings()[auto_class][REGISTRY[family].config_class].__name__

    assert mapped("bert", transformers.AutoModelForTokenClassification) == "LaraBertForTokenClassification"
    assert mapped("llama", transformers.AutoModelForSequenceClassification) == "LaraLlamaForSequenceClassification"
    assert mapped("gpt2", transformers.AutoModelForCausalLM) == "LaraGPT2LMHeadModel"
    assert mapped("vit", transformers.AutoModelForImageClassification) == "LaraViTForImageClassification"
    assert mapped("distilbert", transformers.AutoModelForQuestionAnswering) == "LaraDistilBertForQuestionAnswering"


def test_register_family_adds_a_new_family(tmp_path):
    config_class = hf_lara.register_family(transformers.ElectraConfig)
    assert (
        config_class.model_type == "lara_electra"
        and hf_lara.register_family(transformers.ElectraConfig) is config_class
    )
    assert "electra" in hf_lara.supported_families()
    torch.manual_seed(0)
    config = transformers.ElectraConfig(
        vocab_size=99, embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37,
    )  # fmt: skip
    model = transformers.ElectraForMaskedLM(config).eval()
    inputs = {"input_ids": torch.randint(3, 99, (2, 9))}
    expected = run(model, inputs)
    hf_lara.convert(model, method="softmax")
    assert type(model).__name__ == "LaraElectraForMaskedLM"
    assert_close(run(model, inputs), expected)
    hf_lara.convert(model, method="rfa", **hparams("rfa"))
    out = run(model, inputs)
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model) and torch.equal(run(reloaded, inputs), out)
