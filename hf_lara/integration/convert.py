"""`convert`: turn an in-memory pretrained model into its converted class, in place."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedModel

from .attention import ATTENTION_KEY
from .calibration import keep_worst_on_softmax
from .compat import file_output_recording
from .config import LARA_FIELDS, LARA_OPTIONAL_FIELDS, LaraConfig
from .families import model_class_for
from .models import attach_estimators, resolve_layers
from .registry import get_family


def convert(
    model: PreTrainedModel,
    method: str,
    layers: list[int] | None = None,
    *,
    keep_softmax: int = 0,
    calibration: Any = None,
    layer_hparams: dict[int, dict[str, Any]] | None = None,
    **hparams: Any,
) -> PreTrainedModel:
    """Replace the softmax self-attention of `model` by the estimator `method`, in place.

    The model keeps its parameters (same tensors, device and dtype); its class becomes the family's converted
    subclass (e.g. `BertForMaskedLM` -> `LaraBertForMaskedLM`), its config the converted config, and its attention
    implementation `hf_lara`. Every selected self-attention module gains a `lara_attention` estimator built on that
    module's device and dtype. `save_pretrained` then writes a checkpoint that `AutoModel*.from_pretrained` loads
    back into the converted class. An already converted model can be converted again (the estimators are rebuilt).

    Args:
        model (`PreTrainedModel`): a model of a supported family (`hf_lara.supported_families()`).
        method (`str`): the estimator, one of `hf_lara.available_methods()`.
        layers (`list[int]`, *optional*): self-attention layers to convert, from 0; the others keep exact softmax.
        keep_softmax (`int`, *optional*, defaults to 0): after converting, measure every converted layer's attention
            error on `calibration` and leave the `keep_softmax` worst layers on exact softmax (see `calibration.py`);
            the measurement is kept as `model.lara_calibration`.
        calibration (texts, a batch or a list of batches, *optional*): inputs for `keep_softmax`.
        layer_hparams (`dict[int, dict]`, *optional*): per-layer overrides of `hparams`, e.g. `{5: {"num_chunks":
            128}}` for a larger budget in the layer that needs it (saved as `config.lara_layer_hparams`). Entries of
            layers that `keep_softmax` leaves on softmax are dropped.
        **hparams: the estimator's hyper-parameters, shared by every converted layer.

    Returns:
        `model` itself, converted.

    >>> model = hf_lara.convert(AutoModelForCausalLM.from_pretrained(path), method="eva", layers=[0, 2])
    >>> model.set_attn_implementation("sdpa")  # the teacher: the original model, same weights
    """
    family = get_family(model.config.model_type)
    converted_class = model_class_for(family, getattr(type(model), "lara_base_class", type(model)))
    config = LaraConfig.from_config(model.config, method=method, layers=layers, layer_hparams=layer_hparams, **hparams)
    num_converted = len(resolve_layers(config.lara_layers, len(family.attention_modules(model))))
    check_keep_softmax(keep_softmax, calibration, num_converted)
    # build (and check) everything before touching the model, so that a failure leaves it as it was
    attach_estimators(model, config, family, like_model=True)
    # modules keep references to the config object, so convert that object rather than replacing it
    model.config.__class__ = family.config_class
    # loaded configs carry their file's `model_type` as an instance attribute, which would hide the new class's
    vars(model.config).pop("model_type", None)
    for name in LARA_FIELDS + LARA_OPTIONAL_FIELDS:
        setattr(model.config, name, getattr(config, name))
    model.__class__ = converted_class
    # these estimators exist in no checkpoint: an adapter saved on top of them is refused (`check_adapter_base`)
    model.lara_drawn_in_memory = True
    # Transformers files each model's output-recording spec (hidden states, attentions) under its class when the
    # model is built; file it under the new class too, as `PreTrainedModel.__init__` would have
    file_output_recording(model)
    model.set_attn_implementation(ATTENTION_KEY)
    if keep_softmax:
        keep_worst_on_softmax(model, keep_softmax, calibration)
    return model


def check_keep_softmax(keep_softmax: int, calibration: Any, num_converted: int) -> None:
    """`keep_softmax` must leave at least one converted layer and comes with calibration inputs."""
    if isinstance(keep_softmax, bool) or not isinstance(keep_softmax, int) or keep_softmax < 0:
        raise ValueError(f"`keep_softmax` must be a non-negative integer, got {keep_softmax!r}.")
    if keep_softmax and keep_softmax >= num_converted:
        raise ValueError(
            f"`keep_softmax` must leave at least one of the {num_converted} converted layers to the estimator, "
            f"got {keep_softmax!r}."
        )
    if keep_softmax and calibration is None:
        raise ValueError(
            "`keep_softmax` needs `calibration` inputs to measure each layer's error on: texts, a tokenised batch or "
            "a list of batches."
        )
