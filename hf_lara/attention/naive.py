"""Quadratic, obviously-correct twins of the fast paths. Ground truth for tests; never used on a linear path.

All functions take queries that are the last `Nq` of the `Nk` key positions (so `Nq == Nk` is a full pass) and a
`key_mask` `(B, Nk)` bool (True = real) or None. Rows that see no real key return zeros.
"""

from __future__ import annotations

import math

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
    sinks: int = 0,
) -> torch.Tensor:
    """Window hybrid written out: one softmax over `scale q.k` inside the window and `log phi(q).phi(k)` outside.

    `log_phi_q` `(B, H, Nq, S)` and `log_phi_k` `(B, H, Nk, S)` are *complete* log-features (on the scale of
    `exp(scale q.k)`), e.g. `log xi(x, w) - log S / 2` on both sides for `S` positive random features. With
    `sinks=G` the first `G` real keys (bidirectional: and the last `G`) are exact for every query too.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    exact = scale * q @ k.transpose(-1, -2)
    kernel = torch.logsumexp(log_phi_q[:, :, :, None, :] + log_phi_k[:, :, None, :, :], dim=-1)
    inside = window_mask(key_mask, q.shape[2], k.shape[2], causal, window, q.device)
    if sinks:
        rows = key_mask if key_mask is not None else torch.ones(1, k.shape[2], dtype=torch.bool, device=q.device)
        sink = torch.zeros_like(rows)
        for b, row in enumerate(rows):
            real = torch.nonzero(row).flatten().tolist()
            chosen = real[:sinks] + ([] if causal else real[-sinks:])
            sink[b, chosen] = True
        inside = inside | sink[:, None, None, :]
    visible = visibility_mask(key_mask, q.shape[2], k.shape[2], causal, q.device)
    return masked_softmax_average(torch.where(inside, exact, kernel), v, visible)


def gaussian_density(omega: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """`N(omega_c; mean_c', I)` for every pair, with its normalising constant: `(..., C, C')`."""
    D = omega.shape[-1]
    sq = ((omega[..., :, None, :] - mean[..., None, :, :]) ** 2).sum(-1)
    return (2 * math.pi) ** (-D / 2) * torch.exp(-0.5 * sq)


def xi(x: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """`exp(w.x - |x|^2 / 2)` for tilde-space `x` `(..., N, D)` and `omega` `(..., C, D)` -> `(..., N, C)`."""
    return torch.exp(x @ omega.transpose(-1, -2) - 0.5 * (x * x).sum(-1, keepdim=True))


def naive_bidirectional_lara(q, k, v, scale, num_landmarks, mis, alpha_coeff, noise=None):
    """LARA written out in probability space (no logs), one unpadded sequence batch `(b, H, N, D)`.

    Returns the normalised weights `(b, H, N, C)`, the proposal values `f` `(b, H, C, D)` and the output.
    """
    N = q.shape[2]
    q_t, k_t = q * scale**0.5, k * scale**0.5
    C = min(num_landmarks, N)
    bounds = [(c * N) // C for c in range(C + 1)]
    q_bar = torch.stack([q_t[:, :, bounds[c] : bounds[c + 1]].mean(2) for c in range(C)], dim=2)
    k_bar = torch.stack([k_t[:, :, bounds[c] : bounds[c + 1]].mean(2) for c in range(C)], dim=2)
    mu = q_bar + k_bar
    omega = mu if noise is None else mu + noise
    xi_k = xi(k_t, omega)  # (b, H, N, C)
    z = xi_k.sum(2)  # (b, H, C)
    f = (xi_k / z[:, :, None]).transpose(-1, -2) @ v
    # target p_n(w_c) = N(w_c; 0, I) xi(q_n, w_c) Z(w_c), up to a per-query constant
    base = gaussian_density(omega, torch.zeros_like(omega[..., :1, :]))[..., 0]  # (b, H, C)
    target = base[:, :, None] * xi(q_t, omega) * z[:, :, None]
    density = gaussian_density(omega, mu)  # (b, H, C, C'): N(w_c; mu_c', I)
    own = torch.diagonal(density, dim1=-2, dim2=-1)
    if mis == "opt":
        balance = own / density.sum(-1)
        logits = torch.einsum("bhcd,bhnd->bhnc", q_bar, q_t)
        t = torch.exp(logits) / torch.exp(logits).sum(2, keepdim=True)
        alpha = (balance[:, :, None] + alpha_coeff * (t - t.mean(-1, keepdim=True))).clamp_min(1e-8)
        w = alpha * target / own[:, :, None]
    else:
        w = target / density.mean(-1)[:, :, None]
    w_hat = w / w.sum(-1, keepdim=True)
    return w_hat, f, w_hat @ f


def eva_visible_sets(
    n: int, N: int, causal: bool, window: int, num_chunks: int, chunk: int, sinks: int = 0, local_windows: int = 2
):
    """For the query at position `n` of `N`: its exact keys and its summaries as `(tokens, sampled_from)` pairs.

    `sinks=G`: the first `G` positions (bidirectional: and the last `G`) are exact for every query that may see them
    and belong to no summary (nor to the tokens a summary's proposal is drawn from). Causal, `local_windows=K`: the
    exact keys are those of windows `w - K + 1 .. w` up to `n`, the summaries the chunks ending by their start.
    Causal, `window=2`, `chunk=1`, `K=2`, `N=6` (`■` exact, `s` one summary each)::

        ■ ⬚ ⬚ ⬚ ⬚ ⬚
        ■ ■ ⬚ ⬚ ⬚ ⬚
        ■ ■ ■ ⬚ ⬚ ⬚
        ■ ■ ■ ■ ⬚ ⬚
        s s ■ ■ ■ ⬚
        s s ■ ■ ■ ■
    """
    w = n // window
    sink = set(range(min(sinks, N)))
    if not causal:
        sink |= set(range(max(N - sinks, 0), N))
    if causal:
        lo = max(w - local_windows + 1, 0) * window  # the first position of the exact span
        exact = list(range(lo, n + 1)) + sorted(s for s in sink if s < lo)
        chunks = [list(range(c * chunk, (c + 1) * chunk)) for c in range(n // chunk) if (c + 1) * chunk <= lo]
        kept = [[m for m in tokens if m not in sink] for tokens in chunks]
        return exact, [(tokens, tokens) for tokens in kept]
    local = list(range(w * window, min(N, (w + 1) * window)))
    exact = local + sorted(s for s in sink if s not in local)
    # chunks of at least N / C tokens that either hold whole windows or lie inside one
    shortest = math.ceil(N / num_chunks)
    if shortest > min(window, N):
        length = window * math.ceil(N / (num_chunks * window))
    else:
        length = min(p for p in range(shortest, min(window, N) + 1) if min(window, N) % p == 0)
    chunks = [list(range(start, min(N, start + length))) for start in range(0, N, length)]
    # every token is either exact or in exactly one summary, sampled with its whole chunk's proposal (sinks aside)
    return exact, [([m for m in tokens if m not in exact], [m for m in tokens if m not in sink]) for tokens in chunks]


def naive_eva_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    window_size: int,
    num_chunks: int = 1,
    chunk_size: int = 1,
    key_proj: torch.nn.Linear | None = None,
    proposal_proj: torch.nn.Linear | None = None,
    sinks: int = 0,
    local_windows: int = 2,
) -> torch.Tensor:
    """Eval-mode EVA, one query at a time: softmax over [exact logits ; q~.kappa_T + log |T|] with values [v ; beta_T].

    `q` `(B, H, Nq, D)` are the last `Nq` of the `N` positions of `k`, `v` `(B, H, N, D)`; returns `(B, H, Nq, D)`.
    `sinks=G`: the first `G` keys (bidirectional: and the last `G`) are exact too; causal queries see the windows
    `w - local_windows + 1 .. w` exactly (`eva_visible_sets`).
    """
    B, H, Nq, D = q.shape
    N = k.shape[2]
    root = D**-0.25
    qt, kt = q * root, k * root

    def apply(layer, x):
        return x if layer is None else x @ layer.weight.T + layer.bias

    rows = []
    for i in range(Nq):
        n = N - Nq + i
        exact, summaries = eva_visible_sets(n, N, causal, window_size, num_chunks, chunk_size, sinks, local_windows)
        logits = [(qt[:, :, i] * kt[:, :, m]).sum(-1) for m in exact]
        values = [v[:, :, m] for m in exact]
        for tokens, sampled_from in summaries:
            if not tokens:
                continue
            omega = apply(proposal_proj, kt[:, :, sampled_from].mean(2))  # (B, H, D)
            keys = kt[:, :, tokens]
            log_xi = (keys * omega[:, :, None]).sum(-1) - 0.5 * (keys * keys).sum(-1)
            values.append((torch.softmax(log_xi, dim=-1)[..., None] * v[:, :, tokens]).sum(2))
            kappa = apply(key_proj, keys.mean(2))
            logits.append((qt[:, :, i] * kappa).sum(-1) + math.log(len(tokens)))
        probs = torch.softmax(torch.stack(logits, dim=-1), dim=-1)
        rows.append((probs[..., None] * torch.stack(values, dim=-2)).sum(-2))
    return torch.stack(rows, dim=2)
