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


def window_mask(
    key_mask: torch.Tensor | None, num_queries: int, num_keys: int, causal: bool, window: int, device: torch.device
) -> torch.Tensor:
    """Which keys lie in each query's exact window, `(B or 1, 1, Nq, Nk)` (queries are the last `Nq` positions).

    Causal: the last `window` positions up to the query. Bidirectional: `[lo, lo + window)` with
    `lo = i - (window - 1) // 2`, moved inside the row's first..last real position. Causal, `window=2`, `Nq=Nk=4`::

        ■ ⬚ ⬚ ⬚
        ■ ■ ⬚ ⬚
        ⬚ ■ ■ ⬚
        ⬚ ⬚ ■ ■
    """
    query_pos = torch.arange(num_keys - num_queries, num_keys, device=device)[:, None]
    key_pos = torch.arange(num_keys, device=device)[None, :]
    if causal:
        inside = (key_pos <= query_pos) & (key_pos > query_pos - window)
        return inside[None, None]
    rows = []
    for row in key_mask if key_mask is not None else [torch.ones(num_keys, dtype=torch.bool, device=device)]:
        real = torch.nonzero(row).flatten().tolist() or [0]
        first, last = real[0], real[-1]
        lo = (query_pos - (window - 1) // 2).clamp(min=first).clamp(max=max(last - window + 1, first))
        rows.append((key_pos >= lo) & (key_pos < lo + window))
    return torch.stack(rows)[:, None]


def naive_windowed_feature_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_phi_q: torch.Tensor,
    log_phi_k: torch.Tensor,
    window: int,
    key_mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Window hybrid written out: one softmax over `scale q.k` inside the window and `log phi(q).phi(k)` outside.

    `log_phi_q` `(B, H, Nq, S)` and `log_phi_k` `(B, H, Nk, S)` are *complete* log-features (on the scale of
    `exp(scale q.k)`), e.g. `log xi(x, w) - log S / 2` on both sides for `S` positive random features.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    exact = scale * q @ k.transpose(-1, -2)
    kernel = torch.logsumexp(log_phi_q[:, :, :, None, :] + log_phi_k[:, :, None, :, :], dim=-1)
    inside = window_mask(key_mask, q.shape[2], k.shape[2], causal, window, q.device)
    visible = visibility_mask(key_mask, q.shape[2], k.shape[2], causal, q.device)
    return masked_softmax_average(torch.where(inside, exact, kernel), v, visible)
