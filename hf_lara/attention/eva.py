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
sees all keys of its block exactly. The N tokens are cut into chunks of `P >= ceil(N / C)` tokens, so at most C
chunks hold a token, with P either a divisor of E (the smallest one `>= N / C`, when `N / C <= E`: every chunk lies
in one window) or a multiple of E (`E * ceil(N / (C E))`: every window lies in one chunk); `chunk_length`. Short
inputs thus get fine summaries (C = 64 on 512 tokens: 64 chunks of 8, not 8 of 64) at the same `O(N (E + C) D)`
cost. Chunks inside a window: a query sees the summary of every chunk outside its window. Windows inside a chunk
(`g = P / E` windows per chunk): a query of window w in chunk c sees the full summary of every chunk other than c
plus one summary of `c` minus the tokens of `w` (its own count, mean and chunk key; it reuses `w_c`, the sample of
its whole chunk, so no extra features are computed); window statistics of `beta` are kept with a per-window max
shift and merged over the *other* windows of the chunk with a `g x g` off-diagonal matrix, never as "chunk total -
window" (no cancellation). Empty summaries get logit `-inf`; if `E >= N` every token is exact and EVA is softmax.
Cost `O(N (E + C) D + C g^2 D)`, memory `O(N (E + C) + C g^2)`; the `g^2` terms (`N^2 / (C E^2)`) only matter for
very few chunks on very long inputs. Without autograd (`bidirectional_eva_inference`) windows and chunks are views
of the inputs and a few heads at a time run on reused buffers: one GEMM for the window logits, one against every
whole chunk key whose columns of the query's own window (a diagonal view) are cleared or, for `g > 1`, replaced by
the "own chunk minus own window" logit, `exp2_` in place and products into one output buffer laid out
`(B, N, H, D)`.

**Causal** (`window_size` E, `chunk_size` P, `E % P == 0`, `local_windows` K). Windows are blocks of E positions
from position 0; chunks are fixed blocks of P tokens. A query in window w sees exactly its *exact span*: the keys of
window w at or before it and every key of windows `w - K + 1 .. w - 1` (windows before 0 are empty), so between
`(K - 1) E + 1` and `K E` keys once the row is that long; and one summary per chunk that ends at or before the span
starts (`c < (w - K + 1) E / P`). With the default K = 2 every query past the first window sees at least its E
previous keys exactly, like a sliding window of E (a block-aligned window, K = 1, gives the first query of each window
a single exact key). Nothing is counted twice and the output at position t only depends on tokens `<= t` (prefix
consistent; decoding over a KV cache equals the full pass). Summaries are computed from keys and values only. The
number of chunks grows as N / P, so the cost is `O(N (K E + N / P) D)`: quadratic with constant 1/P, like the paper's
causal EVA (official code: LM runs use P = 8). Queries run in blocks of whole windows against their spans (`K E` keys
each, gathered once) and the summaries finished before the block's last span (`causal_eva`), so memory stays
`O(N (K E + D) + block N / P)`: no `(N, N / P)` tensor. Without autograd the exact part runs over all windows at once
and each block adds its summaries with one product whose logits are already shifted by the exact part's row max, one
`exp_` and one product with the values (`_causal_fast`).

**Sinks** (`sink_tokens` G; attention sinks, StreamingLLM, arXiv 2309.17453). The first G tokens (bidirectional:
and the last G, e.g. `[CLS]` and `[SEP]`; `window.sink_positions`) join the exact set of every query that may see
them: one `(N, G2)` logit block in the same softmax, with the sinks of a query's own window masked there (the window
already holds them). They are left out of every summary (counts, means, proposals and `beta`), so each key still
counts once and a window covering the sequence stays exact. Causal: a query sees sink `s` through the block when `s`
lies before its exact span; a chunk holding sinks counts only its other tokens (a chunk of sinks gets no weight).
Decoding keeps the G sink keys and values in the state.

**Causal decoding** (`EVAAttention.prefill` / `step`, `EVAState`): the tokens of the exact span (the open window and
the `K - 1` complete windows before it, fewer than `K E` tokens) plus every finished chunk summary. A summary is
computed once, when its window leaves the span, so a step costs `O((K E + N / P) D)` and the state grows by `2 D`
numbers per `P` tokens. With padding, windows and chunks start at each row's first real
token, in the full forward (which cuts padding away, `packs_padding`) and in the state alike, so decoding a
left-padded batch equals its full forward row by row.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import (
    LOG2E,
    AttentionEstimator,
    check_int,
    compute_dtype,
    gather_tokens,
    is_empty,
    records_grad,
    register_estimator,
    resolve_scale,
)
from .linear import _with_ones
from .random_features import positive_random_log_features
from .window import blocks as _blocks
from .window import sink_positions

# A finite floor for detached max shifts: exp(x - floor) stays well defined for empty sets.
_LOG_FLOOR = -1e30
#: the bidirectional inference path holds `(heads, N, E + C)` logits of at most this many elements
INFERENCE_ELEMENTS = 1 << 20
#: queries per block on the causal path (whole windows)
CAUSAL_BLOCK_ROWS = 1024
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


def _summary_sets(valid: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """For `valid` `(C, g, E)`: `select` `(g + 1, g)`, the windows of each summary of a chunk (`r < g`: all but
    window `r`; `r = g`: all), and the token counts `(g + 1, C)` of every summary."""
    g = valid.shape[1]
    select = torch.cat([~torch.eye(g, dtype=torch.bool, device=valid.device), valid.new_ones(1, g)])
    return select, select.to(dtype) @ valid.sum(-1).to(dtype).T


def _chunk_summaries(
    kc: torch.Tensor,
    vc: torch.Tensor,
    valid: torch.Tensor,
    key_map: Map,
    mu_map: Map,
    sample: bool,
    unit: float = 1.0,
    holes: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summaries of every chunk without each of its windows (`r < g`) and of the whole chunk (`r = g`).

    Args:
        kc (`torch.Tensor` of shape `(B, H, C, g, E, D)`): keys times `unit` in tilde space (`unit k~`), chunk
            by window.
        vc (`torch.Tensor` of shape `(B, H, C, g, E, D)`): values.
        valid (`torch.Tensor` of shape `(C, g, E)`, bool): summarised positions (False past `N`, where `kc` is 0).
        key_map, mu_map, sample: as in `bidirectional_eva`.
        unit (`float`, *optional*, defaults to 1): the factor on `kc`.
        holes (`torch.Tensor`, *optional*): the windows `(h,)` (indices into the `C g` windows) where `valid` is
            also False before `N` (sinks); their key sums skip those positions explicitly.

    Returns:
        Chunk keys `kappa~` and values `beta`, `(B, H, C, g + 1, D)`, and the token counts `(g + 1, C)`.
    """
    g = kc.shape[3]
    select, counts = _summary_sets(valid, kc.dtype)
    window_sums = kc.sum(-2)
    if holes is not None:
        flat, kept = window_sums.flatten(2, 3), valid.flatten(0, 1)[holes, :, None]
        exact = torch.where(kept, kc.flatten(2, 3)[:, :, holes], 0.0).sum(-2)  # (B, H, h, D)
        window_sums = flat.index_copy(2, holes, exact).view_as(window_sums)
    sums = torch.einsum("rg,bhcgd->bhcrd", select.to(kc.dtype), window_sums)
    means = sums / (counts.T.clamp_min(1)[..., None] * unit)  # (B, H, C, g + 1, D)
    mu = mu_map(means[:, :, :, g])
    omega = mu + torch.randn_like(mu) if sample else mu
    # log xi(k_m, w_c) = w_c.k~_m - |k~_m|^2 / 2; without autograd the squared norms need no (.., D) temporary
    # a batched matrix-vector product: `vecdot` runs it several times faster than `bmm` with one column
    dots = torch.linalg.vecdot(kc, omega[:, :, :, None, None])  # (B, H, C, g, E)
    if torch.is_grad_enabled():
        squares = kc.square().sum(-1)
    else:
        squares = torch.linalg.vector_norm(kc, dim=-1).square_()
    log_w = (dots / unit - squares * (0.5 / unit**2)).masked_fill(~valid, float("-inf"))
    betas = merged_value_summaries(log_w, vc, select)  # (B, H, C, g + 1, D)
    return key_map(means), betas, counts


def chunk_length(N: int, window_size: int, num_chunks: int) -> int:
    """Bidirectional chunk length `P` for `N` tokens: at least `ceil(N / C)`, and either a multiple of the window `E`
    (`E * ceil(N / (C E))`, when `N / C > E`) or a divisor of it (the smallest one `>= ceil(N / C)`), so that every
    window lies in one chunk or every chunk in one window."""
    E = min(window_size, N)
    shortest = -(-N // num_chunks)
    if shortest > E:
        return E * -(-N // (num_chunks * E))
    return next(p for p in range(shortest, E + 1) if E % p == 0)


@dataclass(frozen=True)
class _Bidirectional:
    """Geometry of bidirectional EVA on `N` tokens: windows of `E`, chunks of `P` (`chunk_length`), `C` chunks over
    `L = C P` positions (the first `N` real). A *cell* is the intersection of a window and a chunk, `U = min(E, P)`
    positions; a chunk holds `g = P / U` cells (`g > 1` only when chunks are longer than windows)."""

    N: int
    E: int
    P: int

    @classmethod
    def of(cls, N: int, window_size: int, num_chunks: int) -> _Bidirectional:
        return cls(N, min(window_size, N), chunk_length(N, window_size, num_chunks))

    @property
    def U(self) -> int:
        return min(self.E, self.P)

    @property
    def g(self) -> int:
        return self.P // self.U

    @property
    def L(self) -> int:
        block = max(self.E, self.P)
        return block * -(-self.N // block)

    @property
    def C(self) -> int:
        return self.L // self.P

    def valid(self, device: torch.device) -> torch.Tensor:
        """`(C, g, U)` bool: positions before `N`."""
        return (torch.arange(self.L, device=device) < self.N).reshape(self.C, self.g, self.U)

    def overlaps(self, device: torch.device) -> torch.Tensor:
        """`(L / E, C)` bool: window `w` and chunk `c` share positions (the chunk's summary is not used there)."""
        window = torch.arange(self.L // self.E, device=device)[:, None]
        chunk = torch.arange(self.C, device=device)
        return (chunk * self.P < (window + 1) * self.E) & (window * self.E < (chunk + 1) * self.P)

    def sinks(self, sinks: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """The `G2 <= 2G` sink positions (first and last `G` tokens, `window.sink_positions`), which of them each
        query attends through the sink block `(L, G2)` (not when the sink lies in the query's own window, which
        already holds it, nor when it is a duplicate), the summarised positions `(C, g, U)` (sinks left out) and
        the cells holding sinks."""
        pos, ok = sink_positions(None, 1, self.N, sinks, False, device)
        pos, ok = pos[0], ok[0]
        rows = torch.arange(self.L, device=device)
        seen = ok & (rows[:, None] // self.E != pos // self.E)
        summarised = self.valid(device).flatten()
        summarised[pos] = False
        return pos, seen, summarised.reshape(self.C, self.g, self.U), torch.unique(pos // self.U)


def bidirectional_eva(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window_size: int,
    num_chunks: int,
    key_map: Map,
    mu_map: Map,
    sample: bool,
    sinks: int = 0,
) -> torch.Tensor:
    """Bidirectional EVA; every token is real (the estimator cuts padding away first).

    Args:
        q, k (`torch.Tensor` of shape `(B, H, N, D)`): queries and keys in tilde space.
        v (`torch.Tensor` of shape `(B, H, N, D)`): values.
        window_size, num_chunks (`int`): `E` and `C` of the module docstring.
        key_map, mu_map (`Callable`): chunk key and proposal mean maps, `(..., D) -> (..., D)`.
        sample (`bool`): draw `w_c = mu_c + N(0, I)` (training) instead of `w_c = mu_c`.
        sinks (`int`, *optional*, defaults to 0): `G`; the first and last `G` tokens are exact for every query
            (one `(N, 2G)` logit block) and left out of the summaries.

    Returns:
        `torch.Tensor` of shape `(B, H, N, D)`.
    """
    B, H, N, D = q.shape
    geo = _Bidirectional.of(N, window_size, num_chunks)
    E, g, C, U, L = geo.E, geo.g, geo.C, geo.U, geo.L
    num_windows = -(-N // E)
    valid = geo.valid(q.device)
    summarised, holes = valid, None
    if sinks:
        sink_pos, sink_seen, summarised, holes = geo.sinks(sinks, q.device)
    kc, vc = _blocks(k, 0, L, U).reshape(B, H, C, g, U, D), _blocks(v, 0, L, U).reshape(B, H, C, g, U, D)
    keys, betas, counts = _chunk_summaries(kc, vc, summarised, key_map, mu_map, sample, holes=holes)

    qw = _blocks(q, 0, num_windows * E, E)
    kw, vw = (x.reshape(B, H, L // E, E, D)[:, :, :num_windows] for x in (kc, vc))
    local = (qw @ kw.transpose(-1, -2)).masked_fill(~valid.reshape(L // E, 1, E)[:num_windows], float("-inf"))
    full = torch.einsum("bhwed,bhcd->bhwec", qw, keys[:, :, :, g]) + _log_count(counts[g])
    full = full.masked_fill(geo.overlaps(q.device)[:num_windows, None, :], float("-inf"))  # (B, H, nW, E, C)
    parts = [local, full]
    if g > 1:  # the query's own chunk minus its window
        rest_keys = keys[:, :, :, :g].reshape(B, H, C * g, D)[:, :, :num_windows]
        rest_count = counts[:g].T.reshape(C * g)[:num_windows]
        parts.append(
            torch.einsum("bhwed,bhwd->bhwe", qw, rest_keys)[..., None] + _log_count(rest_count)[:, None, None]
        )
    if sinks:
        far_sinks = qw.flatten(2, 3) @ k[:, :, sink_pos].transpose(-1, -2)  # (B, H, nW E, G2)
        parts.append(far_sinks.masked_fill(~sink_seen[: num_windows * E], float("-inf")).unflatten(2, (-1, E)))

    probs = torch.softmax(torch.cat(parts, dim=-1), dim=-1)
    out = probs[..., :E] @ vw + probs[..., E : E + C] @ betas[:, :, None, :, g]
    if g > 1:
        rest_betas = betas[:, :, :, :g].reshape(B, H, C * g, D)[:, :, :num_windows]
        out = out + probs[..., E + C, None] * rest_betas[:, :, :, None]
    if sinks:
        out = out + probs[..., E + C + (g > 1) :] @ v[:, :, None, sink_pos]
    return out.reshape(B, H, num_windows * E, D)[:, :, :N]


def _padded_to(x: torch.Tensor, length: int) -> torch.Tensor:
    """`x` `(B, H, N, D)` itself when `N == length`, else a copy zero-padded to `length` tokens."""
    return x if x.shape[2] == length else F.pad(x, (0, 0, 0, length - x.shape[2]))


def bidirectional_eva_inference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window_size: int,
    num_chunks: int,
    key_map: Map,
    mu_map: Map,
    sample: bool,
    scale: float,
    sinks: int = 0,
) -> torch.Tensor:
    """`bidirectional_eva` without autograd, a few heads at a time, on raw (not tilde) `q`, `k`.

    Windows and chunks are views of the inputs (zero-padded copies only when `P` does not divide `N`). Per head
    group: the summaries of `_chunk_summaries`, then in base 2 (`exp2_`, logits times `log2 e`) one GEMM for the
    window logits `(C g, E, E)` and one for the logits against every whole chunk `(C P, C)`; the own-chunk column
    (a diagonal view) is overwritten by the logit of the own chunk minus the query's window, taken out after the
    exponential and added back with that summary's value. Outputs go through `bmm` / `baddbmm_` into one reused
    buffer and are divided into a `(B, N, H, D)` tensor, returned as its `(B, H, N, D)` view.

    Args:
        q, k, v (`torch.Tensor` of shape `(B, H, N, D)`): raw queries, keys and values (all tokens real).
        window_size, num_chunks, key_map, mu_map, sample, sinks: as in `bidirectional_eva` (sinks: one more
            `(heads, C P, 2G)` logit block, in the shared row max).
        scale (`float`): logit scale (`x~ = x * scale**0.5`).

    Returns:
        `torch.Tensor` of shape `(B, H, N, D)`.
    """
    B, H, N, D = q.shape
    geo = _Bidirectional.of(N, window_size, num_chunks)
    E, g, C, U, L = geo.E, geo.g, geo.C, geo.U, geo.L
    W = L // E  # windows, the last ones possibly past N
    valid = summarised = geo.valid(q.device)
    holes = None
    if sinks:
        sink_pos, sink_seen, summarised, holes = geo.sinks(sinks, q.device)
    root = scale**0.5
    q, k, v = _padded_to(q, L), _padded_to(k, L), _padded_to(v, L)
    group = max(1, min(H, INFERENCE_ELEMENTS // (L * (E + C))))
    local_buf, chunk_buf = q.new_empty(group * L * E), q.new_empty(group * L * C)
    ks_buf, acc_buf = q.new_empty(group * L * D), q.new_empty(group * L * D)
    unit = root * LOG2E
    log2_counts = _log_count(_summary_sets(summarised, q.dtype)[1]) * LOG2E  # (g + 1, C)
    tail = valid.reshape(W, 1, E)[N // E :]  # windows holding positions past N
    out = q.new_empty(B, N, H, D)
    for b in range(B):
        for h0 in range(0, H, group):
            h1 = min(H, h0 + group)
            n = h1 - h0
            # k2 = scale log2(e) k = unit k~: base-2 window logits straight from raw queries
            k2 = torch.mul(k[b, h0:h1], unit * root, out=ks_buf[: n * L * D].view(n, L, D))
            v_g = v[b, h0:h1]
            keys, betas, _ = _chunk_summaries(
                k2.view(1, n, C, g, U, D),
                v_g.reshape(1, n, C, g, U, D),
                summarised,
                key_map,
                mu_map,
                sample,
                unit,
                holes,
            )
            keys = keys[0] * unit  # (n, C, g + 1, D): q . keys = log2(e) q~ . kappa~
            betas = betas[0]
            q_g = q[b, h0:h1]
            # window logits; keys past N (last window only) are masked
            local = torch.bmm(
                q_g.reshape(n * W, E, D),
                k2.view(n * W, E, D).transpose(1, 2),
                out=local_buf[: n * L * E].view(n * W, E, E),
            ).view(n, W, E, E)
            if tail.shape[0]:
                local[:, N // E :].masked_fill_(~tail, float("-inf"))
            # logits against every whole chunk; the chunks overlapping the query's window are cleared below
            chunk = torch.baddbmm(
                log2_counts[g].expand(n, 1, C),
                q_g,
                keys[:, :, g].transpose(1, 2),
                out=chunk_buf[: n * L * C].view(n, L, C),
            )
            if g > 1:
                # a chunk holds g windows: the own column becomes "own chunk minus own window" (a diagonal view)
                rest = torch.linalg.vecdot(q_g.view(n, C, g, E, D), keys[:, :, :g, None])  # (n, C, g, E)
                rest.add_(log2_counts[:g].T[:, :, None])
                own = torch.diagonal(chunk.view(n, C, geo.P, C), dim1=1, dim2=3)  # (n, P, C): row c P + p, column c
                own.copy_(rest.view(n, C, geo.P).transpose(1, 2))
            else:
                # a window holds C / W chunks: they are exact there (a diagonal view of the blocks)
                torch.diagonal(chunk.view(n, W, E, W, C // W), dim1=1, dim2=3).fill_(float("-inf"))
            top = torch.maximum(local.amax(dim=-1).view(n, L), chunk.amax(dim=-1))[..., None]  # (n, L, 1)
            if sinks:
                far_sinks = torch.bmm(q_g, k2[:, sink_pos].transpose(1, 2)).masked_fill_(~sink_seen, -math.inf)
                top = torch.maximum(top, far_sinks.amax(dim=-1, keepdim=True))
            local.sub_(top.view(n, W, E, 1)).exp2_()
            chunk.sub_(top).exp2_()
            den = local.sum(dim=-1).view(n, L).add_(chunk.sum(dim=-1))
            if g > 1:
                p_own = own.transpose(1, 2).reshape(n, C, g, E, 1).clone()  # kept before the column is cleared
                own.zero_()
            acc = torch.bmm(
                local.view(n * W, E, E),
                v_g.reshape(n * W, E, D),
                out=acc_buf[: n * L * D].view(n * W, E, D),
            ).view(n, L, D)
            acc.baddbmm_(chunk, betas[:, :, g])
            if g > 1:
                acc.view(n, C, g, E, D).addcmul_(p_own, betas[:, :, :g, None])
            if sinks:
                far_sinks.sub_(top).exp2_()
                den.add_(far_sinks.sum(dim=-1))
                acc.baddbmm_(far_sinks, v[b, h0:h1, sink_pos])
            # head by head: one strided write of all `n` heads at once runs several times slower
            for i in range(n):
                torch.div(acc[i, :N], den[i, :N, None], out=out[b, :, h0 + i])
    return out.transpose(1, 2)


def causal_summaries(
    k: torch.Tensor,
    v: torch.Tensor,
    chunk_size: int,
    key_map: Map,
    mu_map: Map,
    sample: bool,
    root: float,
    skip: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys `kappa~_c` (tilde space) and values `beta_c`, `(B, H, C, D)`, of the `C = N // P` complete chunks.

    Args:
        k, v (`torch.Tensor` of shape `(B, H, N, D)`): raw keys and values (a partial last chunk is ignored).
        chunk_size (`int`): `P`.
        key_map, mu_map, sample: as in `bidirectional_eva`.
        root (`float`): `scale ** 0.5`, the tilde factor.
        skip (`int`, *optional*, defaults to 0): the first `skip` tokens (sinks) belong to no summary; a chunk of
            sinks only gets a zero key and value (`_log_counts` gives it no weight).

    Each summary depends on its own `P` keys and values only, so a chunk's summary never changes once complete.
    """
    B, H, N, D = k.shape
    C = N // chunk_size
    kc = k[:, :, : C * chunk_size].reshape(B, H, C, 1, chunk_size, D) * root
    vc = v[:, :, : C * chunk_size].reshape(B, H, C, 1, chunk_size, D)
    means = kc.mean(dim=-2)[:, :, :, 0]  # (B, H, C, D)
    few = min(C, -(-skip // chunk_size))  # chunks holding sinks
    if few:
        kept = (torch.arange(few * chunk_size, device=k.device) >= skip).reshape(few, 1, chunk_size)
        head = torch.where(kept[..., None], kc[:, :, :few], 0.0).sum(dim=-2)[:, :, :, 0]
        means = torch.cat([head / kept.sum(-1).clamp_min(1), means[:, :, few:]], dim=2)
    log_w = _sampled_log_weights(kc, mu_map(means), sample)
    if few:
        log_w = torch.cat([log_w[:, :, :few].masked_fill(~kept, float("-inf")), log_w[:, :, few:]], dim=2)
    betas = merged_value_summaries(log_w, vc, k.new_ones(1, 1, dtype=torch.bool))[:, :, :, 0]
    return key_map(means), betas


@dataclass(frozen=True)
class _Causal:
    """Geometry of one causal call: queries are positions `N - Nq .. N - 1` of keys starting at a window boundary.

    Windows are counted from position 0 of `k`; a query of window `w` sees exactly the keys of windows
    `w - K + 1 .. w` at or before it (`K = local`; windows before position 0 hold no key). Summary `j` of `keys` is
    seen by every query when `j < prior`, else it is chunk `j - prior` of `k` and is seen by the queries of windows
    `w` with `j - prior < (w - K + 1) P_w` (`P_w = E / P` chunks per window).
    """

    window: int  # E (shrunk to N when the window holds every key)
    per_window: int  # E / P for the full window
    chunk_size: int  # P
    prior: int  # summaries of chunks before position 0 (decoding state)
    scale: float
    sinks: int = 0  # G: global positions 0 .. G - 1 are exact for the later windows and in no summary
    local: int = 1  # K: windows seen exactly, the query's own and the K - 1 before it

    def seen(self, window: int) -> int:
        """Summaries seen by the queries of `window` (0 for windows whose exact span starts before position 0)."""
        return max(self.prior + (window - self.local + 1) * self.per_window, 0)


def _log_counts(geo: _Causal, num: int, like: torch.Tensor) -> torch.Tensor | float:
    """`log n_j` of the first `num` summaries: `log P`, or with sinks a `(num,)` tensor whose first chunks count
    only their tokens past the sinks (`-inf` for a chunk of sinks only)."""
    P = geo.chunk_size
    if not geo.sinks:
        return math.log(P)
    start = torch.arange(num, device=like.device, dtype=like.dtype) * P
    return _log_count((start + P - torch.maximum(start, start.new_tensor(geo.sinks))).clamp(0, P))


def _hidden_sinks(windows: torch.Tensor, geo: _Causal, num: int) -> torch.Tensor:
    """`(..., num)` bool: which of the sinks `0 .. num - 1` queries of windows `windows` `(..., 1)` (indices past
    position 0 of `k`) do not attend through the sink block: those in their exact span or later (the span holds
    what they see)."""
    full_window = geo.per_window * geo.chunk_size
    sink_window = torch.arange(num, device=windows.device) // full_window
    return sink_window > geo.prior // geo.per_window + windows - geo.local


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
    sinks: int = 0,
    local_windows: int = 1,
) -> torch.Tensor:
    """Causal EVA; queries are positions `N - Nq .. N - 1` (`Nq < N` decodes over a cache), all tokens real.

    Args:
        q (`torch.Tensor` of shape `(B, H, Nq, D)`): raw queries.
        k (`torch.Tensor` of shape `(B, H, N, D)`): raw keys.
        v (`torch.Tensor` of shape `(B, H, N, D)`): values.
        window_size, chunk_size (`int`): `E` and `P` of the module docstring, `E % P == 0`.
        key_map, mu_map, sample: as in `bidirectional_eva`.
        scale (`float`): logit scale (`x~ = x * scale**0.5`).
        block_size (`int`, *optional*): queries per block, rounded to whole windows (default `CAUSAL_BLOCK_ROWS`).
        sinks (`int`, *optional*, defaults to 0): `G`; keys `0 .. G - 1` are exact for the queries whose exact span
            starts after them (one `(Nq, G)` logit block) and left out of the summaries.
        local_windows (`int`, *optional*, defaults to 1): `K`; a query sees the keys of its own window and of the
            `K - 1` windows before it exactly, and the summaries of the chunks before them.

    Returns:
        `torch.Tensor` of shape `(B, H, Nq, D)`.
    """
    N = k.shape[2]
    E = min(window_size, N)
    per_window = window_size // chunk_size
    # chunks entirely before the last window's exact span: the only ones any query sees
    end = max((N - 1) // E - local_windows + 1, 0) * per_window * chunk_size
    root = scale**0.5
    keys, betas = causal_summaries(k[:, :, :end], v[:, :, :end], chunk_size, key_map, mu_map, sample, root, sinks)
    geo = _Causal(E, per_window, chunk_size, 0, scale, sinks, local_windows)
    sink_kv = (k[:, :, :sinks], v[:, :, :sinks]) if sinks else None
    return attend_causal(q, k, v, keys, betas, geo, block_size, sink_kv)


def attend_causal(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keys: torch.Tensor,
    betas: torch.Tensor,
    geo: _Causal,
    block_size: int | None = None,
    sinks: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Causal EVA given the summaries `keys` (`kappa~`) and `betas` `(B, H, C, D)` (see `_Causal`).

    Few queries (decoding) attend directly; longer inputs go block by block. Without autograd the blocks run in
    place on reused buffers and shift the summary logits by the row max of the exact logits (folded into the product);
    should that overflow (a summary logit above every exact one by ~88 in fp32), the call reruns with exact max shifts.
    `sinks`: raw keys and values `(B, H, G, D)` of global positions `0 .. G - 1` when `geo.sinks = G`.
    """
    if q.shape[2] < geo.window:
        return _causal_direct(q, k, v, keys, betas, geo, sinks)
    tracked = (q, k, v, keys, betas, *(sinks or ()))
    if records_grad(*tracked):
        return _causal_blocked(q, k, v, keys, betas, geo, block_size, sinks)
    out = _causal_fast(q, k, v, keys, betas, geo, block_size, sinks)
    # one reduction: an overflow anywhere makes the sum inf or nan
    if not bool(torch.isfinite(out.sum())):
        out = _causal_blocked(q, k, v, keys, betas, geo, block_size, sinks)
    return out


def _visible_chunks(windows: torch.Tensor, num: int, geo: _Causal) -> torch.Tensor:
    """`(..., num)` bool: which of the first `num` summaries the queries of `windows` `(..., 1)` see."""
    return torch.arange(num, device=windows.device) < geo.prior + (windows - geo.local + 1) * geo.per_window


def _causal_direct(q, k, v, keys, betas, geo: _Causal, sinks=None) -> torch.Tensor:
    """Every query against its exact span, its summaries and the sinks at once: `O(Nq ((K + 1) E + C + G) D)`.

    The three logit blocks share one softmax without being concatenated (no copy of the summaries per step)."""
    Nq, N, E = q.shape[2], k.shape[2], geo.window
    start = max((N - Nq) // E - geo.local + 1, 0) * E
    query_pos = torch.arange(N - Nq, N, device=q.device)[:, None]
    key_pos = torch.arange(start, N, device=q.device)
    local_ok = (key_pos // E > query_pos // E - geo.local) & (key_pos <= query_pos)  # (Nq, N - start)
    qs = q * geo.scale
    blocks = [((qs @ k[:, :, start:].transpose(-1, -2)).masked_fill(~local_ok, float("-inf")), v[:, :, start:])]
    num = min(keys.shape[2], geo.seen((N - 1) // E))
    if num:
        far = qs @ keys[:, :, :num].transpose(-1, -2) / geo.scale**0.5 + _log_counts(geo, num, q)
        blocks.append((far.masked_fill(~_visible_chunks(query_pos // E, num, geo), float("-inf")), betas[:, :, :num]))
    if sinks is not None:
        hidden = _hidden_sinks(query_pos // E, geo, sinks[0].shape[2])
        blocks.append(((qs @ sinks[0].transpose(-1, -2)).masked_fill(hidden, float("-inf")), sinks[1]))
    # every query sees at least itself, so the shared max is finite
    shift = torch.stack([logits.amax(dim=-1) for logits, _ in blocks]).amax(dim=0)[..., None]
    weights = [(logits - shift).exp() for logits, _ in blocks]
    total = sum(w.sum(dim=-1, keepdim=True) for w in weights)
    return sum(w @ values for w, (_, values) in zip(weights, blocks, strict=True)) / total


def _causal_blocked(q, k, v, keys, betas, geo: _Causal, block_size: int | None, sinks=None) -> torch.Tensor:
    """Queries in blocks of whole windows against their exact spans (`K E` keys), the summaries finished before the
    block's last span (the few after the block's first span get a mask) and the sinks, under one softmax. Nothing of
    size `(N, C)` is built: memory `O(N (K E + D + G) + block C)`."""
    B, H, Nq, D = q.shape
    N, BH, E = k.shape[2], B * H, geo.window
    first, last = (N - Nq) // E, (N - 1) // E
    num_windows = last - first + 1
    q_rows, front = _causal_rows(q, N, E)
    k_rows, v_rows = (_spans(x, first, num_windows, E, geo.local) for x in (k, v))
    span = k_rows.shape[2]  # K E
    unseen = _unseen_in_span(first, num_windows, E, geo.local, q.device)
    C = min(keys.shape[2], geo.seen(last))
    keys, betas = keys[:, :, :C].reshape(BH, C, D) / geo.scale**0.5, betas[:, :, :C].reshape(BH, C, D)
    if sinks is not None:
        sink_keys, sink_values = (t.reshape(BH, -1, D) for t in sinks)
    step = max(1, min(num_windows, (block_size or CAUSAL_BLOCK_ROWS) // E))  # windows per block
    outs = []
    for a in range(0, num_windows, step):
        b = min(num_windows, a + step)
        seen = min(C, geo.seen(first + b - 1))
        qs = q_rows[:, a * E : b * E] * geo.scale
        logits = (qs.unflatten(1, (b - a, E)) @ k_rows[:, a:b].transpose(-1, -2)).masked_fill(unseen[a:b], -math.inf)
        windows = (first + torch.arange(a, b, device=q.device))[:, None, None]  # (nb, 1, 1)
        if seen:
            far = (qs @ keys[:, :seen].transpose(1, 2) + _log_counts(geo, seen, q)).unflatten(1, (b - a, E))
            far = far.masked_fill(~_visible_chunks(windows, seen, geo), -math.inf)
            logits = torch.cat([logits, far], dim=-1)
        if sinks is not None:
            far_sinks = (qs @ sink_keys.transpose(1, 2)).unflatten(1, (b - a, E))
            logits = torch.cat(
                [logits, far_sinks.masked_fill(_hidden_sinks(windows, geo, sink_keys.shape[1]), -math.inf)], dim=-1
            )
        probs = torch.softmax(logits, dim=-1)  # (BH, nb, E, K E + seen + G)
        part = probs[..., :span] @ v_rows[:, a:b]
        if seen:
            part = part + probs[..., span : span + seen] @ betas[:, None, :seen]
        if sinks is not None:
            part = part + probs[..., span + seen :] @ sink_values[:, None]
        outs.append(part.flatten(1, 2))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    return out.reshape(B, H, num_windows * E, D)[:, :, front : front + Nq]


def _unseen_in_span(first: int, num_windows: int, E: int, local: int, device: torch.device) -> torch.Tensor:
    """`(num_windows, E, K E)` bool: the keys of each query's exact span (windows `w - K + 1 .. w` of window
    `w = first + index`) that it does not see: those after it and those before position 0."""
    key = torch.arange(local * E, device=device)
    after = key > torch.arange((local - 1) * E, local * E, device=device)[:, None]  # (E, K E)
    start = (torch.arange(first - local + 1, first - local + 1 + num_windows, device=device) * E)[:, None, None]
    return after | (start + key < 0)


def _causal_rows(q: torch.Tensor, N: int, E: int, first: int | None = None) -> tuple[torch.Tensor, int]:
    """Queries (positions `N - Nq .. N - 1`) padded with zero rows to windows `first .. (N - 1) // E` (default: the
    first window holding a query), `(B H, L, D)`, and `front`, the padded rows before the first query."""
    B, H, Nq, D = q.shape
    first = (N - Nq) // E if first is None else first
    L, front = ((N - 1) // E - first + 1) * E, N - Nq - first * E
    return (F.pad(q, (0, 0, front, L - front - Nq)) if L != Nq else q).reshape(B * H, L, D), front


def _windows(x: torch.Tensor, first: int, num: int, window: int) -> torch.Tensor:
    """`(B, H, N, F)` -> `(B H num, window, F)`: windows `first .. first + num - 1` of `x`, zero-padded past `N` (a
    view when `first = 0` and the windows tile `x`)."""
    B, H, _, F_ = x.shape
    part = x[:, :, first * window :].reshape(B * H, -1, F_)
    if part.shape[1] < num * window:
        part = F.pad(part, (0, 0, 0, num * window - part.shape[1]))
    return part.reshape(B * H * num, window, F_)  # a copy when the rows of `x` are strided


def _spans(x: torch.Tensor, first: int, num: int, window: int, local: int) -> torch.Tensor:
    """`(B, H, N, F)` -> `(B H, num, local window, F)`: the exact span of window `first + i` (windows
    `first + i - local + 1 .. first + i` of `x`), zeros outside `0 .. N - 1`."""
    B, H, _, F_ = x.shape
    lo = first - local + 1  # the first span's first window (negative: before position 0)
    part = x[:, :, max(lo, 0) * window :].reshape(B * H, -1, F_)
    before, length = max(-lo, 0) * window, (num + local - 1) * window
    if before or part.shape[1] < length - before:
        part = F.pad(part, (0, 0, before, length - before - part.shape[1]))
    windows = part.unflatten(1, (num + local - 1, window))
    if local == 1:
        return windows
    return torch.cat([windows[:, i : i + num] for i in range(local)], dim=2)


def _causal_fast(q, k, v, keys, betas, geo: _Causal, block_size: int | None, sinks=None) -> torch.Tensor:
    """`_causal_blocked` without autograd, with few large in-place ops (on shared CPUs every op waits for its slowest
    thread). The exact part runs over all windows at once, one product per window of the span: window `m` of the
    flattened `(B H nW)` windows against key window `m - s`, contiguous slices of the same windows, so no span is
    copied; pairs whose key window lies before position 0 (or in another head) are masked. Queries are padded to
    start at the first span's window, so those pairs are exactly the first `s` windows of each head. Each block of
    queries then adds its summaries with one product `[q s, log P - top] @ [kappa~ / root, 1]^T` (logits already
    shifted by the exact part's row max `top`), one `exp_` and one `baddbmm_` into the accumulator. Sinks join the
    exact part (one `(L, G)` block in the row max)."""
    B, H, Nq, D = q.shape
    N, BH, E, K = k.shape[2], B * H, geo.window, geo.local
    # from the first window any query sees (rows before the queries are padding, their outputs dropped)
    first, last = max((N - Nq) // E - K + 1, 0), (N - 1) // E
    num_windows = last - first + 1
    q_rows, front = _causal_rows(q, N, E, first)
    L, M = num_windows * E, BH * num_windows
    q_aug = q.new_empty(BH, L, D + 1)
    qs = torch.mul(q_rows, geo.scale, out=q_aug[..., :D]).view(M, E, D)
    kw, vw = _windows(k, first, num_windows, E), _windows(v, first, num_windows, E)
    local = torch.bmm(qs, kw.transpose(1, 2))  # (M, E, E): own window
    causal = torch.ones(E, E, dtype=torch.bool, device=q.device).triu(1)
    top = local.masked_fill_(causal, float("-inf")).amax(dim=-1, keepdim=True)  # finite: a query sees itself
    earlier = []  # window s back, s = 1 .. K - 1: (M - s, E, E), row m for query window m + s
    for s in range(1, min(K, num_windows)):
        logits = torch.bmm(qs[s:], kw[:-s].transpose(1, 2))
        logits.masked_fill_((torch.arange(s, M, device=q.device) % num_windows < s)[:, None, None], float("-inf"))
        top[s:] = torch.maximum(top[s:], logits.amax(dim=-1, keepdim=True))
        earlier.append(logits)
    top = top.view(BH, L, 1)
    if sinks is not None:
        sink_keys, sink_values = (t.reshape(BH, -1, D) for t in sinks)
        far_sinks = torch.bmm(qs.view(BH, L, D), sink_keys.transpose(1, 2)).view(BH, num_windows, E, -1)
        far_sinks.masked_fill_(
            _hidden_sinks(first + torch.arange(num_windows, device=q.device)[:, None, None], geo, sink_keys.shape[1]),
            -math.inf,
        )  # (BH, nW, E, G)
        top = torch.maximum(top, far_sinks.flatten(1, 2).amax(dim=-1, keepdim=True))
    # numerator and normaliser apart: `[v, 1]` would copy the values
    shift = top.view(M, E, 1)
    den = local.sub_(shift).exp_().sum(dim=-1)  # (M, E)
    acc = torch.bmm(local, vw)  # (M, E, D)
    del local
    for s, logits in enumerate(earlier, start=1):
        den[s:].add_(logits.sub_(shift[s:]).exp_().sum(dim=-1))
        acc[s:].baddbmm_(logits, vw[:-s])
    del earlier
    den, acc = den.view(BH, L), acc.view(BH, L, D)
    if sinks is not None:
        far_sinks = far_sinks.flatten(1, 2).sub_(top).exp_()
        den.add_(far_sinks.sum(dim=-1))
        acc.baddbmm_(far_sinks, sink_values)
    C = min(keys.shape[2], geo.seen(last))
    if C:
        torch.sub(math.log(geo.chunk_size), top, out=q_aug[..., D:])
        keys_t = _with_ones(keys[:, :, :C].reshape(BH, C, D) / geo.scale**0.5).transpose(1, 2)  # (BH, D + 1, C)
        betas1 = _with_ones(betas[:, :, :C].reshape(BH, C, D))
        step = max(1, min(num_windows, (block_size or CAUSAL_BLOCK_ROWS) // E))  # windows per block
        far_buf, part_buf = q.new_empty(BH * step * E * C), q.new_empty(BH * step * E * (D + 1))
        for a in range(0, num_windows, step):
            b = min(num_windows, a + step)
            rows, n = slice(a * E, b * E), (b - a) * E
            seen, common = min(C, geo.seen(first + b - 1)), geo.seen(first + a)
            if not seen:
                continue
            far = torch.bmm(q_aug[:, rows], keys_t[..., :seen], out=far_buf[: BH * n * seen].view(BH, n, seen))
            if geo.sinks:
                few = min(seen, -(-geo.sinks // geo.chunk_size))  # chunks holding sinks count fewer tokens
                far[..., :few].add_(_log_counts(geo, few, q) - math.log(geo.chunk_size))
            if seen > common:
                # window `first + r` of the block sees summary `common + j` iff `common + j < geo.seen(first + r)`
                bounds = torch.tensor([geo.seen(first + r) - common for r in range(a, b)], device=q.device)
                hidden = torch.arange(seen - common, device=q.device) >= bounds[:, None, None]  # (nb, 1, .)
                far.view(BH, b - a, E, seen)[..., common:].masked_fill_(hidden, -math.inf)
            # a strided `out=` makes BLAS go matrix by matrix: product into a contiguous buffer, then one add
            part = torch.bmm(far.exp_(), betas1[:, :seen], out=part_buf[: BH * n * (D + 1)].view(BH, n, D + 1))
            acc[:, rows].add_(part[..., :D])
            den[:, rows].add_(part[..., D])
    acc.div_(den[..., None])
    return acc.reshape(B, H, L, D)[:, :, front : front + Nq]


@dataclass
class EVAState:
    """Causal EVA decoding state: the tokens of the exact span (the open window and the `K - 1` before it) and every
    finished chunk summary, per row.

    Chunks and windows are anchored at each row's first real token (as in the packed full forward), so rows of a
    left-padded batch may be at different offsets. A summary is computed once, when its window leaves the exact span;
    the state grows by `2 D` numbers per `P` tokens and a step costs `O((K E + N / P) D)`.

    Attributes:
        keys, values (`torch.Tensor` of shape `(B, H, K E, D)`): raw keys and values of the exact span, from the
            start of window `max(w - K + 1, 0)` (`w` the open window); slots `< fill[b]` hold row `b`'s tokens.
        fill (`torch.Tensor` of shape `(B,)`, long): tokens in the exact span, `0 <= fill < K E`.
        chunk_keys, chunk_values (`torch.Tensor` of shape `(B, H, C, D)`): `kappa~_c` and `beta_c` of the finished
            chunks; slots `< count[b]` are row `b`'s.
        count (`torch.Tensor` of shape `(B,)`, long): finished chunks of each row.
        sink_keys, sink_values (`torch.Tensor` of shape `(B, H, G, D)`): raw keys and values of each row's first
            `G` real tokens (`sink_tokens`; slots past the row's tokens hold zeros and are never attended).
    """

    keys: torch.Tensor
    values: torch.Tensor
    fill: torch.Tensor
    chunk_keys: torch.Tensor
    chunk_values: torch.Tensor
    count: torch.Tensor
    sink_keys: torch.Tensor
    sink_values: torch.Tensor

    @classmethod
    def empty(cls, batch_size: int, num_heads: int, span: int, like: torch.Tensor, sinks: int = 0) -> EVAState:
        """A state holding no token, for values like `like` `(..., D)` (dtype, device and `D`), an exact span of
        `span = K E` tokens and `G = sinks`."""
        buffer = like.new_zeros(batch_size, num_heads, span, like.shape[-1])
        none = torch.zeros(batch_size, dtype=torch.long, device=like.device)
        sink = like.new_zeros(batch_size, num_heads, sinks, like.shape[-1])
        return cls(buffer, buffer.clone(), none, buffer[:, :, :0], buffer[:, :, :0], none.clone(), sink, sink.clone())

    def _floats(self) -> tuple[torch.Tensor, ...]:
        return self.keys, self.values, self.chunk_keys, self.chunk_values, self.sink_keys, self.sink_values

    def _with(self, floats: list[torch.Tensor], fill: torch.Tensor, count: torch.Tensor) -> EVAState:
        keys, values, chunk_keys, chunk_values, sink_keys, sink_values = floats
        return EVAState(keys, values, fill, chunk_keys, chunk_values, count, sink_keys, sink_values)

    def to(self, *args, **kwargs) -> EVAState:
        """A copy moved or cast as by `torch.Tensor.to`; the counters stay long."""
        floats = [t.to(*args, **kwargs) for t in self._floats()]
        return self._with(floats, self.fill.to(floats[0].device), self.count.to(floats[0].device))

    @property
    def device(self) -> torch.device:
        return self.keys.device

    @property
    def batch_size(self) -> int:
        return self.keys.shape[0]

    def nbytes(self) -> int:
        """Bytes held by the state."""
        return sum(t.numel() * t.element_size() for t in (*self._floats(), self.fill, self.count))

    def index_select(self, index: torch.Tensor) -> EVAState:
        """Rows `index` `(B',)` (beam search, batch edits)."""
        floats = [t.index_select(0, index) for t in self._floats()]
        return self._with(floats, self.fill.index_select(0, index), self.count.index_select(0, index))


def eva_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    state: EVAState,
    window_size: int,
    chunk_size: int,
    key_map: Map,
    mu_map: Map,
    sample: bool,
    scale: float,
    local_windows: int = 1,
) -> tuple[torch.Tensor, EVAState]:
    """Causal EVA of `n` new tokens `(B, H, n, D)` given the state of the earlier ones; padded new tokens (`mask`
    False) are skipped and get output 0. Rows at the same offsets run together: the exact span's tokens plus the real
    new ones attend through `attend_causal`, the row's summaries in front (`prior`) and its sinks (the first
    `G = state.sink_keys.shape[2]` tokens, kept in the state as they arrive). Windows that leave the exact span
    (`K = local_windows` windows up to the open one) are summarised once, here. Returns the output and a new state
    (the input state is not modified)."""
    B, H, n, D = q.shape
    E, pw, G, K = window_size, window_size // chunk_size, state.sink_keys.shape[2], local_windows
    mask = torch.ones(B, n, dtype=torch.bool, device=q.device) if mask is None else mask
    real = mask.sum(-1)
    order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices  # real new tokens first, in order
    done = ((state.fill + real) // E - (K - 1)).clamp_min(0)  # windows leaving the exact span in this step
    maps = key_map, mu_map, sample
    chunk_keys, chunk_values = state.chunk_keys, state.chunk_values
    if bool((done > 0).any()):
        grow = max(int((state.count + done * pw).max()) - chunk_keys.shape[2], 0)
        # fresh tensors: the input state keeps its own
        chunk_keys, chunk_values = (
            F.pad(t, (0, 0, 0, grow)) if grow else t.clone() for t in (chunk_keys, chunk_values)
        )
    keys, values = state.keys.clone(), state.values.clone()
    sink_keys, sink_values = state.sink_keys.clone(), state.sink_values.clone()
    out = q.new_zeros(B, H, n, D)
    heads, dims = torch.arange(H, device=q.device)[None, :, None, None], torch.arange(D, device=q.device)
    offsets = torch.stack([state.fill, state.count, real], dim=-1)
    for fill, count, m in torch.unique(offsets, dim=0).tolist():
        if m == 0:
            continue
        rows = torch.nonzero((offsets == offsets.new_tensor([fill, count, m])).all(-1)).flatten()
        index = order[rows, :m]
        # a group of every row (the usual case) takes views: no copy of the summaries at each step
        sel = slice(None) if rows.numel() == B else rows
        qg = gather_tokens(q, rows, index)
        kg = torch.cat([state.keys[sel, :, :fill], gather_tokens(k, rows, index)], dim=2)
        vg = torch.cat([state.values[sel, :, :fill], gather_tokens(v, rows, index)], dim=2)
        total = fill + m
        closed = max(total // E - K + 1, 0) * E
        start = count * chunk_size  # position of `kg[:, :, 0]` among the row's real tokens
        if closed:
            skip = max(G - start, 0)
            summaries = causal_summaries(kg[:, :, :closed], vg[:, :, :closed], chunk_size, *maps, scale**0.5, skip)
            new_keys, new_betas = summaries
            slots = slice(count, count + new_keys.shape[2])
            chunk_keys[sel, :, slots], chunk_values[sel, :, slots] = new_keys, new_betas
        seen = count + closed // chunk_size
        prior_keys, prior_betas = chunk_keys[sel, :, :seen], chunk_values[sel, :, :seen]
        geo = _Causal(min(E, total), pw, chunk_size, count, scale, G, K)
        sinks = None
        if G:
            fresh = min(G, start + total) - start  # sinks among these tokens
            if fresh > 0:
                sink_keys[sel, :, start : start + fresh] = kg[:, :, :fresh]
                sink_values[sel, :, start : start + fresh] = vg[:, :, :fresh]
            sinks = sink_keys[sel], sink_values[sel]
        out[rows[:, None, None, None], heads, index[:, None, :, None], dims] = attend_causal(
            qg, kg, vg, prior_keys, prior_betas, geo, sinks=sinks
        )
        keys[sel, :, : total - closed], values[sel, :, : total - closed] = kg[:, :, closed:], vg[:, :, closed:]
    fill, count = state.fill + real - done * E, state.count + done * pw
    return out, EVAState(keys, values, fill, chunk_keys, chunk_values, count, sink_keys, sink_values)


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
        num_chunks (`int`, *optional*, defaults to 64): bidirectional: at most this many chunk summaries, of at least
            `N / num_chunks` tokens each (`chunk_length`; finer on short inputs, at the same linear cost).
        chunk_size (`int`, *optional*, defaults to 16): tokens per chunk summary (causal); must divide `window_size`.
        adaptive (`bool`, *optional*, defaults to `True`): learn the chunk key and proposal mean maps
            (`chunk_key_proj`, `proposal_proj`: `nn.Linear(D, D)` shared by the heads, initialised to the identity).
        sink_tokens (`int`, *optional*, defaults to 0): `G`; the first `G` real tokens (bidirectional: and the last
            `G`, e.g. `[CLS]` and `[SEP]`) are attended exactly by every query that may see them, as attention
            sinks (StreamingLLM, Xiao et al., arXiv 2309.17453), besides the local window, and are left out of the
            chunk summaries: every key still counts once, under one normaliser.
        local_windows (`int`, *optional*, defaults to 2): `K`, causal only: a query sees exactly the keys of its own
            window up to itself and every key of the `K - 1` windows before it (between `(K - 1) E + 1` and `K E`
            keys once the row is that long), plus the summaries of the chunks before them. `K = 1` is block-aligned
            EVA, where the first query of each window sees a single exact key. Bidirectional EVA ignores it.

    Trained (with `adaptive=True`, the default): `chunk_key_proj` (the summaries' keys `kappa_T`, EVA's adaptive
    chunk keys) and `proposal_proj` (the proposal means `mu_T`), identity at init so that a fresh conversion uses
    plain means; both get gradients in both modes.

    Training draws one proposal sample per (batch, head, chunk) at every forward pass; eval uses the proposal mean,
    which makes the module deterministic.

    >>> attn = EVAAttention(num_heads=2, head_dim=16, window_size=32, num_chunks=16, chunk_size=8)
    """

    # no N x N tensor anywhere; the bidirectional cost is linear, the causal one O(N (E + N / P) D)
    is_linear = True
    #: causal decoding keeps an `EVAState` (open window + finished summaries, `eva_step`) rather than the keys
    supports_recurrent_state = True

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
        sink_tokens: int | None = 0,
        local_windows: int = 2,
    ) -> None:
        super().__init__(num_heads, head_dim)
        self.window_size = check_int("window_size", window_size)
        self.sink_tokens = check_int("sink_tokens", sink_tokens or 0, minimum=0)
        self.local_windows = check_int("local_windows", local_windows)
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
        G, K = self.sink_tokens, self.local_windows
        if causal:
            return causal_eva(q, k, v, self.window_size, self.chunk_size, *maps, scale=scale, sinks=G, local_windows=K)
        if not records_grad(q, k, v, *self.parameters()):
            return bidirectional_eva_inference(q, k, v, self.window_size, self.num_chunks, *maps, scale=scale, sinks=G)
        return bidirectional_eva(q * root, k * root, v, self.window_size, self.num_chunks, *maps, sinks=G)

    def prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        padding_mask: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> tuple[torch.Tensor, EVAState]:
        """Causal EVA over a prompt `(B, H, N, D)`; returns the output and the `EVAState` after its last token."""
        return self.step(q, k, v, None, padding_mask=padding_mask, scale=scale)

    def step(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        state: EVAState | None,
        *,
        padding_mask: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> tuple[torch.Tensor, EVAState]:
        """Attend `n >= 1` new tokens given the state of every earlier one; the input state is not modified.

        Args:
            q, k, v (`torch.Tensor` of shape `(B, H, n, D)`): the new tokens only.
            state (`EVAState`, *optional*): from `prefill` or an earlier `step`; None = no earlier token.
            padding_mask (`torch.Tensor` of shape `(B, n)`, *optional*): True = real token, for the new tokens.
            scale (`float`, *optional*): logit scale (default `D ** -0.5`).

        Returns:
            `out` `(B, H, n, D)` in `q.dtype` (rows of the full causal forward over all tokens, padding cut away as
            there) and the new `EVAState` (fp32, fp64 for fp64 inputs). Cost `O(n (K E + N / P) D)` per head.
        """
        self._check_inputs(q, k, v, padding_mask, True)
        if q.shape[2] != k.shape[2]:
            raise ValueError(f"`step` takes the new tokens only: got {q.shape[2]} queries and {k.shape[2]} keys.")
        scale = resolve_scale(scale, q.shape[-1])
        if state is not None and not isinstance(state, EVAState):
            raise TypeError(f"`state` must be an EVAState, got {type(state).__name__}; start from `prefill` or None.")
        if state is not None and state.sink_keys.shape[2] != self.sink_tokens:
            raise ValueError(
                f"`state` keeps {state.sink_keys.shape[2]} sink tokens but the estimator has "
                f"`sink_tokens={self.sink_tokens}`; start from `prefill` with this estimator."
            )
        span = self.local_windows * self.window_size
        if state is not None and state.keys.shape[2] != span:
            raise ValueError(
                f"`state` keeps an exact span of {state.keys.shape[2]} tokens but the estimator sees {span} "
                f"(`local_windows={self.local_windows}` x `window_size={self.window_size}`); start from `prefill` with "
                "this estimator."
            )
        input_dtype, dtype = q.dtype, compute_dtype(q.dtype)
        if state is None:
            state = EVAState.empty(q.shape[0], self.num_heads, span, v.to(dtype), self.sink_tokens)
        if is_empty(q):
            return q * 0, state
        q, k, v, state = q.to(dtype), k.to(dtype), v.to(dtype), state.to(dtype)
        maps = self._map(self.chunk_key_proj), self._map(self.proposal_proj), self.training
        with torch.autocast(device_type=q.device.type, enabled=False):
            out, state = eva_step(
                q, k, v, padding_mask, state, self.window_size, self.chunk_size, *maps, scale, self.local_windows
            )
        return out.to(input_dtype), state

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, window_size={self.window_size}, num_chunks={self.num_chunks}, "
            f"chunk_size={self.chunk_size}, adaptive={self.adaptive}, sink_tokens={self.sink_tokens}, "
            f"local_windows={self.local_windows}"
        )
