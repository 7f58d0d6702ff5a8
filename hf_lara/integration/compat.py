"""Every contact of hf_lara with non-public (or version-dependent) API of Transformers and torch, one function each.

The rest of the package uses public API only. Each item says why it is needed and since which Transformers version
it is known to hold; `tests/integration/test_compat.py` checks each one against the installed version, so an upstream
rename fails there, by name, instead of silently changing behaviour elsewhere. Tested on Transformers 5.23 and 5.24.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import transformers
from packaging import version

TRANSFORMERS_VERSION = version.parse(transformers.__version__)

# Transformers 5.24 renamed the cache keyword of models' `forward` and of `generate` from `past_key_values` to
# `cache` (the old name warns until 5.40 / 6.0), and model outputs from `.past_key_values` to `.cache`. Public API,
# but the name depends on the version: this is the one place that knows it.
#: The keyword under which models' `forward`, `generate` and `create_causal_mask` take the cache.
CACHE_KWARG = "cache" if TRANSFORMERS_VERSION >= version.parse("5.24.0.dev0") else "past_key_values"
#: Every name the cache has been passed under (newest first).
CACHE_KWARGS = ("cache", "past_key_values")


def cache_from_kwargs(kwargs: Mapping[str, Any]) -> Any:
    """The cache passed to a module's `forward` under either name (a caller may still use the deprecated one)."""
    for name in CACHE_KWARGS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def output_cache(outputs: Any) -> Any:
    """The cache a model output or `generate` result carries (`.cache` since 5.24, `.past_key_values` before)."""
    return getattr(outputs, CACHE_KWARG, None)


def file_output_recording(model: transformers.PreTrainedModel) -> None:
    """File `model._can_record_outputs` under the model's (new) class, as `PreTrainedModel.__init__` does.

    Why: `output_hidden_states`/`output_attentions` are captured by hooks chosen from a registry keyed by the model's
    class (`transformers.utils.output_capturing._CAN_RECORD_REGISTRY`, filled in `PreTrainedModel.__init__`, seen in
    5.23 and 5.24). `convert` changes the class of a built model, which `__init__` never sees. Without the registry
    (older or newer layout) there is nothing to file.
    """
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:
        return
    _CAN_RECORD_REGISTRY[model] = model._can_record_outputs


def auto_model_mappings() -> dict[type, Mapping]:
    """Every `AutoModel*` class of the installed Transformers -> its lazy config-to-model mapping.

    Why: the mapping (`AutoModelXxx._model_mapping`, a `_LazyAutoMapping`, 4.x to 5.24) is the only registry of which
    model class an Auto class builds for a config class; `register_family` needs it to convert each head class.
    """
    found = {}
    for name in dir(transformers):
        obj = getattr(transformers, name) if name.startswith("AutoModel") else None
        mapping = getattr(obj, "_model_mapping", None)
        if isinstance(obj, type) and hasattr(obj, "register") and mapping is not None:
            found[obj] = mapping
    return found


def mark_initialized(tensor: torch.Tensor) -> None:
    """Tell Transformers' weight initialisation to leave `tensor` as it is.

    Why: `from_pretrained` builds models on the meta device and re-initialises every tensor not flagged
    `_is_hf_initialized` (`PreTrainedModel._initialize_weights`, 4.x to 5.24); estimators built off the meta device
    are complete and must keep their values.
    """
    tensor._is_hf_initialized = True


def is_initialized(tensor: torch.Tensor) -> bool:
    """Whether `tensor` was loaded or initialised (the flag `mark_initialized` sets)."""
    return bool(getattr(tensor, "_is_hf_initialized", False))


#: peft's method that every `PeftModel.save_pretrained` runs before writing anything (peft 0.21).
PEFT_CARD_METHOD = "create_or_update_model_card"


def called_by_peft_card(depth: int = 2) -> bool:
    """Whether the frame `depth` levels above this function (2: its caller's caller) is peft's
    `PeftModel.create_or_update_model_card`.

    Why: peft has no hook before an adapter is saved, and it records `model.name_or_path` as the adapter's base
    whatever `save_embedding_layers` says. The card update reads `model.model_tags` in every `save_pretrained`
    (peft 0.21), so that read is the one place a converted model can refuse an adapter peft could not rebuild.
    """
    import sys

    frame = sys._getframe(depth)
    return frame.f_code.co_name == PEFT_CARD_METHOD and frame.f_globals.get("__name__", "").startswith("peft")


@contextlib.contextmanager
def peft_wrapping() -> Iterator[None]:
    """Silence the one warning of wrapping a model in peft that users cannot act on.

    Why: peft 0.21's `PeftModel.__init__` reads `model.is_gradient_checkpointing`, which transformers 5.24 deprecates
    in favour of `is_activation_checkpointing` with a FutureWarning on every wrap. Only that message is filtered.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield
