"""The attention and mask functions hf_lara registers with Transformers under the key `hf_lara`.

Converted models set `config._attn_implementation = "hf_lara"`. Transformers then

1. builds the mask with `lara_padding_mask`, which hands over the 2-D `(B, kv_len)` padding mask (never an N x N one),
2. calls `lara_attention_forward` in every attention layer. Layers that carry an estimator (the attribute
   `lara_attention`) run it; layers left out by `layers=` keep exact softmax through Transformers' own SDPA function,
   with the 4-D mask they need rebuilt from the 2-D one for them alone.

Decoding with a `LaraCache` (`cache.py`, the default of `generate()` for converted decoders) runs recurrent estimators
on a constant-size state: the attention function receives the layer's `LaraStateLayer` under `STATE_LAYER_KWARG` and
only the new keys. Over Transformers' KV cache (any other cache, and non-recurrent estimators) each step attends the
new queries (the last `Nq` positions) over the whole cache: exact for every estimator, but O(n) per generated token. Estimators see
padding only through the 2-D mask: sequences packed without an `attention_mask` are not separated, and sliding
windows (Mistral) are ignored by converted layers (a warning says so once) but kept by the softmax ones.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    bidirectional_mask_function,
    causal_mask_function,
    sdpa_mask,
    sliding_window_causal_mask_function,
)
from transformers.utils import logging

logger = logging.get_logger(__name__)

#: Name of the attention implementation registered in `AttentionInterface` and `AttentionMaskInterface`.
ATTENTION_KEY = "hf_lara"
#: Attribute holding the estimator on each converted attention module; it prefixes every added weight name.
ESTIMATOR_ATTR = "lara_attention"
#: Keyword argument under which a converted module receives its `LaraStateLayer` (see `cache.py`).
STATE_LAYER_KWARG = "lara_state_layer"


def lara_padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """Mask function: the `(batch_size, kv_length)` bool padding mask of the keys, True = real token, or None.

    Transformers passes the user's 2-D mask over all tokens seen so far; keys cover positions
    `kv_offset ... kv_offset + kv_length - 1` of it (the tail when a sliding-window cache dropped old keys). Keys
    beyond the user's mask are cache slots not yet written, hence padding.
    """
    if attention_mask is None:
        return None
    # the user's mask may be shorter than the cache (generation without an updated mask); pad as Transformers does
    missing = kv_offset + kv_length - attention_mask.shape[-1]
    if missing > 0:
        attention_mask = nn.functional.pad(attention_mask, (0, missing), value=False)
    return attention_mask[:, kv_offset : kv_offset + kv_length].bool()


def repeat_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """`(B, H_kv, N, D)` -> `(B, num_heads, N, D)` for grouped-query attention, each KV head serving a group."""
    groups = num_heads // x.shape[1]
    if groups == 1:
        return x
    B, H_kv, N, D = x.shape
    return x[:, :, None].expand(B, H_kv, groups, N, D).reshape(B, H_kv * groups, N, D)


def lara_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention function of the `hf_lara` implementation (Transformers' `AttentionInterface` contract).

    Args:
        module (`nn.Module`): the calling attention layer; its `lara_attention` estimator is used when present.
        query (`torch.Tensor` of shape `(B, H, Nq, D)`): queries (RoPE already applied where the family uses it).
        key (`torch.Tensor` of shape `(B, H_kv, Nk, D)`): keys, cache included; `H_kv` divides `H` (GQA).
        value (`torch.Tensor` of shape `(B, H_kv, Nk, D)`): values.
        attention_mask (`torch.BoolTensor` of shape `(B, Nk)`, *optional*): padding mask from `lara_padding_mask`.
        scaling (`float`, *optional*): logit scale chosen by the caller (GPT-2 folds its per-layer factors in).
        dropout (`float`, *optional*, defaults to 0.0): attention dropout; only layers kept on softmax apply it.

    Returns:
        `(out, None)` with `out` of shape `(B, Nq, H, D)`.
    """
    causal = kwargs.pop("is_causal", None)
    causal = bool(getattr(module, "is_causal", False) if causal is None else causal)
    estimator = getattr(module, ESTIMATOR_ATTR, None)
    state_layer = kwargs.pop(STATE_LAYER_KWARG, None)
    if state_layer is not None:
        return recurrent_attention(estimator, state_layer, query, key, value, attention_mask, scaling)
    if estimator is None:
        return softmax_fallback(module, query, key, value, attention_mask, causal, scaling, dropout, **kwargs)
    check_mask(attention_mask, key)
    warn_ignored(module, dropout, key.shape[2], kwargs)
    num_heads = query.shape[1]
    key, value = repeat_kv(key, num_heads), repeat_kv(value, num_heads)
    out = estimator(query, key, value, padding_mask=attention_mask, causal=causal, scale=scaling)  # (B, H, Nq, D)
    return out.transpose(1, 2).contiguous(), None


def recurrent_attention(
    estimator: nn.Module,
    state_layer,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
) -> tuple[torch.Tensor, None]:
    """Causal attention of the new tokens given the state of the earlier ones, kept in `state_layer.state`.

    Args:
        estimator (`nn.Module`): a recurrent estimator (`supports_recurrent_state`).
        state_layer (`LaraStateLayer`): the layer's cache entry; its state is replaced by the one after the new tokens.
        query (`torch.Tensor` of shape `(B, H, n, D)`): the new queries.
        key, value (`torch.Tensor` of shape `(B, H_kv, n, D)`): the new keys and values only (the layer keeps none).
        attention_mask (`torch.BoolTensor` of shape `(B, Nk)`, *optional*): padding mask whose last `n` columns are
            the new tokens (`Nk >= n`: the mask may be sized for the KV layers of a hybrid model).
        scaling (`float`, *optional*): logit scale.

    Returns:
        `(out, None)` with `out` of shape `(B, n, H, D)`.
    """
    if not getattr(estimator, "supports_recurrent_state", False):
        raise RuntimeError(
            "This cache holds a recurrent state for a layer whose estimator has none; build a new cache."
        )
    n = key.shape[2]
    mask = None if attention_mask is None else attention_mask[..., -n:]
    check_mask(mask, key)
    if mask is not None and bool(mask.all()):
        mask = None
    num_heads = query.shape[1]
    key, value = repeat_kv(key, num_heads), repeat_kv(value, num_heads)
    with torch.autocast(device_type=query.device.type, enabled=False):
        out, state_layer.state = estimator.step(query, key, value, state_layer.state, padding_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def softmax_fallback(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    causal: bool,
    scaling: float | None,
    dropout: float,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Exact softmax for layers without an estimator, through Transformers' SDPA function and its own mask builder.

    The 4-D mask is built here, for these layers only. Queries are the last `Nq` of the `Nk` key positions, so
    cached decoding and left padding get the same mask as Transformers' native `sdpa` path.
    """
    if attention_mask is not None and attention_mask.dim() == 2:
        Nq, Nk = query.shape[2], key.shape[2]
        window = kwargs.get("sliding_window")
        if causal:
            mask_function = sliding_window_causal_mask_function(window) if window else causal_mask_function
        else:
            mask_function = bidirectional_mask_function
        attention_mask = sdpa_mask(
            batch_size=query.shape[0],
            q_length=Nq,
            kv_length=Nk,
            # causal queries are the last Nq positions (cached decoding); cross-attention has no offset
            q_offset=Nk - Nq if causal else 0,
            mask_function=mask_function,
            attention_mask=attention_mask,
            allow_is_causal_skip=causal and not window,
            allow_is_bidirectional_skip=not causal,
            device=query.device,
        )
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=causal, **kwargs
    )


def check_mask(attention_mask: torch.Tensor | None, key: torch.Tensor) -> None:
    """Estimators take a `(B, Nk)` padding mask; anything else (a custom 4-D mask, a static cache) is refused."""
    if attention_mask is None:
        return
    if attention_mask.dim() != 2 or attention_mask.shape[-1] != key.shape[2]:
        raise NotImplementedError(
            f"hf_lara estimators take a 2-D padding mask of shape (batch, {key.shape[2]}), got a mask of shape "
            f"{tuple(attention_mask.shape)}. Pass a 2-D `attention_mask` and use the default dynamic cache, or switch "
            "this model to exact attention with `model.set_attn_implementation('sdpa')`."
        )


def warn_ignored(module: nn.Module, dropout: float, kv_length: int, kwargs: dict) -> None:
    """Options the estimators accept but do not apply."""
    if dropout and module.training:
        logger.warning_once("hf_lara estimators do not apply attention dropout; `dropout` is ignored in their layers.")
    if kwargs.get("output_attentions"):
        logger.warning_once("hf_lara estimators do not return attention weights; `output_attentions` is ignored.")
    if kwargs.get("sliding_window") and kv_length > kwargs["sliding_window"]:
        logger.warning_once("hf_lara estimators attend to all previous tokens; `sliding_window` is ignored.")


def register_attention() -> None:
    """Register the attention and mask functions under `ATTENTION_KEY` (idempotent, global)."""
    AttentionInterface.register(ATTENTION_KEY, lara_attention_forward)
    AttentionMaskInterface.register(ATTENTION_KEY, lara_padding_mask)
