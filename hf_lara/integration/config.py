"""Converted configs: one class per family (`LaraBertConfig`, model type `lara_bert`, ...), all mixing in `LaraConfig`.

The method and its hyper-parameters are ordinary serialised fields, so `config.json` records them. The attention
implementation itself is not serialised by Transformers, so `__post_init__` defaults it to `hf_lara`.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import os
from typing import Any

import torch
from transformers import (
    AutoConfig,
    BertConfig,
    DeiTConfig,
    DistilBertConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedConfig,
    Qwen2Config,
    RobertaConfig,
    ViTConfig,
)
from transformers.utils import logging

from ..attention import AttentionEstimator, available_methods, build_attention
from ..attention.base import ESTIMATORS
from .attention import ATTENTION_KEY
from .registry import MODEL_TYPE_PREFIX, get_family

logger = logging.get_logger(__name__)

#: The fields every converted config adds to its family's config.
LARA_FIELDS = ("lara_method", "lara_hparams", "lara_layers")
#: Fields added later, optional in `config.json` (checkpoints written before them load with the default).
LARA_OPTIONAL_FIELDS = ("lara_layer_hparams",)
#: `from_pretrained` arguments that go to the Hub loader rather than to the estimator.
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "trust_remote_code")


class LaraConfig:
    """Mixin of every converted config, and the entry point that builds the right one for a checkpoint.

    Fields added to the family's config (all serialised in `config.json`):
        lara_method (`str`): the estimator, one of `hf_lara.available_methods()`.
        lara_hparams (`dict`, *optional*, defaults to `{}`): keyword arguments of the estimator (see its docstring).
        lara_layers (`list[int]`, *optional*, defaults to `None`): indices of the self-attention layers to convert,
            counted from 0 in model order; the others keep exact softmax. `None` converts them all.
        lara_layer_hparams (`dict`, *optional*, defaults to `{}`): per-layer overrides of `lara_hparams`, keyed by
            layer index (a string in `config.json`), like peft's `rank_pattern`: `{"5": {"num_chunks": 128}}` gives
            layer 5 128 chunks and every other layer `lara_hparams`. Only converted layers may have an entry.

    >>> import hf_lara
    >>> cfg = hf_lara.LaraConfig.from_pretrained("path/to/bert", method="rfa", layers=[0, 2], num_features=64)
    >>> type(cfg).__name__, cfg.model_type
    ('LaraBertConfig', 'lara_bert')
    """

    def __post_init__(self, **kwargs):
        # `_attn_implementation` is never written to config.json: default it to ours on every load
        kwargs.setdefault("attn_implementation", ATTENTION_KEY)
        super().__post_init__(**kwargs)
        self.validate_lara()

    def validate_lara(self) -> None:
        """Check the `lara_*` fields (the estimator's own checks run when it is built)."""
        if self.lara_method is not None and self.lara_method not in available_methods():
            raise ValueError(f"`method` must be one of {', '.join(available_methods())}, got {self.lara_method!r}.")
        check_hparams_dict(self.lara_hparams, "lara_hparams")
        self.lara_layer_hparams = normalise_layer_hparams(self.lara_layer_hparams)
        layers = self.lara_layers
        if layers is not None:
            if isinstance(layers, int | str) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in layers
            ):
                raise TypeError(f"`layers` must be a list of layer indices or None, got {layers!r}.")
            if any(i < 0 for i in layers) or len(set(layers)) != len(layers):
                raise ValueError(f"`layers` must hold distinct non-negative layer indices, got {list(layers)}.")
            self.lara_layers = sorted(layers)
            stray = sorted(int(i) for i in self.lara_layer_hparams if int(i) not in self.lara_layers)
            if stray:
                raise ValueError(
                    f"`layer_hparams` has entries for layer(s) {stray}, which are not converted (`layers` is "
                    f"{self.lara_layers}); give hyper-parameters only to converted layers."
                )

    def layer_hparams_of(self, layer: int | None) -> dict[str, Any]:
        """The hyper-parameters of self-attention layer `layer`: `lara_hparams` updated by its `lara_layer_hparams`."""
        return {**self.lara_hparams, **self.lara_layer_hparams.get(str(layer), {})}

    def build_estimator(self, num_heads: int, head_dim: int, layer: int | None = None) -> AttentionEstimator:
        """The estimator this config describes for self-attention layer `layer` (None: the shared hyper-parameters,
        without per-layer overrides); bad hyper-parameters raise `ValueError`."""
        if self.lara_method is None:
            raise ValueError(
                f"This `{type(self).__name__}` has no `lara_method`; build it with "
                "`hf_lara.LaraConfig.from_pretrained(path, method=...)`."
            )
        hparams = self.layer_hparams_of(layer)
        accepted = accepted_hparams(self.lara_method)
        unknown = sorted(set(hparams) - set(accepted)) if accepted is not None else []
        if unknown:
            where = "" if str(layer) not in self.lara_layer_hparams else f" (layer {layer})"
            raise ValueError(
                f"Unknown hyper-parameter(s) {', '.join(map(repr, unknown))} for method `{self.lara_method}`{where}. "
                f"Accepted: {', '.join(accepted) or 'none'}."
            )
        try:
            return build_attention(self.lara_method, num_heads=num_heads, head_dim=head_dim, **hparams)
        except ValueError as error:
            where = "" if str(layer) not in self.lara_layer_hparams else f" in layer {layer}"
            raise ValueError(
                f"Invalid hyper-parameters for method `{self.lara_method}`{where} {hparams}: {error}"
            ) from error

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        """Load a converted config; a `lara_*` config missing one of `LARA_FIELDS` raises a `ValueError`."""
        if cls is LaraConfig:
            config_dict = known_config_hparams(config_dict)
            return LaraConfig.from_config(AutoConfig.for_model(**config_dict), **kwargs)
        config_dict = dict(config_dict)
        model_type = config_dict.pop("model_type", cls.model_type)
        missing = [name for name in LARA_FIELDS if name not in config_dict and name not in kwargs]
        if model_type == cls.model_type and missing:
            raise ValueError(
                f"This `{model_type}` config lacks the field(s) {', '.join(f'`{m}`' for m in missing)}, which every "
                "converted config records. Re-create it with `hf_lara.LaraConfig.from_pretrained(base_path, "
                "method=...)` or add the fields to config.json."
            )
        if model_type != cls.model_type and "lara_method" in missing:
            raise ValueError(
                f"A `{model_type}` checkpoint is not converted, so `{cls.__name__}` cannot load it without a method: "
                "use `hf_lara.LaraConfig.from_pretrained(path, method=...)`. If this comes from peft saving an "
                "adapter: the model's estimators were made in memory (`hf_lara.convert`, or `from_pretrained(path, "
                "config=...)`) and exist in no checkpoint, while peft records `model.name_or_path`, the unconverted "
                "model, as the adapter's base, so the adapter could never be reloaded onto the same model. Save the "
                "converted model with `model.save_pretrained(dir)`, load it back from `dir`, then add the adapter (an "
                "adapter already trained is kept by `peft_model.merge_and_unload().save_pretrained(dir)`)."
            )
        config_dict = known_config_hparams({"lara_hparams": {}, **config_dict})
        return super().from_dict(config_dict, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        method: str | None = None,
        layers: list[int] | None = None,
        hparams: dict[str, Any] | None = None,
        layer_hparams: dict[int, dict[str, Any]] | None = None,
        **kwargs,
    ):
        """The converted config of a base (or already converted) checkpoint.

        Keyword arguments are split as `peft` and `AutoConfig` do: Hub arguments go to the loader, the estimator's
        hyper-parameters (`hparams`, plus any keyword its `__init__` names) to `lara_hparams`, attributes of the
        family's config to the config, exactly as `AutoConfig.from_pretrained(path, num_labels=2)` sets them. A
        keyword that is none of these raises (a typo must not become a stray config attribute).

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): a checkpoint folder or Hub id.
            method (`str`, *optional*): the estimator; required unless the checkpoint is already converted.
            layers (`list[int]`, *optional*): self-attention layers to convert (default: all).
            hparams (`dict`, *optional*): the estimator's hyper-parameters, checked strictly.
            layer_hparams (`dict[int, dict]`, *optional*): per-layer overrides of the hyper-parameters, e.g.
                `{5: {"num_chunks": 128}}` (`lara_layer_hparams`).
            **kwargs: Hub arguments (`revision`, `cache_dir`, ...), hyper-parameters named in the estimator's
                signature, and config attributes (`num_labels`, `id2label`, ...).

        Returns:
            The family's converted config (e.g. `LaraBertConfig`).

        >>> cfg = hf_lara.LaraConfig.from_pretrained(path, method="lara", num_landmarks=16, num_labels=2)
        >>> cfg.lara_hparams, cfg.num_labels
        ({'num_landmarks': 16}, 2)
        """
        if cls is not LaraConfig and method is None and layers is None and hparams is None and layer_hparams is None:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        hub_kwargs = {name: kwargs.pop(name) for name in HUB_KWARGS if name in kwargs}
        base = AutoConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        named, attributes = split_kwargs(method or getattr(base, "lara_method", None), kwargs, base)
        if attributes:
            base = AutoConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs, **attributes)
        converted = LaraConfig.from_config(
            base, method=method, layers=layers, layer_hparams=layer_hparams, **named, **(hparams or {})
        )
        if not isinstance(converted, cls):
            raise ValueError(
                f"`{cls.__name__}` cannot convert a `{base.model_type}` checkpoint; use `hf_lara.LaraConfig`, which "
                "picks the family's class."
            )
        return converted

    @staticmethod
    def from_config(
        config: PreTrainedConfig,
        *,
        method: str | None = None,
        layers: list[int] | None = None,
        layer_hparams: dict[int, dict[str, Any]] | None = None,
        **hparams: Any,
    ):
        """The converted config of an in-memory config (base or converted; a converted one keeps unset fields).

        Every other keyword is a hyper-parameter of the estimator, checked strictly (`convert` uses this);
        `layer_hparams` overrides them per layer (`{5: {"num_chunks": 128}}`; entries update a converted config's
        entries of the same layer). Checking builds one estimator per distinct set of hyper-parameters under a
        forked RNG, so the global random state is left as it was.
        """
        family = get_family(config.model_type)
        layer_hparams = normalise_layer_hparams(layer_hparams or {})
        if isinstance(config, LaraConfig):
            same_method = method is None or method == config.lara_method
            method = method or config.lara_method
            hparams = {**config.lara_hparams, **hparams} if same_method else hparams
            if same_method:
                layer_hparams = {
                    i: {**config.lara_layer_hparams.get(i, {}), **layer_hparams.get(i, {})}
                    for i in {**config.lara_layer_hparams, **layer_hparams}
                }
            layers = config.lara_layers if layers is None else layers
        if method is None:
            raise ValueError(f"`method` is required to convert a `{config.model_type}` config.")
        data = {k: v for k, v in config.to_dict().items() if not k.startswith("_attn_implementation")}
        data.pop("model_type", None)
        data.update(
            lara_method=method,
            lara_hparams=dict(hparams),
            lara_layers=None if layers is None else list(layers),
            lara_layer_hparams=layer_hparams,
        )
        converted = family.config_class(**data)
        # fail now, not at the first forward, on bad hyper-parameters; without drawing from the global RNG
        with torch.random.fork_rng(devices=[]), torch.device("cpu"):
            for layer in [None, *sorted(map(int, converted.lara_layer_hparams))]:
                converted.build_estimator(*family.head_shape(converted), layer=layer)
        return converted


# The built-in families' converted configs, written out so that readers, IDEs and type checkers see them. Each adds
# the `LARA_FIELDS` to its family's config; `make_config_class` builds the same for families registered at run time.
class LaraBertConfig(LaraConfig, BertConfig):
    """`BertConfig` converted by hf_lara; see `hf_lara.LaraConfig` for the added fields."""

    model_type = "lara_bert"
    lara_method: str | None = None
    lara_hparams: dict = dataclasses.field(default_factory=dict)
    lara_layers: list | None = None
    lara_layer_hparams: dict = dataclasses.field(default_factory=dict)


class LaraRobertaConfig(LaraConfig, RobertaConfig):
    """`RobertaConfig` converted by hf_lara; see `hf_lara.LaraConfig` for the added fields."""

    model_type = "lara_roberta"
    lara_method: str | None = None
    lara_hparams: dict = dataclasses.field(default_factory=dict)
    lara_layers: list | None = None
    lara_layer_hparams: dict = dataclasses.field(default_factory=dict)


class LaraDistilBertConfig(LaraConfig, DistilBertConfig):
    """`DistilBertConfig` converted by hf_lara; see `hf_lara.LaraConfig` for the added fields."""

    model_type = "lara_distilbert"
    lara_method: str | None = None
    lara_hparams: dict = dataclasses.field(default_factory=dict)
    lara_layers: list | None = None
    lara_layer_hparams: dict = dataclasses.field(default_factory=dict)


class LaraGPT2Config(LaraConfig, GPT2Config):
    """`GPT2Config` converted by hf_lara; see `hf_lara.LaraConfig` for the added fields."""

    model_type = "lara_gpt2"
    lara_method: str | None = None
    lara_hparams: dict = dataclasses.field(default_factory=dict)
    lara_layers: list | None = None
    lara_layer_hparams: dict = dataclasses.field(default_factory=dict)


class LaraLlamaConfig(LaraConfig, LlamaConfig):
    """`LlamaConfig` converted by hf_lara; see `hf_lara.LaraConfig` for the added fields."""

    model_type = "lara_llama"
    lara_method: str | None = None
    lara_hparams: dict = dataclasses.field(default_factory=dict)
    lara_layers: list | None = None
    lara_layer_hparams: dict = dataclasses.field(default_factory=dict)


class LaraMistralConfig(LaraConfig, MistralConfig):
    """`MistralConfig` converted by hf_lara; see `hf_lara.LaraConfig` for the added fields."""

    model_type = "lara_mistral"
    lara_method: str | None = None
    lara_hparams: dict = dataclasses.field(default_factory=dict)
    lara_layers: list | None = None
    lara_layer_hparams: dict = dataclasses.field(default_factory=dict)


class LaraQwen2Config(LaraConfig, Qwen2Config):
    """`Qwen2Config` converted by hf_lara; see `hf_lara.LaraConfig` for the added fields."""

    model_type = "lara_qwen2"
    lara_method: str | None = None
    lara_hparams: dict = dataclasses.field(default_factory=dict)
    lara_layers: list | None = None
    lara_layer_hparams: dict = dataclasses.field(default_factory=dict)


class LaraViTConfig(LaraConfig, ViTConfig):
    """`ViTConfig` converted by hf_lara; see `hf_lara.LaraConfig` for the added fields."""

    model_type = "lara_vit"
    lara_method: str | None = None
    lara_hparams: dict = dataclasses.field(default_factory=dict)
    lara_layers: list | None = None
    lara_layer_hparams: dict = dataclasses.field(default_factory=dict)


class LaraDeiTConfig(LaraConfig, DeiTConfig):
    """`DeiTConfig` converted by hf_lara; see `hf_lara.LaraConfig` for the added fields."""

    model_type = "lara_deit"
    lara_method: str | None = None
    lara_hparams: dict = dataclasses.field(default_factory=dict)
    lara_layers: list | None = None
    lara_layer_hparams: dict = dataclasses.field(default_factory=dict)


#: The converted configs of the built-in families, in registration order.
BUILTIN_CONFIG_CLASSES = (
    LaraBertConfig,
    LaraRobertaConfig,
    LaraDistilBertConfig,
    LaraGPT2Config,
    LaraLlamaConfig,
    LaraMistralConfig,
    LaraQwen2Config,
    LaraViTConfig,
    LaraDeiTConfig,
)


def accepted_hparams(method: str) -> list[str] | None:
    """Keyword arguments of an estimator besides `num_heads`/`head_dim`; None when it takes `**kwargs`."""
    params = list(inspect.signature(ESTIMATORS[method].__init__).parameters.values())[1:]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.name not in ("num_heads", "head_dim")]


def split_kwargs(
    method: str | None, kwargs: dict[str, Any], config: PreTrainedConfig
) -> tuple[dict[str, Any], dict[str, Any]]:
    """`(hyper-parameters, config attributes)`: the keywords `method`'s estimator names, and those `config` has.

    A keyword that is neither (a typo such as `num_featurez`) raises rather than becoming a stray config attribute.
    """
    accepted = (accepted_hparams(method) or []) if method in ESTIMATORS else []
    named = {k: v for k, v in kwargs.items() if k in accepted}
    attributes = {k: v for k, v in kwargs.items() if k not in named and hasattr(config, k)}
    unknown = [k for k in kwargs if k not in named and k not in attributes]
    if unknown:
        close = difflib.get_close_matches(unknown[0], accepted, n=1, cutoff=0.8)
        hint = f" Did you mean `{close[0]}`?" if close else ""
        raise ValueError(
            f"Unknown hyper-parameter(s) {', '.join(map(repr, unknown))} for method `{method}`, and no attribute of "
            f"`{type(config).__name__}` either.{hint} Accepted hyper-parameters: {', '.join(accepted) or 'none'}."
        )
    return named, attributes


def check_hparams_dict(hparams: Any, name: str) -> None:
    """A `TypeError` naming `name` unless `hparams` is a dict keyed by hyper-parameter name that JSON can save."""
    if not isinstance(hparams, dict) or not all(isinstance(key, str) for key in hparams):
        raise TypeError(f"`{name}` must be a dict keyed by hyper-parameter name, got {hparams!r}.")
    try:
        json.dumps(hparams)
    except TypeError as error:
        raise TypeError(f"`{name}` must be JSON serialisable to be saved: {error}") from None


def normalise_layer_hparams(layer_hparams: Any) -> dict[str, dict[str, Any]]:
    """`{5: {...}}` or `{"5": {...}}` -> `{"5": {...}}` (JSON keys), checked: layer indices >= 0, dicts of
    JSON-serialisable values keyed by hyper-parameter name. Raises `TypeError`/`ValueError` naming the problem."""
    if not isinstance(layer_hparams, dict):
        raise TypeError(f"`layer_hparams` must be a dict {{layer index: {{name: value}}}}, got {layer_hparams!r}.")
    normalised = {}
    for key, hparams in layer_hparams.items():
        index = key if isinstance(key, int) and not isinstance(key, bool) else None
        if isinstance(key, str) and key.isdigit():
            index = int(key)
        if index is None or index < 0:
            raise ValueError(f"`layer_hparams` must be keyed by layer indices >= 0, got the key {key!r}.")
        check_hparams_dict(hparams, f"layer_hparams[{index}]")
        normalised[str(index)] = dict(hparams)
    return dict(sorted(normalised.items(), key=lambda item: int(item[0])))


def known_config_hparams(config_dict: dict[str, Any]) -> dict[str, Any]:
    """A copy of `config_dict` whose `lara_hparams` and `lara_layer_hparams` keep only keys the method knows."""
    config_dict = dict(config_dict)
    method = config_dict.get("lara_method")
    if "lara_hparams" in config_dict:
        config_dict["lara_hparams"] = known_hparams(method, config_dict["lara_hparams"])
    layer_hparams = config_dict.get("lara_layer_hparams")
    if isinstance(layer_hparams, dict):
        config_dict["lara_layer_hparams"] = {i: known_hparams(method, h) for i, h in layer_hparams.items()}
    return config_dict


def known_hparams(method: str | None, hparams: Any) -> Any:
    """`hparams` without the keys `method`'s estimator does not take, dropped with a warning (a checkpoint written
    by a newer hf_lara); anything else is left for `validate_lara` to judge."""
    if method not in ESTIMATORS or not isinstance(hparams, dict):
        return hparams
    accepted = accepted_hparams(method)
    unknown = sorted(set(hparams) - set(accepted)) if accepted is not None else []
    if unknown:
        logger.warning(
            f"Ignoring hyper-parameter(s) {', '.join(map(repr, unknown))} of method `{method}` found in the checkpoint: "
            f"this version of hf_lara does not know them (accepted: {', '.join(accepted) or 'none'}). The model may "
            "behave differently from the one that was saved; upgrade hf_lara to use them."
        )
    return {k: v for k, v in hparams.items() if k not in unknown}


def make_config_class(base: type[PreTrainedConfig]) -> type[PreTrainedConfig]:
    """`LaraXConfig(LaraConfig, XConfig)` with model type `lara_<x>` and the `LARA_FIELDS`."""
    namespace = {
        "__module__": __name__,
        "__qualname__": f"Lara{base.__name__}",
        "__doc__": f"`{base.__name__}` converted by hf_lara; see `hf_lara.LaraConfig` for the added fields.",
        "__annotations__": {
            "lara_method": str | None,
            "lara_hparams": dict,
            "lara_layers": list | None,
            "lara_layer_hparams": dict,
        },
        "model_type": MODEL_TYPE_PREFIX + base.model_type,
        "lara_method": None,
        "lara_hparams": dataclasses.field(default_factory=dict),
        "lara_layers": None,
        "lara_layer_hparams": dataclasses.field(default_factory=dict),
    }
    return type(f"Lara{base.__name__}", (LaraConfig, base), namespace)
