"""The `hf_lara` attention and mask functions against Transformers' contract."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

from hf_lara.attention import build_attention
from hf_lara.integration import ATTENTION_KEY, ESTIMATOR_ATTR, lara_attention_forward, lara_padding_mask
from hf_lara.integration.compat import CACHE_KWARG

B, H, H_KV, D = 2, 4, 2, 8


class Layer(nn.Module):
    """Stands in for a model's attention module: `is_causal`, GQA groups, optionally an estimator."""

    def __init__(self, is_causal: bool, method: str | None = "softmax"):
        super().__init__()
        self.is_causal = is_causal
        self.num_key_value_groups = H // H_KV
        if method:
            setattr(self, ESTIMATOR_ATTR, build_attention(method, num_heads=H, head_dim=D))


def qkv(nq: int, nk: int, heads_kv: int = H_KV):
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, H, nq, D, generator=g), torch.randn(B, heads_kv, nk, D, generator=g), \
        torch.randn(B, heads_kv, nk, D, generator=g)  # fmt: skip


def reference(q, k, v, mask4d=None, causal=False, scale=None):
    k, v = k.repeat_interleave(H // k.shape[1], 1), v.repeat_interleave(H // v.shape[1], 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask4d, is_causal=causal, scale=scale).transpose(1, 2)


def test_registered_under_one_key():
    assert AttentionInterface().get_interface(ATTENTION_KEY, None) is lara_attention_forward
    assert AttentionMaskInterface()[ATTENTION_KEY] is lara_padding_mask


@pytest.mark.parametrize("method", ["softmax", None], ids=["estimator", "fallback"])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa_scaling_and_output_layout(causal, method):
    q, k, v = qkv(7, 7)
    out, weights = lara_attention_forward(Layer(causal, method), q, k, v, None, scaling=0.3)
    assert weights is None and out.shape == (B, 7, H, D)  # [B, T, H, D]
    torch.testing.assert_close(out, reference(q, k, v, causal=causal, scale=0.3))


@pytest.mark.parametrize("method", ["softmax", None], ids=["estimator", "fallback"])
def test_is_causal_kwarg_overrides_the_module(method):
    q, k, v = qkv(5, 5)
    out, _ = lara_attention_forward(Layer(True, method), q, k, v, None, is_causal=False)
    torch.testing.assert_close(out, reference(q, k, v, causal=False))


@pytest.mark.parametrize("method", ["softmax", None], ids=["estimator", "fallback"])
def test_decoding_queries_are_the_last_positions_with_left_padding(method):
    q, k, v = qkv(3, 8)
    padding = torch.ones(B, 8, dtype=torch.bool)
    padding[1, :2] = False  # left padding of row 1
    out, _ = lara_attention_forward(Layer(True, method), q, k, v, padding, scaling=D**-0.5)
    # query i sits at position 8 - 3 + i and sees real keys up to there
    visible = (torch.arange(8)[None, :] <= torch.arange(5, 8)[:, None])[None, None] & padding[:, None, None, :]
    torch.testing.assert_close(out, reference(q, k, v, mask4d=visible))


def test_fallback_masks_like_native_sdpa_on_right_padding():
    q, k, v = qkv(6, 6)
    padding = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    out, _ = lara_attention_forward(Layer(False, None), q, k, v, padding)
    torch.testing.assert_close(out, reference(q, k, v, mask4d=padding[:, None, None, :]))


def test_estimators_refuse_non_padding_masks():
    q, k, v = qkv(4, 4)
    with pytest.raises(NotImplementedError, match="2-D padding mask"):
        lara_attention_forward(Layer(False), q, k, v, torch.ones(B, 1, 4, 4, dtype=torch.bool))


def test_mask_function_hands_over_the_2d_padding_mask():
    config = transformers.LlamaConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=1)
    config._attn_implementation = ATTENTION_KEY
    embeds = torch.zeros(2, 5, 32)
    padding = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    causal = create_causal_mask(config, embeds, padding, **{CACHE_KWARG: None})
    bidirectional = create_bidirectional_mask(config, embeds, padding)
    for mask in (causal, bidirectional):
        assert mask.dtype == torch.bool and torch.equal(mask, padding.bool())
    assert create_causal_mask(config, embeds, None, **{CACHE_KWARG: None}) is None
    # keys past the user's mask (unwritten cache slots) are padding; a sliding cache keeps the tail
    short = lara_padding_mask(2, 1, 7, attention_mask=padding.bool())
    assert torch.equal(short, torch.cat([padding.bool(), torch.zeros(2, 2, dtype=torch.bool)], dim=1))
    assert torch.equal(lara_padding_mask(2, 1, 3, kv_offset=2, attention_mask=padding.bool()), padding[:, 2:].bool())
