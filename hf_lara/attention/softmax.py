"""`softmax`: exact attention, the reference every other estimator is measured against."""

from __future__ import annotations

import torch.nn.functional as F

from .base import AttentionEstimator, register_estimator
from .naive import visibility_mask


@register_estimator("softmax")
class SoftmaxAttention(AttentionEstimator):
    """Exact softmax attention through `torch.nn.functional.scaled_dot_product_attention`. No hyper-parameters.

    Quadratic in the sequence length (SDPA's fused CPU/GPU kernels keep memory linear in practice).

    >>> attn = SoftmaxAttention(num_heads=2, head_dim=8)
    """

    is_linear = False

    def attend(self, q, k, v, key_mask, causal, scale):
        Nq, Nk = q.shape[2], k.shape[2]
        if key_mask is None and (not causal or Nq == Nk):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal and Nq > 1, scale=scale)
        visible = visibility_mask(key_mask, Nq, Nk, causal, q.device)
        has_key = visible.any(-1, keepdim=True)
        # SDPA returns NaN for rows that see nothing (padded queries); let them see everything, then zero them
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible | ~has_key, scale=scale)
        return out * has_key
