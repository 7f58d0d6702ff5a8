"""`softmax` is the exact reference: it must equal torch's SDPA with padding and causal masks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hf_lara.attention import build_attention
from hf_lara.attention.naive import naive_softmax_attention

from .utils import qkv


def _sdpa_reference(q, k, v, mask, causal):
    Nq, Nk = q.shape[2], k.shape[2]
    allowed = torch.ones(Nq, Nk, dtype=torch.bool).tril(Nk - Nq) if causal else torch.ones(Nq, Nk, dtype=torch.bool)
    allowed = allowed[None, None] & mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


@pytest.mark.parametrize("causal,num_queries", [(False, 31), (True, 31), (True, 4), (True, 1)])
def test_softmax_equals_sdpa_with_padding(causal, num_queries):
    attn = build_attention("softmax", num_heads=3, head_dim=16)
    q, k, v = qkv(2, 3, 31, 16)
    q = q[:, :, -num_queries:]
    mask = torch.ones(2, 31, dtype=torch.bool)
    mask[0, :6] = False  # left padding: real queries all see at least one real key
    mask[1, 25:] = False if not causal else True
    out = attn(q, k, v, padding_mask=mask, causal=causal)
    ref = _sdpa_reference(q, k, v, mask, causal)
    real_rows = mask[:, -num_queries:]
    torch.testing.assert_close(out.transpose(1, 2)[real_rows], ref.transpose(1, 2)[real_rows], atol=1e-12, rtol=0)
    torch.testing.assert_close(naive_softmax_attention(q, k, v, mask, causal), out, atol=1e-12, rtol=0)


def test_softmax_without_mask_and_scale():
    attn = build_attention("softmax", num_heads=2, head_dim=8)
    q, k, v = qkv(1, 2, 9, 8)
    torch.testing.assert_close(attn(q, k, v, scale=0.3), F.scaled_dot_product_attention(q, k, v, scale=0.3))
    torch.testing.assert_close(attn(q, k, v, causal=True), F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_rows_with_no_visible_key_are_zero_not_nan():
    attn = build_attention("softmax", num_heads=1, head_dim=4)
    q, k, v = qkv(1, 1, 5, 4)
    mask = torch.tensor([[False, False, True, True, True]])
    out = attn(q, k, v, padding_mask=mask, causal=True)
    assert torch.isfinite(out).all() and (out[:, :, :2] == 0).all()
