"""Constant-memory decoding: `LaraCache`, a `DynamicCache` whose recurrent layers keep a `LinearState`, not keys.

Design
------
A causal kernel estimator (`rfa`, `kernel`, causal `lara`: `supports_recurrent_state = True`) is an RNN: all a new
query needs from the past is its `LinearState`. `LaraCache` gives each such layer a `LaraStateLayer` and keeps an
ordinary Transformers KV layer (`DynamicLayer`, or the sliding one the config asks for) for every other layer:
softmax layers of hybrid models (`layers=[...]`), `eva`, `ra`, bidirectional estimators.

One decoding step, for a converted attention module `m` with layer index `i`:

1. `bind_state_layer`, a forward pre-hook (`with_kwargs=True`) that hf_lara puts on every converted attention module,
   finds `past_key_values.layers[i]`; when it is a `LaraStateLayer` it adds it to the module's keyword arguments
   under `STATE_LAYER_KWARG`. Llama-, GPT-2-style modules hand their extra keyword arguments to the attention
   function, so no module state is involved and nothing of Transformers is patched.
2. The module calls `past_key_values.update(k, v, i)` as usual: a `LaraStateLayer` only counts the tokens and returns
   the new `k`, `v` `(B, H_kv, n, D)` themselves.
3. `lara_attention_forward` sees the state layer and runs `estimator.step(q, k, v, layer.state)` on the new tokens,
   storing the new state in the layer. The padding mask it receives is the tail of the 2-D mask for those tokens, so
   padded prompt keys never enter the state (left padding).

Masks and positions: a `LaraStateLayer` reports `kv_length = query_length`, `kv_offset = tokens seen` (the keys the
attention function receives), but `get_seq_length` counts every token seen, so positions and `cache_position` are
those of a KV cache. When a model mixes both kinds of layers, `LaraCache.get_mask_sizes` sizes the shared mask for a
KV layer (their keys cover the whole past); the state path only reads the last `n` columns of any mask.

Beam search and batch edits go through `reorder_cache` / `batch_select_indices` / `batch_repeat_interleave`
(`LinearState.index_select`). A recurrent state cannot be cropped, so assisted decoding keeps the KV path.

Memory per recurrent layer: `B * H * S * (D + 2)` numbers in fp32 (fp64 for fp64 models), `H` the query heads
(grouped KV heads are expanded), `S` the features (`num_features`, `num_landmarks`), whatever the number of tokens;
e.g. GPT-2 small with 64 features: `12 * 64 * 66 * 4` bytes = 203 KB per layer and sequence, where its KV cache
grows by 6 KB per layer and token (the state is smaller past 34 tokens). KV layers grow by `2 * B * H_kv * D` numbers per token as usual.

`generate()` creates a `LaraCache` on its own for converted decoders with at least one recurrent layer
(`LaraModelMixin._prepare_cache_for_generation`); a cache passed by the user, or `cache_implementation="dynamic"`,
keeps the KV path. A forward call with `use_cache=True` and no cache also gets a `LaraCache` (`provide_state_cache`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import CacheLayerMixin

from ..attention.linear import LinearState
from .attention import ESTIMATOR_ATTR, STATE_LAYER_KWARG


class LaraStateLayer(CacheLayerMixin):
    """Cache layer of a recurrent estimator: a constant-size `LinearState` and a count of the tokens seen.

    Attributes:
        state (`LinearState`, *optional*): `kvz` `(B, H, S, D + 1)` and `shift` `(B, H, S)`; None before any token.
        seen (`int`): tokens absorbed (padding included, as a KV cache counts them).
    """

    is_sliding = False
    is_croppable = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.state: LinearState | None = None
        self.seen = 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seen={self.seen}, nbytes={self.nbytes()})"

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Count the new tokens `(B, H_kv, n, D)` and return them unchanged: the state absorbs them afterwards."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.seen += key_states.shape[-2]
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """`(kv_length, kv_offset)`: the attention function receives only the `query_length` new keys."""
        return query_length, self.seen

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        """Bytes held by the layer (its state)."""
        return 0 if self.state is None else self.state.nbytes()

    def reset(self) -> None:
        self.state, self.seen, self.is_initialized = None, 0, False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise NotImplementedError("A recurrent state cannot drop tokens: use a DynamicCache to crop.")

    def offload(self) -> None:
        self._move("cpu")

    def prefetch(self) -> None:
        if self.is_initialized:
            self._move(self.device)

    def _move(self, device: torch.device | str) -> None:
        if self.state is not None:
            self.state = LinearState(self.state.kvz.to(device), self.state.shift.to(device))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep batch rows `beam_idx` `(B',)` (beam search)."""
        if self.state is not None:
            self.state = self.state.index_select(beam_idx.to(self.state.kvz.device))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(torch.as_tensor(indices).reshape(-1).long())

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            rows = torch.arange(self.state.kvz.shape[0], device=self.state.kvz.device)
            self.reorder_cache(rows.repeat_interleave(repeats))


class LaraCache(DynamicCache):
    """`DynamicCache` with a `LaraStateLayer` for each recurrent layer of a converted model, KV layers elsewhere.

    Args:
        model (`nn.Module`): a converted model (`LaraModelMixin`); its config shapes the KV layers.

    >>> cache = hf_lara.LaraCache(model)
    >>> out = model(input_ids=prompt, past_key_values=cache, use_cache=True)  # prefill, then one token at a time
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__(config=model.config)
        recurrent = recurrent_layer_indices(model)
        while len(self.layers) <= max(recurrent, default=-1):
            self.layers.append(self.layer_class_to_replicate())
        for i in recurrent:
            self.layers[i] = LaraStateLayer()

    def state_layer(self, layer_idx: int) -> LaraStateLayer | None:
        """The `LaraStateLayer` of layer `layer_idx`, or None for a KV layer."""
        layer = self.layers[layer_idx] if 0 <= layer_idx < len(self.layers) else None
        return layer if isinstance(layer, LaraStateLayer) else None

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        """Mask sizes of `layer_idx`; a state layer defers to a KV layer when there is one (the mask is shared)."""
        if self.state_layer(layer_idx) is not None:
            kv_layers = [i for i, layer in enumerate(self.layers) if not isinstance(layer, LaraStateLayer)]
            full = [i for i in kv_layers if not getattr(self.layers[i], "is_sliding", False)]
            layer_idx = (full or kv_layers or [layer_idx])[0]
        return super().get_mask_sizes(query_length, layer_idx)

    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds (states, keys and values)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, LaraStateLayer):
                total += layer.nbytes()
            else:
                total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if t is not None)
        return total


def is_recurrent(module: nn.Module) -> bool:
    """Whether a converted attention module decodes with a constant-size state (causal, `supports_recurrent_state`)."""
    estimator = getattr(module, ESTIMATOR_ATTR, None)
    return bool(getattr(estimator, "supports_recurrent_state", False) and getattr(module, "is_causal", False))


def recurrent_layer_indices(model: nn.Module) -> list[int]:
    """Cache indices (`layer_idx`) of the attention modules of `model` that decode with a state."""
    return sorted(
        module.layer_idx for module in model.modules() if is_recurrent(module) and hasattr(module, "layer_idx")
    )


def bind_state_layer(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook of converted attention modules: pass their `LaraStateLayer`, if any, to the attention function."""
    cache = kwargs.get("past_key_values")
    # encoder-decoder wrappers (BERT decoders, GPT-2 with cross-attention) keep the self-attention cache inside
    cache = getattr(cache, "self_attention_cache", cache)
    if not isinstance(cache, LaraCache) or not is_recurrent(module):
        return None
    layer = cache.state_layer(module.layer_idx)
    return None if layer is None else (args, {**kwargs, STATE_LAYER_KWARG: layer})


def provide_state_cache(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook of converted decoders: `use_cache=True` without a cache gets a `LaraCache` (eval mode)."""
    if kwargs.get("use_cache") is not True or kwargs.get("past_key_values") is not None or model.training:
        return None
    if not recurrent_layer_indices(model):
        return None
    return args, {**kwargs, "past_key_values": LaraCache(model)}


def register_hook(module: nn.Module, hook, **kwargs: Any) -> None:
    """Register a forward pre-hook once (re-conversion calls this again on the same modules)."""
    if hook not in module._forward_pre_hooks.values():
        module.register_forward_pre_hook(hook, with_kwargs=True, **kwargs)


def remove_hook(module: nn.Module, hook) -> None:
    """Remove a forward pre-hook registered by `register_hook`."""
    for key, registered in list(module._forward_pre_hooks.items()):
        if registered is hook:
            del module._forward_pre_hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)
