"""The one mapping, keyed by `model_type`, of the model families hf_lara can convert."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel

#: Prefix of the `model_type` of every converted config (`bert` -> `lara_bert`).
MODEL_TYPE_PREFIX = "lara_"


def default_head_shape(config: PreTrainedConfig) -> tuple[int, int]:
    """`(num_heads, head_dim)` of the queries, from the usual config fields."""
    num_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    return num_heads, head_dim


@dataclass
class Family:
    """A model family hf_lara can convert.

    Attributes:
        model_type (`str`): the family's own `model_type`, e.g. `bert`.
        base_config_class (`type[PreTrainedConfig]`): the family's config class, e.g. `BertConfig`.
        config_class (`type[PreTrainedConfig]`): the converted config class, e.g. `LaraBertConfig`.
        attention_classes (`tuple[type[nn.Module], ...]`): the self-attention modules to convert.
        model_classes (`dict[type[PreTrainedModel], type[PreTrainedModel]]`): family model class -> converted class.
        head_shape (`Callable`): `config -> (num_heads, head_dim)` of the queries.
    """

    model_type: str
    base_config_class: type[PreTrainedConfig]
    config_class: type[PreTrainedConfig]
    attention_classes: tuple[type[nn.Module], ...]
    model_classes: dict[type[PreTrainedModel], type[PreTrainedModel]] = field(default_factory=dict)
    head_shape: Callable[[PreTrainedConfig], tuple[int, int]] = default_head_shape

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        """The self-attention modules of `model` in layer order; cross-attention is never converted."""
        return [
            module
            for module in model.modules()
            if isinstance(module, self.attention_classes) and not getattr(module, "is_cross_attention", False)
        ]


FAMILIES: dict[str, Family] = {}


def supported_families() -> list[str]:
    """The `model_type`s hf_lara can convert, sorted."""
    return sorted(FAMILIES)


def get_family(model_type: str) -> Family:
    """The family of a base or converted `model_type` (`bert` or `lara_bert`)."""
    base_type = model_type.removeprefix(MODEL_TYPE_PREFIX)
    if base_type in FAMILIES:
        return FAMILIES[base_type]
    raise NotImplementedError(
        f"hf_lara cannot convert models of type `{model_type}`. Supported families: {', '.join(supported_families())}. "
        "A family whose modeling code routes attention through Transformers' `AttentionInterface` can be added with "
        "`hf_lara.register_family(ItsConfigClass)`."
    )
