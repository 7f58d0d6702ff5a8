"""Constant-memory decoding: `LaraCache`, a `DynamicCache` whose recurrent layers keep a `LinearState`, not keys.

Design
------
A causal kernel estimator (`rfa`, `kernel`, causal `lara`: `supports_recurrent_state = True`) is an RNN: all a new
query needs from the past is its `LinearState`. Causal `eva` also decodes from a state (`EVAState`: its exact span,
the open window and the `local_windows - 1` before it, and each finished chunk summary, computed once; it grows by
`2 D` numbers per chunk of `P` tokens, so a step costs `O((K E + N / P) D)`). `LaraCache` gives each such layer a `LaraStateLayer` and keeps an ordinary Transformers KV
layer (`DynamicLayer`, or the sliding one the config asks for) for every other layer: softmax layers of hybrid
models (`layers=[...]`), `ra`, bidirectional estimators.

One decoding step, for a converted attention module `m` with layer index `i`:

1. `bind_state_layer`, a forward pre-hook (`with_kwargs=True`) that hf_lara puts on every attention module of a
   converted model, finds the cache the module receives (`cache=`, `past_key_values=` before Transformers 5.24; see
   `compat.py`), refuses caches with preallocated slots (`check_cache`), and when `cache.layers[i]` is a
   `LaraStateLayer` adds it to the module's keyword arguments under `STATE_LAYER_KWARG`. Llama-, GPT-2-style modules
   hand their extra keyword arguments to the attention function, so no module state is involved and nothing of
   Transformers is patched (the attention function itself never sees the cache).
2. The module calls `cache.update(k, v, i)` as usual: a `LaraStateLayer` only counts the tokens and returns
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
With a window (`window_size = W`, `sink_tokens = G`) the state is a `WindowState`: the `LinearState` plus a buffer of
`2 W` tokens (`2 D + S + 1` numbers each) and the `G` sinks per (batch, head), still constant; a step appends its
token to that buffer in place and never writes a row that an earlier state sees (`window._Tail`), so a state kept
by the caller (`copy.deepcopy`, a branch) stays valid.

`generate()` creates a `LaraCache` on its own for converted decoders with at least one recurrent layer
(`LaraModelMixin.generate` passes one where Transformers would build its default `DynamicCache`: `wants_state_cache`);
a cache passed by the user, or `cache_implementation="dynamic"`, keeps the KV path; static caches raise
`NotImplementedError`. A forward call with `use_cache=True` and no cache also gets a `LaraCache`
(`provide_state_cache`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import CacheLayerMixin, DynamicLayer

from ..attention.eva import EVAState
from ..attention.linear import LinearState
from ..attention.window import WindowState
from .attention import ESTIMATOR_ATTR, STATE_LAYER_KWARG
from .compat import CACHE_KWARG, cache_from_kwargs

#: Attribute holding the `RemovableHandle` of the forward pre-hook hf_lara puts on a module.
HOOK_ATTR = "lara_cache_hook"


class LaraStateLayer(CacheLayerMixin):
    """Cache layer of a recurrent estimator: a constant-size `LinearState` and a count of the tokens seen.

    Attributes:
        state (`LinearState`, `WindowState` or `EVAState`, *optional*): the estimator's decoding state
            (`attention/recurrent.py`, `attention/eva.py`);
            None before any token.
        seen (`int`): tokens absorbed (padding included, as a KV cache counts them).
    """

    is_sliding = False
    is_croppable = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.state: LinearState | WindowState | EVAState | None = None
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
            self.state = self.state.to(device)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Keep batch rows `beam_idx` `(B',)` (beam search)."""
        if self.state is not None:
            self.state = self.state.index_select(beam_idx.to(self.state.device))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(torch.as_tensor(indices).reshape(-1).long())

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            rows = torch.arange(self.state.batch_size, device=self.state.device)
            self.reorder_cache(rows.repeat_interleave(repeats))


#: Cache layers converted models decode with: keys of the tokens seen so far (dynamic, sliding, quantized), or a state.
SUPPORTED_LAYERS = (DynamicLayer, LaraStateLayer)


class LaraCache(DynamicCache):
    """`DynamicCache` with a `LaraStateLayer` for each recurrent layer of a converted model, KV layers elsewhere.

    Args:
        model (`nn.Module`): a converted model (`LaraModelMixin`); its config shapes the KV layers.

    >>> cache = hf_lara.LaraCache(model)
    >>> out = model(input_ids=prompt, cache=cache, use_cache=True)  # prefill (`past_key_values=` before 5.24)
    >>> out = model(input_ids=out.logits[:, -1:].argmax(-1), cache=cache, use_cache=True)  # then one token at a time
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


def check_cache(cache) -> None:
    """Refuse caches whose layers preallocate keys (static, sliding static, ...): estimators cannot mask their slots.

    Converted layers take the keys of the tokens seen so far and nothing else: a dynamic KV layer, or the state of a
    `LaraStateLayer`. A static layer hands over `max_cache_len` keys whatever the position, which neither the
    estimators nor the softmax fallback's offsets expect.
    """
    # encoder-decoder wrappers (BERT decoders, GPT-2 with cross-attention) keep the self-attention cache inside
    cache = getattr(cache, "self_attention_cache", cache)
    bad = [type(layer).__name__ for layer in getattr(cache, "layers", ()) if not isinstance(layer, SUPPORTED_LAYERS)]
    if bad:
        raise NotImplementedError(
            f"hf_lara models decode with a dynamic cache, got a `{type(cache).__name__}` with `{bad[0]}` layers "
            "(e.g. `cache_implementation='static'`), whose preallocated key slots the estimators cannot mask. Use "
            "the default cache of `generate()` (a `LaraCache`), `cache_implementation='dynamic'` or a `DynamicCache`, "
            "or switch to exact attention with `model.set_attn_implementation('sdpa')`."
        )


def bind_state_layer(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook of attention modules: check the cache and pass their `LaraStateLayer`, if any, on."""
    cache = cache_from_kwargs(kwargs)
    if cache is None:
        return None
    check_cache(cache)
    cache = getattr(cache, "self_attention_cache", cache)
    if not isinstance(cache, LaraCache) or not is_recurrent(module):
        return None
    layer = cache.state_layer(module.layer_idx)
    return None if layer is None else (args, {**kwargs, STATE_LAYER_KWARG: layer})


def provide_state_cache(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook of converted decoders: `use_cache=True` without a cache gets a `LaraCache` (eval mode)."""
    if kwargs.get("use_cache") is not True or cache_from_kwargs(kwargs) is not None or model.training:
        return None
    if not recurrent_layer_indices(model):
        return None
    return args, {**kwargs, CACHE_KWARG: LaraCache(model)}


def wants_state_cache(model: nn.Module, args: tuple, kwargs: dict) -> bool:
    """Whether `model.generate(*args, **kwargs)` should decode with a new `LaraCache` rather than a KV cache.

    Only when generate would build its default dynamic cache: no cache passed, no `cache_implementation`, caching on,
    no assisted decoding (it crops the cache, which a state cannot undo), and at least one recurrent layer.
    """
    if cache_from_kwargs(kwargs) is not None or not recurrent_layer_indices(model):
        return False
    given = kwargs.get("generation_config", args[1] if len(args) > 1 else None)
    config = copy.deepcopy(given or model.generation_config)
    config.update(**{k: v for k, v in kwargs.items() if hasattr(config, k)})
    assisted = kwargs.get("assistant_model") is not None or getattr(config, "prompt_lookup_num_tokens", None)
    return (
        config.cache_implementation is None
        and config.use_cache is not False
        and not assisted
        and not getattr(config, "is_assistant", False)
    )


def add_hook(module: nn.Module, hook) -> None:
    """Register `hook` as a forward pre-hook of `module` once; its handle is kept on the module under `HOOK_ATTR`."""
    if getattr(module, HOOK_ATTR, None) is None:
        setattr(module, HOOK_ATTR, module.register_forward_pre_hook(hook, with_kwargs=True))
