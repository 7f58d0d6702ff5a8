"""Quadratic, obviously-correct twins of the fast paths. Ground truth for tests; never used on a linear path.

All functions take queries that are the last `Nq` of the `Nk` key positions (so `Nq == Nk` is a full pass) and a
`key_mask` `(B, Nk)` bool (True = real) or None. Rows that see no real key return zeros.
"""

from __future__ import annotations

import torch


def visibility_mask(
    key_mask: torch.Tensor | None, num_queries: int, num_keys: int, causal: bool, device: torch.device
) -> torch.Tensor:
    """Which keys each query may attend to, shape `(B or 1, 1, Nq, Nk)`.

    Causal with `Nq=2, Nk=4` (queries are positions 2 and 3), no padding::

        ■ ■ ■ ⬚
        ■ ■ ■ ■
    """
    visible = torch.ones(num_queries, num_keys, dtype=torch.bool, device=device)
    if causal:
        query_pos = torch.arange(num_keys - num_queries, num_keys, device=device)
        visible = query_pos[:, None] >= torch.arange(num_keys, device=device)[None, :]
    visible = visible[None, None]
    if key_mask is not None:
        visible = visible & key_mask[:, None, None, :]
    return visible


def masked_softmax(logits: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """`softmax(logits)` over the visible keys (last axis); rows with nothing visible are all zero.

    Args:
        logits (`torch.Tensor` of shape `(..., Nq, Nk)`)
        visible (`torch.Tensor` of a shape broadcastable to `logits`, bool)
    """
    has_key = visible.any(-1, keepdim=True)
    logits = logits.masked_fill(~visible, float("-inf")).masked_fill(~has_key, 0.0)
    return torch.softmax(logits, dim=-1) * has_key


def masked_softmax_average(logits: torch.Tensor, values: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """`masked_softmax(logits, visible) @ values`: `(B, H, Nq, Nk)` logits, `(B, H, Nk, D)` values."""
    return masked_softmax(logits, visible) @ values


def naive_softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Exact softmax attention written out: `softmax(scale * q k^T + mask) v`, shape `(B, H, Nq, D)`."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    visible = visibility_mask(key_mask, q.shape[2], k.shape[2], causal, q.device)
    return masked_softmax_average(scale * q @ k.transpose(-1, -2), v, visible)


def naive_feature_attention(
    log_phi_q: torch.Tensor,
    log_phi_k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """Kernel attention `sum_j (phi(q_i).phi(k_j)) v_j / sum_j phi(q_i).phi(k_j)` built as an explicit N x N matrix.

    The features are given as logs (`(B, H, N, S)`), so `log(phi(q_i).phi(k_j)) = logsumexp_s(lq_is + lk_js)` and
    the normalised row is a softmax over those logits: no overflow whatever the feature scale.
    """
    logits = torch.logsumexp(log_phi_q[:, :, :, None, :] + log_phi_k[:, :, None, :, :], dim=-1)
    visible = visibility_mask(key_mask, log_phi_q.shape[2], log_phi_k.shape[2], causal, v.device)
    return masked_softmax_average(logits, v, visible)
