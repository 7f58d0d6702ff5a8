"""Registering model families: converted config and model classes, wired into every Auto class the family has."""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable, Sequence

import transformers
from torch import nn
from transformers import AutoConfig, PreTrainedConfig, PreTrainedModel

from .compat import auto_model_mappings
from .config import BUILTIN_CONFIG_CLASSES, LaraConfig, make_config_class
from .models import BUILTIN_MODEL_CLASSES, make_model_class
from .registry import FAMILIES, MODEL_TYPE_PREFIX, Family, default_head_shape, supported_families

#: Text that marks a modeling file (or class) that routes attention through `AttentionInterface`.
INTERFACE_MARK = "ALL_ATTENTION_FUNCTIONS.get_interface("

#: Built-in families: model_type -> (modeling module, config class, self-attention classes).
BUILTIN_FAMILIES = {
    "bert": ("bert", "BertConfig", ("BertSelfAttention",)),
    "roberta": ("roberta", "RobertaConfig", ("RobertaSelfAttention",)),
    "distilbert": ("distilbert", "DistilBertConfig", ("DistilBertSelfAttention",)),
    "gpt2": ("gpt2", "GPT2Config", ("GPT2Attention",)),
    "llama": ("llama", "LlamaConfig", ("LlamaAttention",)),
    "mistral": ("mistral", "MistralConfig", ("MistralAttention",)),
    "qwen2": ("qwen2", "Qwen2Config", ("Qwen2Attention",)),
    "vit": ("vit", "ViTConfig", ("ViTAttention",)),
    "deit": ("deit", "DeiTConfig", ("DeiTAttention",)),
}


def family_model_classes(config_class: type[PreTrainedConfig]) -> dict[type, list[type[PreTrainedModel]]]:
    """Auto class -> the family's model classes it maps `config_class` to (only classes of the family's own file)."""
    found: dict[type, list[type[PreTrainedModel]]] = {}
    for auto_class, mapping in auto_model_mappings().items():
        if config_class in mapping:
            classes = mapping[config_class]
            found[auto_class] = list(classes) if isinstance(classes, tuple | list) else [classes]
    if found:
        home = found.get(transformers.AutoModel, next(iter(found.values())))[0].__module__
        found = {auto: [c for c in classes if c.__module__ == home] for auto, classes in found.items()}
    return {auto: classes for auto, classes in found.items() if classes}


def detect_attention_classes(modeling: object) -> tuple[type[nn.Module], ...]:
    """Self-attention classes of a modeling module: `nn.Module`s whose own source calls the interface."""
    classes = []
    for _, obj in inspect.getmembers(modeling, inspect.isclass):
        if obj.__module__ != modeling.__name__ or not issubclass(obj, nn.Module) or "Cross" in obj.__name__:
            continue
        if issubclass(obj, PreTrainedModel):
            continue
        try:
            source = inspect.getsource(obj)
        except (OSError, TypeError):
            continue
        if INTERFACE_MARK in source:
            classes.append(obj)
    return tuple(classes)


def register_family(
    config_class: type[PreTrainedConfig],
    *,
    attention_classes: Sequence[type[nn.Module]] | None = None,
    head_shape: Callable[[PreTrainedConfig], tuple[int, int]] | None = None,
) -> type[PreTrainedConfig]:
    """Make a model family convertible: converted config and model classes, registered with the Auto classes.

    Args:
        config_class (`type[PreTrainedConfig]`): the family's config class, e.g. `transformers.ElectraConfig`.
        attention_classes (`Sequence[type[nn.Module]]`, *optional*): the self-attention modules to convert. By
            default, the classes of the family's modeling file that call `ALL_ATTENTION_FUNCTIONS.get_interface(`
            (cross-attention classes excluded).
        head_shape (`Callable`, *optional*): `config -> (num_heads, head_dim)` of the queries; by default
            `config.num_attention_heads` and `config.head_dim` or `hidden_size // num_attention_heads`.

    Returns:
        The converted config class (`Lara<Family>Config`, model type `lara_<model_type>`).

    Raises:
        `NotImplementedError` when the family's attention does not go through `AttentionInterface`.

    >>> import hf_lara, transformers
    >>> hf_lara.register_family(transformers.ElectraConfig).model_type
    'lara_electra'
    """
    if config_class.model_type in FAMILIES:
        return FAMILIES[config_class.model_type].config_class
    return add_family(config_class, attention_classes=attention_classes, head_shape=head_shape)


def add_family(
    config_class: type[PreTrainedConfig],
    *,
    attention_classes: Sequence[type[nn.Module]] | None = None,
    head_shape: Callable[[PreTrainedConfig], tuple[int, int]] | None = None,
    lara_config: type[LaraConfig] | None = None,
    model_classes: Sequence[type[PreTrainedModel]] = (),
) -> type[PreTrainedConfig]:
    """`register_family`, optionally with converted classes written out in advance (`lara_config`, `model_classes`,
    each with a `lara_base_class`); the others are made here."""
    model_type = config_class.model_type
    by_auto = family_model_classes(config_class)
    if not by_auto:
        raise ValueError(f"`{config_class.__name__}` has no model class registered with any `AutoModel*` class.")
    modeling = sys.modules[next(iter(by_auto.values()))[0].__module__]
    if INTERFACE_MARK not in inspect.getsource(modeling):
        raise NotImplementedError(
            f"`{model_type}` models compute attention inside their own modules rather than through Transformers' "
            f"`AttentionInterface`, so hf_lara cannot swap it. Supported families: {', '.join(supported_families())}; "
            "others can be added with `hf_lara.register_family` if their modeling code uses `AttentionInterface`."
        )
    attention_classes = tuple(attention_classes or detect_attention_classes(modeling))
    if not attention_classes:
        raise ValueError(f"No self-attention class calling `AttentionInterface` found in `{modeling.__name__}`.")
    lara_config = lara_config or make_config_class(config_class)
    family = Family(
        model_type, config_class, lara_config, attention_classes, head_shape=head_shape or default_head_shape
    )
    family.model_classes.update({cls.lara_base_class: cls for cls in model_classes})
    AutoConfig.register(lara_config.model_type, lara_config, exist_ok=True)
    for auto_class, classes in by_auto.items():
        for base in classes:
            if base not in family.model_classes:
                family.model_classes[base] = make_model_class(base, lara_config)
        auto_class.register(lara_config, family.model_classes[classes[0]], exist_ok=True)
    FAMILIES[model_type] = family
    return lara_config


def model_class_for(family: Family, base: type[PreTrainedModel]) -> type[PreTrainedModel]:
    """The converted class of a family model class, created on the fly for classes no Auto class lists."""
    if base not in family.model_classes:
        family.model_classes[base] = make_model_class(base, family.config_class)
    return family.model_classes[base]


def register_builtin_families() -> None:
    """Register bert, roberta, distilbert, gpt2, llama, mistral, qwen2, vit and deit with their written-out classes."""
    lara_configs = {cls.model_type: cls for cls in BUILTIN_CONFIG_CLASSES}
    for model_type, (module_name, config_name, attention_names) in BUILTIN_FAMILIES.items():
        if model_type in FAMILIES:
            continue
        modeling = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
        lara_config = lara_configs[MODEL_TYPE_PREFIX + model_type]
        add_family(
            getattr(transformers, config_name),
            attention_classes=tuple(getattr(modeling, n) for n in attention_names),
            lara_config=lara_config,
            model_classes=[cls for cls in BUILTIN_MODEL_CLASSES if cls.config_class is lara_config],
        )
