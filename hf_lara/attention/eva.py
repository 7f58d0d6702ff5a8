r"""`eva`: efficient attention via control variates (Zheng et al., ICLR 2023), bidirectional and causal.

Notation: `x~ = x * scale**0.5` ("tilde space", so `scale * q.k = q~.k~`), `xi(x, w) = exp(w.x~ - |x~|^2 / 2)`.

**Estimator.** Softmax attention is `sum_m e^{q~_n.k~_m} v_m / sum_m e^{q~_n.k~_m}`. EVA treats the keys of a local
window exactly and every other key through a few *chunk summaries*. A summary of a token set `T` has

* a count `n_T` and a mean key `k_T = mean_{m in T} k~_m`;
* a chunk key `kappa_T = chunk_key_proj(k_T)` standing in for all of `T` in the logits;
* a proposal mean `mu_T = proposal_proj(k_T)` and a sample `w_T = mu_T + eps`, `eps ~ N(0, I)` in tilde space, one
  independent draw per (batch, head, chunk) in training mode, `w_T = mu_T` in eval mode;
* a value `beta_T = sum_{m in T} softmax_m(log xi(k_m, w_T)) v_m`, self-normalised importance sampling of the
  chunk's values: the per-chunk control-variate coefficient of the paper (query factor and proposal cancel).

With `l_nT = q~_n.kappa_T + log n_T` the output is one softmax over [exact local logits ; one logit per summary]:

    EVA(q_n) = [sum_{m in window(n)} e^{q~_n.k~_m} v_m + sum_T e^{l_nT} beta_T]
               / [sum_{m in window(n)} e^{q~_n.k~_m} + sum_T e^{l_nT}].

`e^{l_nT} = n_T e^{q~_n.kappa_T}`: the log-count makes a summary of `n` tokens weigh like `n` tokens (with identity
projections `e^{q~.k_T}` is, by Jensen, a lower bound of the mean of `e^{q~.k~_m}` over `T`). The official code omits
it, so a short chunk counts as much as a long one. The projections are `nn.Linear(D, D)` shared across heads and
start at the identity (a fresh conversion uses plain means); `adaptive=False` keeps them fixed at the identity.
The output is a convex combination of the values. Every token is counted exactly once (unlike the official code):

**Bidirectional** (`window_size` E, `num_chunks` C). Windows are blocks of E positions anchored at 0; a query
sees all keys of its block exactly. Chunks have length `P = E * ceil(N / (C * E))`, a multiple of E, so each window
lies in one chunk and there are at most C chunks. A query of window w in chunk c sees the full summary of every
chunk other than c plus one summary of `c` minus the tokens of `w` (its own count, mean and chunk key; it reuses
`w_c`, the sample of its whole chunk, so no extra features are computed). Empty summaries get logit `-inf`; if
`E >= N` there are none and EVA is exactly softmax. Window statistics of `beta` are kept with a per-window max
shift and merged over the *other* windows of the chunk with a `g x g` off-diagonal matrix (`g = P / E` windows per
chunk), never as "chunk total - window" (no cancellation). Cost `O(N (E + C) D + C g^2 D)`, memory
`O(N (E + C) + C g^2)`; the `g^2` terms (`N^2 / (C E^2)`) only matter for very few chunks on very long inputs.

**Causal** (`window_size` E, `chunk_size` P, `E % P == 0`). Windows are causal blocks of E positions (a query
sees the keys of its block at or before it); chunks are fixed blocks of P tokens. A query in block w sees exactly
the chunks that end at or before the block starts (`c < w E / P`), so nothing is counted twice and the output at
position t only depends on tokens `<= t` (prefix consistent; decoding over a KV cache equals the full pass).
Summaries are computed from keys and values only. The number of chunks grows as N / P, so the cost is
`O(N (E + N / P) D)`: quadratic with constant 1/P, like the paper's causal EVA (official code: LM runs use P = 8).
Queries run in blocks of whole windows against their windows and the summaries finished before the block's last
window (`causal_eva`), so memory stays `O(N D + block (E + N / P))`: no `(N, N / P)` tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .base import AttentionEstimator, check_int, register_estimator
from .linear import _normalise, _with_ones
from .random_features import positive_random_log_features
from .window import blocks as _blocks

# A finite floor for detached max shifts: exp(x - floor) stays well defined for empty sets.
_LOG_FLOOR = -1e30
#: target number of elements of one block's `(B, H, block, E + chunks)` logits on the causal path (64 MB in fp32):
#: few large products, which matter on shared CPUs where every op waits for its slowest thread
CAUSAL_BLOCK_ELEMENTS = 1 << 24
Map = Callable[[torch.Tensor], torch.Tensor]


def _log_count(count: torch.Tensor) -> torch.Tensor:
    """`log n`, with `-inf` for empty sets so that their logits get no weight."""
    return torch.where(count > 0, count.clamp_min(1).log(), float("-inf"))


def merged_value_summaries(log_w: torch.Tensor, v: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    """Self-normalised averages of `v` over unions of windows: `beta_r = sum_{m in U_r} softmax_m(log_w) v_m`.

    Each window keeps `z_w = sum_m exp(log_w_m - M_w)` and `u_w = sum_m exp(log_w_m - M_w) v_m` with its own
    (detached) max `M_w`; union `r` rescales them to `M_r = max_{w in U_r} M_w`, so its normaliser is >= 1 whenever
    the union holds a token. Unions without tokens return 0.

    Args:
        log_w (`torch.Tensor` of shape `(B, H, C, g, E)`): log importance weights, `-inf` for absent tokens.
        v (`torch.Tensor` of shape `(B, H, C, g, E, D)`): values.
        select (`torch.Tensor` of shape `(r, g)`, bool): `select[r, w]` = window `w` belongs to union `r`.

    Returns:
        `torch.Tensor` of shape `(B, H, C, r, D)`.
    """
    shift = log_w.detach().amax(dim=-1).clamp_min(_LOG_FLOOR)  # (B, H, C, g)
    weights = torch.exp(log_w - shift[..., None])
    z = weights.sum(dim=-1)  # (B, H, C, g)
    u = torch.einsum("bhcge,bhcged->bhcgd", weights, v)
    shift_r = shift[..., None, :].masked_fill(~select, float("-inf")).amax(dim=-1).clamp_min(_LOG_FLOOR)
    rescale = torch.exp((shift[..., None, :] - shift_r[..., None]).masked_fill(~select, float("-inf")))  # (.., r, g)
    num = rescale @ u  # (B, H, C, r, D)
    den = (rescale @ z[..., None]).clamp_min(torch.finfo(v.dtype).tiny)
    return num / den


def _sampled_log_weights(k: torch.Tensor, mu: torch.Tensor, sample: bool) -> torch.Tensor:
    """`log xi(k_m, w_c)` for `k` `(B, H, C, ..., D)` (tilde) and `mu` `(B, H, C, D)`; `w_c = mu_c (+ N(0, I))`."""
    omega = mu + torch.randn_like(mu) if sample else mu
    omega = omega.reshape(omega.shape[:3] + (1,) * (k.dim() - 4) + omega.shape[-1:])
    return positive_random_log_features(k, omega).squeeze(-1)


def bidirectional_eva(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window_size: int,
    num_chunks: int,
    key_map: Map,
    mu_map: Map,
    sample: bool,
) -> torch.Tensor:
    """Bidirectional EVA; every token is real (the estimator cuts padding away first).

    Args:
        q, k (`torch.Tensor` of shape `(B, H, N, D)`): queries and keys in tilde space.
        v (`torch.Tensor` of shape `(B, H, N, D)`): values.
        window_size, num_chunks (`int`): `E` and `C` of the module docstring.
        key_map, mu_map (`Callable`): chunk key and proposal mean maps, `(..., D) -> (..., D)`.
        sample (`bool`): draw `w_c = mu_c + N(0, I)` (training) instead of `w_c = mu_c`.

    Returns:
        `torch.Tensor` of shape `(B, H, N, D)`.
    """
    B, H, N, D = q.shape
    E = min(window_size, N)
    num_windows = -(-N // E)
    g = -(-N // (num_chunks * E))  # windows per chunk
    P = g * E
    C = -(-N // P)
    valid = (torch.arange(C * P, device=q.device) < N).reshape(C, g, E)
    kc, vc = _blocks(k, 0, C * P, E).reshape(B, H, C, g, E, D), _blocks(v, 0, C * P, E).reshape(B, H, C, g, E, D)

    # summaries r < g: the chunk without window r; summary g: the whole chunk
    select = torch.cat([~torch.eye(g, dtype=torch.bool, device=q.device), q.new_ones(1, g, dtype=torch.bool)])
    counts = select.to(q.dtype) @ valid.sum(-1).to(q.dtype).T  # (g + 1, C)
    sums = torch.einsum("rg,bhcgd->bhcrd", select.to(q.dtype), kc.sum(-2))
    means = sums / counts.T.clamp_min(1)[..., None]  # (B, H, C, g + 1, D)
    log_w = _sampled_log_weights(kc, mu_map(means[:, :, :, g]), sample).masked_fill(~valid, float("-inf"))
    betas = merged_value_summaries(log_w, vc, select)  # (B, H, C, g + 1, D)
    keys = key_map(means)

    qw = _blocks(q, 0, num_windows * E, E)
    kw, vw = kc.reshape(B, H, C * g, E, D)[:, :, :num_windows], vc.reshape(B, H, C * g, E, D)[:, :, :num_windows]
    local = (qw @ kw.transpose(-1, -2)).masked_fill(~valid.reshape(C * g, 1, E)[:num_windows], float("-inf"))
    own_chunk = torch.arange(num_windows, device=q.device)[:, None] // g == torch.arange(C, device=q.device)
    full = torch.einsum("bhwed,bhcd->bhwec", qw, keys[:, :, :, g]) + _log_count(counts[g])
    full = full.masked_fill(own_chunk[:, None, :], float("-inf"))  # (B, H, nW, E, C)
    rest_keys = keys[:, :, :, :g].reshape(B, H, C * g, D)[:, :, :num_windows]
    rest_count = counts[:g].T.reshape(C * g)[:num_windows]
    rest = torch.einsum("bhwed,bhwd->bhwe", qw, rest_keys)[..., None] + _log_count(rest_count)[:, None, None]

    probs = torch.softmax(torch.cat([local, full, rest], dim=-1), dim=-1)
    rest_betas = betas[:, :, :, :g].reshape(B, H, C * g, D)[:, :, :num_windows]
    out = probs[..., :E] @ vw + probs[..., E : E + C] @ betas[:, :, None, :, g]
    out = out + probs[..., -1:] * rest_betas[:, :, :, None]
    return out.reshape(B, H, num_windows * E, D)[:, :, :N]


def causal_summaries(
    k: torch.Tensor, v: torch.Tensor, num_chunks: int, chunk_size: int, key_map: Map, mu_map: Map, sample: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys `kappa_c` and values `beta_c` `(B, H, num_chunks, D)` of the first `num_chunks` chunks.

    Each summary depends on its own `P` keys and values only, so a chunk's summary never changes once complete.
    """
    B, H, _, D = k.shape
    kc = k[:, :, : num_chunks * chunk_size].reshape(B, H, num_chunks, 1, chunk_size, D)
    vc = v[:, :, : num_chunks * chunk_size].reshape(B, H, num_chunks, 1, chunk_size, D)
    means = kc.mean(dim=-2)[:, :, :, 0]  # (B, H, C, D)
    log_w = _sampled_log_weights(kc, mu_map(means), sample)
    betas = merged_value_summaries(log_w, vc, k.new_ones(1, 1, dtype=torch.bool))[:, :, :, 0]
    return key_map(means), betas


def causal_eva(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window_size: int,
    chunk_size: int,
    key_map: Map,
    mu_map: Map,
    sample: bool,
    scale: float,
    block_size: int | None = None,
) -> torch.Tensor:
    """Causal EVA; queries are positions `N - Nq .. N - 1` (`Nq < N` decodes over a cache), all tokens real.

    Queries go block by block (whole windows): each block attends its exact windows and the summaries of the chunks
    finished before its last window, under one softmax with a detached max shift. Nothing of size `(N, N / P)` is
    built, and nothing of size `(N, D)` but the output and the summaries' inputs: peak extra memory is
    `O(N D + block (E + N / P))`. The scale goes on the logits (blocks) and the summary keys, not on `q`, `k`.

    Args:
        q (`torch.Tensor` of shape `(B, H, Nq, D)`): raw queries.
        k (`torch.Tensor` of shape `(B, H, N, D)`): raw keys.
        v (`torch.Tensor` of shape `(B, H, N, D)`): values.
        window_size, chunk_size (`int`): `E` and `P` of the module docstring, `E % P == 0`.
        key_map, mu_map, sample: as in `bidirectional_eva`.
        scale (`float`): logit scale (`x~ = x * scale**0.5`).
        block_size (`int`, *optional*): queries per block, rounded to whole windows (default: about
            `CAUSAL_BLOCK_ELEMENTS / (B H (E + N / P))`).

    Returns:
        `torch.Tensor` of shape `(B, H, Nq, D)`.
    """
    B, H, Nq, D = q.shape
    N, BH = k.shape[2], B * H
    # a window at least as long as the sequence is one block: shrinking it to N changes nothing
    E = min(window_size, N)
    per_window = window_size // chunk_size  # chunks per window
    first, last = (N - Nq) // E, (N - 1) // E  # window blocks holding the queries
    num_blocks, front = last - first + 1, N - Nq - first * E
    L = num_blocks * E
    # chunks entirely before the last window; window w sees those with c < w E / P
    C = last * per_window
    if C:
        root = scale**0.5
        keys, betas = causal_summaries(k[:, :, : C * chunk_size] * root, v, C, chunk_size, key_map, mu_map, sample)
        keys_t = (keys * root).reshape(BH, C, D).transpose(-1, -2)  # (B H, D, C): raw q against kappa~
        betas = _with_ones(betas).reshape(BH, C, D + 1)  # a column of ones: numerator and normaliser at once
    q_rows = (F.pad(q, (0, 0, front, L - front - Nq)) if L != Nq else q).reshape(BH, L, D)
    k_rows = k[:, :, first * E :].reshape(BH, -1, D)
    v_rows = v[:, :, first * E :].reshape(BH, -1, D)
    # keys after the query inside its window get -inf (zero-padded keys past N only meet padded queries)
    causal = torch.ones(E, E, dtype=torch.bool, device=q.device).triu(1)
    step = max(1, (block_size or CAUSAL_BLOCK_ELEMENTS // (BH * (E + C))) // E)  # windows per block
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v) + ((keys_t,) if C else ()))
    out = None if grad else q.new_empty(BH, L, D)
    outs = []
    for a in range(0, num_blocks, step):
        b = min(num_blocks, a + step)
        rows = slice(a * E, b * E)
        qb = q_rows[:, rows].unflatten(1, (b - a, E))  # (B H, nb, E, D)
        kb, vb = (_padded_window(x, b - a, E) for x in (k_rows[:, rows], _with_ones(v_rows[:, rows])))
        local = (qb @ kb.transpose(-1, -2)).masked_fill_(causal, float("-inf")).flatten(1, 2)  # (B H, nb E, E)
        local = local * scale if grad else local.mul_(scale)
        top = local.detach().amax(dim=-1, keepdim=True)  # finite: a query sees itself
        seen = min(C, (first + b - 1) * per_window)  # chunks the block's last window sees
        if seen:
            # every window of the block sees the chunks before `common`; the few after it get a mask
            far, common = q_rows[:, rows] @ keys_t[..., :seen], (first + a) * per_window  # (B H, nb E, seen)
            if seen > common:
                windows = first + torch.arange(a, b, device=q.device)
                hidden = torch.arange(common, seen, device=q.device) >= windows[:, None] * per_window
                hidden = hidden[:, None].expand(-1, E, -1).reshape((b - a) * E, seen - common)
                if grad:
                    far = torch.cat([far[..., :common], far[..., common:].masked_fill(hidden, float("-inf"))], -1)
                else:
                    far[..., common:].masked_fill_(hidden, float("-inf"))
            # weights exp(q~.kappa~ + log P - top): shift the raw logits by `top - log P`
            top = torch.maximum(top, far.detach().amax(dim=-1, keepdim=True) + math.log(chunk_size))
            shift = top - math.log(chunk_size)
            far = torch.exp(far - shift) if grad else far.sub_(shift).exp_()
        local = torch.exp(local - top) if grad else local.sub_(top).exp_()
        num = (local.unflatten(1, (b - a, E)) @ vb).flatten(1, 2)  # (B H, nb E, D + 1)
        if seen:
            num = num + far @ betas[:, :seen] if grad else num.baddbmm_(far, betas[:, :seen])
        if grad:
            outs.append(_normalise(num))
        else:
            torch.div(num[..., :-1], num[..., -1:], out=out[:, rows])
    if grad:
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    return out.reshape(B, H, L, D)[:, :, front : front + Nq]


def _padded_window(part: torch.Tensor, num: int, window: int) -> torch.Tensor:
    """`(B H, n, F)` rows (`n <= num window`, the last block may be short) -> `(B H, num, window, F)`, zero-padded."""
    if part.shape[1] < num * window:
        part = F.pad(part, (0, 0, 0, num * window - part.shape[1]))
    return part.unflatten(1, (num, window))


def _identity_linear(dim: int) -> nn.Linear:
    layer = nn.Linear(dim, dim)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(dim))
        layer.bias.zero_()
    return layer


@register_estimator("eva")
class EVAAttention(AttentionEstimator):
    """EVA: exact local windows plus importance-sampled chunk summaries (see the module docstring for the maths).

    Args:
        num_heads (`int`): number of heads `H`.
        head_dim (`int`): head dimension `D`.
        window_size (`int`, *optional*, defaults to 64): local window `E` (non-overlapping blocks from position 0).
        num_chunks (`int`, *optional*, defaults to 64): at most this many chunk summaries (bidirectional).
        chunk_size (`int`, *optional*, defaults to 16): tokens per chunk summary (causal); must divide `window_size`.
        adaptive (`bool`, *optional*, defaults to `True`): learn the chunk key and proposal mean maps
            (`chunk_key_proj`, `proposal_proj`: `nn.Linear(D, D)` shared by the heads, initialised to the identity).

    Trained (with `adaptive=True`, the default): `chunk_key_proj` (the summaries' keys `kappa_T`, EVA's adaptive
    chunk keys) and `proposal_proj` (the proposal means `mu_T`), identity at init so that a fresh conversion uses
    plain means; both get gradients in both modes.

    Training draws one proposal sample per (batch, head, chunk) at every forward pass; eval uses the proposal mean,
    which makes the module deterministic.

    >>> attn = EVAAttention(num_heads=2, head_dim=16, window_size=32, num_chunks=16, chunk_size=8)
    """

    # no N x N tensor anywhere; the bidirectional cost is linear, the causal one O(N (E + N / P) D)
    is_linear = True

    def packs_padding(self, causal: bool) -> bool:
        return True

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        window_size: int = 64,
        num_chunks: int = 64,
        chunk_size: int = 16,
        adaptive: bool = True,
    ) -> None:
        super().__init__(num_heads, head_dim)
        self.window_size = check_int("window_size", window_size)
        self.num_chunks = check_int("num_chunks", num_chunks)
        self.chunk_size = check_int("chunk_size", chunk_size)
        if window_size % chunk_size:
            raise ValueError(
                f"`window_size` must be a multiple of `chunk_size` so that causal chunks tile the windows, got "
                f"window_size={window_size} and chunk_size={chunk_size}. Try "
                f"chunk_size={math.gcd(window_size, chunk_size)}."
            )
        if not isinstance(adaptive, bool):
            raise TypeError(f"`adaptive` must be True or False, got {adaptive!r}.")
        self.adaptive = adaptive
        self.chunk_key_proj = _identity_linear(head_dim) if self.adaptive else None
        self.proposal_proj = _identity_linear(head_dim) if self.adaptive else None

    @staticmethod
    def _map(layer: nn.Linear | None) -> Map:
        if layer is None:
            return lambda x: x
        return lambda x: F.linear(x, layer.weight.to(x.dtype), layer.bias.to(x.dtype))

    def attend_unpadded(self, q, k, v, causal, scale):
        root = scale**0.5
        maps = self._map(self.chunk_key_proj), self._map(self.proposal_proj), self.training
        if causal:
            return causal_eva(q, k, v, self.window_size, self.chunk_size, *maps, scale=scale)
        return bidirectional_eva(q * root, k * root, v, self.window_size, self.num_chunks, *maps)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, window_size={self.window_size}, num_chunks={self.num_chunks}, "
            f"chunk_size={self.chunk_size}, adaptive={self.adaptive}"
        )
