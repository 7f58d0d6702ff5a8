"""Converted model classes: `LaraBertModel(LaraModelMixin, BertModel)`, `LaraLlamaForCausalLM`, ...

Each converted class builds its family's model unchanged, then attaches one estimator to every converted
self-attention module under `lara_attention`, so `from_pretrained` loads the base weights where they always were and
the estimator's parameters and buffers under `...lara_attention.*`.

Initialisation: `from_pretrained` builds models on the meta device and only re-initialises what the family's
`_init_weights` knows about, which would leave estimator tensors missing from the checkpoint as garbage (or, for an
`nn.Linear` inside an estimator, with the family's normal init). `initialize_weights` is therefore overridden on every
converted class, base and heads alike: after the family's own init it copies a freshly built estimator's values into
every estimator tensor that was not loaded, so new estimators start exactly as the estimator designed them (identity
maps, orthogonal draws, ...).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from transformers import (
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    DeiTForImageClassification,
    DeiTModel,
    DistilBertForMaskedLM,
    DistilBertForSequenceClassification,
    DistilBertModel,
    GPT2LMHeadModel,
    GPT2Model,
    LlamaForCausalLM,
    LlamaModel,
    MistralForCausalLM,
    MistralModel,
    PreTrainedModel,
    Qwen2ForCausalLM,
    Qwen2Model,
    RobertaForMaskedLM,
    RobertaForSequenceClassification,
    RobertaModel,
    ViTForImageClassification,
    ViTModel,
)

from .attention import ESTIMATOR_ATTR
from .cache import LaraCache, add_hook, bind_state_layer, provide_state_cache, wants_state_cache
from .compat import CACHE_KWARG, called_by_peft_card, is_initialized, mark_initialized
from .config import (
    LaraBertConfig,
    LaraConfig,
    LaraDeiTConfig,
    LaraDistilBertConfig,
    LaraGPT2Config,
    LaraLlamaConfig,
    LaraMistralConfig,
    LaraQwen2Config,
    LaraRobertaConfig,
    LaraViTConfig,
)
from .registry import FAMILIES, Family, get_family


class LaraModelMixin:
    """Mixed into every converted model class, before the family's class.

    Attributes:
        lara_base_class (`type[PreTrainedModel]`): the family's class this one converts (the next base class).
    """

    lara_base_class: type[PreTrainedModel]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if LaraModelMixin in cls.__bases__:
            cls.lara_base_class = cls.__bases__[cls.__bases__.index(LaraModelMixin) + 1]

    def __init__(self, config, *args, **kwargs):
        if not isinstance(config, LaraConfig) or config.lara_method is None:
            raise ValueError(
                f"{type(self).__name__} needs a converted config with a `lara_method`, got `{type(config).__name__}`. "
                "Build one with `hf_lara.LaraConfig.from_pretrained(path, method=...)`."
            )
        super().__init__(config, *args, **kwargs)
        attach_estimators(self, config, get_family(config.model_type))

    def lara_estimators(self) -> dict[int, nn.Module]:
        """The estimators by self-attention layer index."""
        modules = get_family(self.config.model_type).attention_modules(self)
        return {i: getattr(m, ESTIMATOR_ATTR) for i, m in enumerate(modules) if hasattr(m, ESTIMATOR_ATTR)}

    def generate(self, *args, **kwargs):
        """`GenerationMixin.generate` with a `LaraCache` (constant-size state for recurrent layers) where it would
        build its default `DynamicCache`; a user cache, `cache_implementation="dynamic"` or assisted decoding keep
        the KV cache, static caches raise `NotImplementedError`."""
        if wants_state_cache(self, args, kwargs):
            kwargs[CACHE_KWARG] = LaraCache(self)
        return super().generate(*args, **kwargs)

    def initialize_weights(self):
        super().initialize_weights()
        for layer, estimator in self.lara_estimators().items():
            initialize_estimator(estimator, self.config, layer)

    @property
    def model_tags(self) -> list[str] | None:
        """`PreTrainedModel.model_tags`. Every `PeftModel.save_pretrained` reads it (to tag the adapter's card)
        before writing anything: that read checks that peft could rebuild this model (`check_adapter_base`)."""
        if called_by_peft_card():
            check_adapter_base(self)
        # tags added before `hf_lara.convert` swapped the class sit in the instance's own `model_tags`
        return self.__dict__.get("_lara_model_tags", self.__dict__.get("model_tags"))

    @model_tags.setter
    def model_tags(self, value: list[str] | None) -> None:
        self.__dict__["_lara_model_tags"] = value


def check_adapter_base(model: PreTrainedModel) -> None:
    """Refuse to save a peft adapter that would reload onto a model without these estimators.

    peft records `model.name_or_path` as the adapter's base and reloads the base from there. That only gives this
    model back if the path holds this conversion, with these estimators' tensors: not after `hf_lara.convert` (the
    estimators are drawn in memory), nor when the path holds an unconverted checkpoint (`from_pretrained(path,
    config=LaraConfig...)`) or another conversion. Otherwise the adapter would silently reload onto another model.
    """
    path = model.name_or_path
    if not path:
        return  # peft records no base: reloading needs the model passed explicitly
    reason = None
    if model.__dict__.get("lara_drawn_in_memory", False):
        reason = "its estimators were drawn in memory by `hf_lara.convert`"
    elif (Path(path) / "config.json").is_file():
        saved = json.loads((Path(path) / "config.json").read_text())
        if (saved.get("lara_method"), saved.get("lara_layers"), saved.get("lara_layer_hparams") or {}) != (
            model.config.lara_method,
            model.config.lara_layers,
            model.config.lara_layer_hparams,
        ):
            reason = f"{path!r} holds a model not converted this way (`lara_method` {saved.get('lara_method')})"
    if reason is not None:
        raise ValueError(
            f"Cannot save a peft adapter of this `{type(model).__name__}`: {reason}, while peft records "
            f"`model.name_or_path` ({path!r}), which is not converted with these estimators, as the adapter's base, "
            "so the adapter would reload onto another model. Save the converted model with "
            "`model.save_pretrained(dir)`, load it back from `dir`, then add the adapter (an adapter already trained "
            "is kept by `peft_model.merge_and_unload().save_pretrained(dir)`)."
        )


def resolve_layers(layers: list[int] | None, num_layers: int) -> list[int]:
    """The layer indices to convert, checked against the model's `num_layers` self-attention modules."""
    if layers is None:
        return list(range(num_layers))
    check_below(layers, num_layers, "`layers`")
    return list(layers)


def check_below(indices: Iterable[int], num_layers: int, name: str) -> None:
    """A `ValueError` naming `name` unless every layer index is below the model's `num_layers` attention layers."""
    bad = sorted(i for i in indices if i >= num_layers)
    if bad:
        raise ValueError(f"{name} must be indices below {num_layers} (the model's attention layers), got {bad}.")


def attach_estimators(model: nn.Module, config: LaraConfig, family: Family, like_model: bool = False) -> None:
    """Put one estimator on each selected attention module of `model` and remove any from the others.

    Estimators built off the meta device are complete and marked initialised. With `like_model` they are moved to
    the device and floating dtype of their attention module (in-memory conversion).
    """
    modules = family.attention_modules(model)
    selected = set(resolve_layers(config.lara_layers, len(modules)))
    check_below(map(int, config.lara_layer_hparams), len(modules), "`layer_hparams` keys")
    num_heads, head_dim = family.head_shape(config)
    estimators = {i: config.build_estimator(num_heads, head_dim, layer=i) for i in selected}
    add_hook(model, provide_state_cache)
    for i, module in enumerate(modules):
        # every attention layer, softmax ones included, checks the cache it is given
        add_hook(module, bind_state_layer)
        if hasattr(module, ESTIMATOR_ATTR):
            delattr(module, ESTIMATOR_ATTR)
        if i not in selected:
            continue
        estimator = estimators[i]
        reference = next(module.parameters(), None)
        if like_model and reference is not None:
            estimator.to(device=reference.device, dtype=reference.dtype)
            estimator.train(module.training)
        if not any(t.is_meta for t in estimator_tensors(estimator)):
            for tensor in estimator_tensors(estimator):
                mark_initialized(tensor)
        setattr(module, ESTIMATOR_ATTR, estimator)


def estimator_tensors(estimator: nn.Module):
    """Parameters and buffers (persistent or not) of an estimator."""
    return itertools.chain(estimator.parameters(), estimator.buffers())


@torch.no_grad()
def initialize_estimator(estimator: nn.Module, config: LaraConfig, layer: int) -> None:
    """Give every tensor of `estimator` (of self-attention layer `layer`) that was not loaded the value a freshly
    built estimator has."""
    pending = {
        name: tensor
        for name, tensor in itertools.chain(estimator.named_parameters(), estimator.named_buffers())
        if not is_initialized(tensor)
    }
    if not pending:
        return
    with torch.device("cpu"):
        fresh = config.build_estimator(estimator.num_heads, estimator.head_dim, layer=layer)
    values = dict(itertools.chain(fresh.named_parameters(), fresh.named_buffers()))
    for name, tensor in pending.items():
        tensor.copy_(values[name])
        mark_initialized(tensor)


def make_model_class(base: type[PreTrainedModel], config_class: type[LaraConfig]) -> type[PreTrainedModel]:
    """`LaraXxx(LaraModelMixin, Xxx)` bound to the converted config class."""
    name = f"Lara{base.__name__}"
    namespace = {
        "__module__": __name__,
        "__qualname__": name,
        "__doc__": f"`{base.__name__}` whose self-attention runs hf_lara estimators (`lara_attention` submodules).",
        "config_class": config_class,
    }
    return type(name, (LaraModelMixin, base), namespace)


def __getattr__(name: str) -> type[PreTrainedModel]:
    """Converted classes made at run time (`register_family`, other heads) by name, as `peft`'s auto mapping and
    pickle look them up: `hf_lara.integration.models.LaraBertForTokenClassification`."""
    for family in FAMILIES.values():
        for cls in family.model_classes.values():
            if cls.__name__ == name:
                return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# The built-in families' main classes, written out so that readers, IDEs and type checkers see them; their other
# classes (e.g. `LaraBertForTokenClassification`) are made by `register_family` and found through `__getattr__`.
class LaraBertModel(LaraModelMixin, BertModel):
    """`BertModel` whose self-attention runs hf_lara estimators."""

    config_class = LaraBertConfig


class LaraBertForMaskedLM(LaraModelMixin, BertForMaskedLM):
    """`BertForMaskedLM` whose self-attention runs hf_lara estimators."""

    config_class = LaraBertConfig


class LaraBertForSequenceClassification(LaraModelMixin, BertForSequenceClassification):
    """`BertForSequenceClassification` whose self-attention runs hf_lara estimators."""

    config_class = LaraBertConfig


class LaraRobertaModel(LaraModelMixin, RobertaModel):
    """`RobertaModel` whose self-attention runs hf_lara estimators."""

    config_class = LaraRobertaConfig


class LaraRobertaForMaskedLM(LaraModelMixin, RobertaForMaskedLM):
    """`RobertaForMaskedLM` whose self-attention runs hf_lara estimators."""

    config_class = LaraRobertaConfig


class LaraRobertaForSequenceClassification(LaraModelMixin, RobertaForSequenceClassification):
    """`RobertaForSequenceClassification` whose self-attention runs hf_lara estimators."""

    config_class = LaraRobertaConfig


class LaraDistilBertModel(LaraModelMixin, DistilBertModel):
    """`DistilBertModel` whose self-attention runs hf_lara estimators."""

    config_class = LaraDistilBertConfig


class LaraDistilBertForMaskedLM(LaraModelMixin, DistilBertForMaskedLM):
    """`DistilBertForMaskedLM` whose self-attention runs hf_lara estimators."""

    config_class = LaraDistilBertConfig


class LaraDistilBertForSequenceClassification(LaraModelMixin, DistilBertForSequenceClassification):
    """`DistilBertForSequenceClassification` whose self-attention runs hf_lara estimators."""

    config_class = LaraDistilBertConfig


class LaraGPT2Model(LaraModelMixin, GPT2Model):
    """`GPT2Model` whose self-attention runs hf_lara estimators."""

    config_class = LaraGPT2Config


class LaraGPT2LMHeadModel(LaraModelMixin, GPT2LMHeadModel):
    """`GPT2LMHeadModel` whose self-attention runs hf_lara estimators."""

    config_class = LaraGPT2Config


class LaraLlamaModel(LaraModelMixin, LlamaModel):
    """`LlamaModel` whose self-attention runs hf_lara estimators."""

    config_class = LaraLlamaConfig


class LaraLlamaForCausalLM(LaraModelMixin, LlamaForCausalLM):
    """`LlamaForCausalLM` whose self-attention runs hf_lara estimators."""

    config_class = LaraLlamaConfig


class LaraMistralModel(LaraModelMixin, MistralModel):
    """`MistralModel` whose self-attention runs hf_lara estimators."""

    config_class = LaraMistralConfig


class LaraMistralForCausalLM(LaraModelMixin, MistralForCausalLM):
    """`MistralForCausalLM` whose self-attention runs hf_lara estimators."""

    config_class = LaraMistralConfig


class LaraQwen2Model(LaraModelMixin, Qwen2Model):
    """`Qwen2Model` whose self-attention runs hf_lara estimators."""

    config_class = LaraQwen2Config


class LaraQwen2ForCausalLM(LaraModelMixin, Qwen2ForCausalLM):
    """`Qwen2ForCausalLM` whose self-attention runs hf_lara estimators."""

    config_class = LaraQwen2Config


class LaraViTModel(LaraModelMixin, ViTModel):
    """`ViTModel` whose self-attention runs hf_lara estimators."""

    config_class = LaraViTConfig


class LaraViTForImageClassification(LaraModelMixin, ViTForImageClassification):
    """`ViTForImageClassification` whose self-attention runs hf_lara estimators."""

    config_class = LaraViTConfig


class LaraDeiTModel(LaraModelMixin, DeiTModel):
    """`DeiTModel` whose self-attention runs hf_lara estimators."""

    config_class = LaraDeiTConfig


class LaraDeiTForImageClassification(LaraModelMixin, DeiTForImageClassification):
    """`DeiTForImageClassification` whose self-attention runs hf_lara estimators."""

    config_class = LaraDeiTConfig


#: The written-out converted model classes of the built-in families.
BUILTIN_MODEL_CLASSES = (
    LaraBertModel,
    LaraBertForMaskedLM,
    LaraBertForSequenceClassification,
    LaraRobertaModel,
    LaraRobertaForMaskedLM,
    LaraRobertaForSequenceClassification,
    LaraDistilBertModel,
    LaraDistilBertForMaskedLM,
    LaraDistilBertForSequenceClassification,
    LaraGPT2Model,
    LaraGPT2LMHeadModel,
    LaraLlamaModel,
    LaraLlamaForCausalLM,
    LaraMistralModel,
    LaraMistralForCausalLM,
    LaraQwen2Model,
    LaraQwen2ForCausalLM,
    LaraViTModel,
    LaraViTForImageClassification,
    LaraDeiTModel,
    LaraDeiTForImageClassification,
)
