"""The public names the integration adds to `hf_lara`."""

from __future__ import annotations

import importlib
import inspect

import pytest
import transformers

import hf_lara

INTEGRATION_EXPORTS = {
    "LaraConfig", "LaraModelMixin", "convert", "register_family", "supported_families",
    "LaraBertConfig", "LaraRobertaConfig", "LaraDistilBertConfig", "LaraGPT2Config", "LaraLlamaConfig",
    "LaraMistralConfig", "LaraQwen2Config", "LaraViTConfig", "LaraDeiTConfig",
}  # fmt: skip


def test_integration_exports():
    assert INTEGRATION_EXPORTS <= set(hf_lara.__all__)
    assert all(hasattr(hf_lara, name) for name in hf_lara.__all__)
    assert {"AttentionEstimator", "available_methods", "build_attention", "register_estimator"} <= set(hf_lara.__all__)


BUILTIN = ["Bert", "Roberta", "DistilBert", "GPT2", "Llama", "Mistral", "Qwen2", "ViT", "DeiT"]


@pytest.mark.parametrize("family", BUILTIN)
def test_builtin_classes_are_written_out(family):
    """Static tools (IDEs, type checkers, `inspect`) find the built-in converted classes where they are defined."""
    config_class = getattr(hf_lara, f"Lara{family}Config")
    assert f"class Lara{family}Config(LaraConfig, {family}Config):" in inspect.getsource(config_class)
    model_class = getattr(hf_lara.integration.models, f"Lara{family}Model")
    assert f"class Lara{family}Model(LaraModelMixin, {family}Model):" in inspect.getsource(model_class)
    assert model_class.config_class is config_class and model_class.lara_base_class.__name__ == f"{family}Model"
    assert hf_lara.integration.FAMILIES[config_class.model_type[5:]].config_class is config_class


def test_classes_made_at_run_time_are_found_by_name():
    """Other heads are made on registration and resolve by module attribute (peft's auto mapping, pickle)."""
    cls = hf_lara.integration.FAMILIES["bert"].model_classes[transformers.BertForTokenClassification]
    assert getattr(importlib.import_module(cls.__module__), cls.__name__) is cls
    with pytest.raises(AttributeError):
        hf_lara.integration.models.LaraNoSuchModel  # noqa: B018
