"""Local exact window + linear estimator under one normaliser (LoLCATs, arXiv 2410.10254, §3.2), any feature map.

For a query `i` the keys split into its window `W(i)` (exact softmax logits `s q_i.k_j`) and the rest `R(i)`
(kernel scores `phi(q_i).phi(k_j)`, estimates of `exp(s q_i.k_j)`):

    out_i = [sum_{j in W(i)} e^{s q_i.k_j} v_j + sum_{j in R(i)} phi(q_i).phi(k_j) v_j]
            / [sum_{j in W(i)} e^{s q_i.k_j}     + sum_{j in R(i)} phi(q_i).phi(k_j)],

a convex combination of the values, exact when `W(i)` holds every key. Both parts must live on the scale of
`exp(s q.k)`: the query log-features handed in here are *complete* (no per-query constant left out, see
`WindowMaps`). Windows (`W` positions, padding counts as a position and is masked):

* causal: the last `W` keys including the query itself, `i - W < j <= i` (LoLCATs' sliding window);
* bidirectional: the `W` positions nearest the query, `[lo_i, lo_i + W)` with `lo_i = i - (W - 1) // 2` clamped so
  the window stays inside the row's real tokens (first to last real position): a window as long as the sequence
  covers it, and left or right padding moves nothing.

**Blocked form.** Queries are cut into blocks of `T` positions from position 0, the block layout of EVA (`blocks`,
shared with `eva.py`; any `T >= 1`, default `max(W, 16)`). The *near span* of block `b` is key blocks
`b - before .. b + after`, `M = (before + 1 + after) T` keys (`_Layout`): causally `before = ceil((W - 1) / T)`,
`after = 0`; bidirectionally the *narrow* span `before = ceil(((W - 1) // 2) / T)`, `after = ceil((W // 2) / T)`
for blocks where no query's window is clamped at a row's edge, and the *wide* span `before = after =
ceil((W - 1) / T)` for the others (a clamped window reaches up to `W - 1` positions to one side). Keys outside the
span are *far*: their statistics `phi(K)^T [V, 1]` come from exclusive prefix (and suffix) scans over per-block
sums, kept relative to a running per-feature max (`_far_statistics`), with a decoding `LinearState` in front.

Near keys get exact weights `exp(s q.k - top)` inside the window and kernel weights `exp(lq + c - top) . exp(lk - c)`
outside it, `c` the detached per-feature key max of the span, so that `max_s (lq_s + c_s)` bounds every kernel
logit up to `log S` (no `log`/`exp` round trip). Causally only the first `Mk = M - W` keys of a span can be left of
a window: the kernel GEMM covers those alone. Exact, near-kernel, far and sink terms share one detached row bound
`top`; one `weights @ [V, 1]` product serves the near keys. Query blocks run in groups of about `NEAR_ELEMENTS`
weights (`_groups`), so that a group's buffers stay in cache; near keys are `unfold` views of the padded keys (no
full-length copy per span). Cost `O(N (M D + Mk S + M D + S D))` per head, memory `O(N (S + D) + (N / T) S D)`
plus one group: no `N x N` tensor.

**Decoding** (`WindowState`): the last `W - 1` keys, key log-features and values (with their column of ones) plus
the `LinearState` of the keys that left the window and the sinks; a step costs `O(W D + S D)` and memory stays
constant. The window rows live in a `_Tail` of `2 W` rows that successive states share: a step appends its token
in place (one `cat` into the buffer) when its input state owns the buffer's end, and copies the `W - 1` live rows
into a new buffer otherwise (every `W + 1` steps, or when two steps branch from one state), so no step writes a
row an earlier state sees. A single new token goes through one logit row `[window, kernel, sinks]` (one max, one
`exp`), and the token leaving the window is absorbed directly (`_absorb_one`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import records_grad
from .linear import (
    _LOG_FLOOR,
    LinearState,
    _mask_keys,
    _normalise,
    _with_ones,
)

#: smallest block length of the blocked path (short windows would make the block statistics many and tiny)
MIN_BLOCK = 16
#: logit elements `B H g T M` of one group of `g` query blocks: the group's buffers stay in cache
NEAR_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class WindowMaps:
    """Complete log-feature maps of raw `(B, H, n, D)` inputs for the window hybrid.

    `exp(query(q)) . exp(key(k))` must estimate (or stand in for) `exp(scale * q.k)`: unlike `linear.FeatureMaps`
    no per-query constant may be left out, and the estimator's log-factor (e.g. `-log S` for `S` random features,
    or a learned per-head factor) is part of `query`.
    """

    query: Callable[[torch.Tensor], torch.Tensor]
    key: Callable[[torch.Tensor], torch.Tensor]
    num_features: int


def blocks(x: torch.Tensor, front: int, length: int, block: int) -> torch.Tensor:
    """Zero-pad `x` `(B, H, N, ...)` to `length` rows (`front` of them first); -> `(B, H, length / block, block, ...)`."""
    pad = [0, 0] * (x.dim() - 3) + [front, length - front - x.shape[2]]
    x = F.pad(x, pad)
    return x.reshape(x.shape[0], x.shape[1], length // block, block, *x.shape[3:])


def window_bounds(
    query_pos: torch.Tensor, key_mask: torch.Tensor | None, num_keys: int, window: int, causal: bool
) -> torch.Tensor:
    """First window position `lo` of every query, `(B or 1, *query_pos.shape)`; the window is `[lo, lo + W)`.

    Args:
        query_pos (`torch.Tensor`, long): query positions.
        key_mask (`torch.Tensor` of shape `(B, Nk)`, *optional*): True = real key (bounds the bidirectional window).
        num_keys (`int`): `Nk`.
        window (`int`): `W`.
        causal (`bool`): last `W` keys (`lo = i - W + 1`) or the `W` nearest ones.
    """
    if causal:
        return (query_pos - window + 1)[None]
    if key_mask is None:
        first = torch.zeros(1, dtype=torch.long, device=query_pos.device)
        last = torch.full((1,), num_keys - 1, dtype=torch.long, device=query_pos.device)
    else:
        positions = torch.arange(num_keys, device=key_mask.device)
        first = torch.where(key_mask, positions, num_keys).amin(-1)
        last = torch.where(key_mask, positions, -1).amax(-1)
    shape = (-1,) + (1,) * query_pos.dim()
    first, last = first.reshape(shape), last.reshape(shape)
    lo = query_pos[None] - (window - 1) // 2
    return torch.minimum(torch.maximum(lo, first), torch.maximum(last - window + 1, first))


def sink_positions(
    key_mask: torch.Tensor | None, batch_size: int, num_keys: int, sinks: int, causal: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions `(B, G2)` of the sink keys and which of them exist (`(B, G2)` bool).

    The first `G` real tokens, plus bidirectionally the last `G` real tokens not already among them (`G2 = G` or
    `2G`). Real tokens are assumed contiguous (padding on the left or the right). Attention sinks: StreamingLLM
    (Xiao et al., arXiv 2309.17453); encoders' `[CLS]` and `[SEP]` play that role.
    """
    offsets = torch.arange(sinks, device=device)
    if key_mask is None:
        first = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        last = torch.full((batch_size, 1), num_keys - 1, dtype=torch.long, device=device)
    else:
        positions = torch.arange(num_keys, device=device)
        first = torch.where(key_mask, positions, num_keys).amin(-1, keepdim=True)
        last = torch.where(key_mask, positions, -1).amax(-1, keepdim=True)
    pos, ok = first + offsets, first + offsets <= last
    if not causal:
        tail = last - offsets
        pos, ok = torch.cat([pos, tail], dim=1), torch.cat([ok, tail >= first + sinks], dim=1)
    return pos.clamp(0, max(num_keys - 1, 0)), ok


def _layouts(window: int, block: int, num_keys: int, causal: bool) -> tuple[_Layout, _Layout]:
    """`(narrow, wide)` spans of a query block: `narrow` holds the unclamped windows `[i - (W - 1) // 2, i + W // 2]`
    (causal: `[i - W + 1, i]`), `wide` also the bidirectional windows clamped at a row's edge, which may reach
    `W - 1` positions to either side of their query."""
    reach = -(-(window - 1) // block)
    if causal:
        wide = _Layout(block, reach, 0, num_keys, window, causal, (window - 1, 0))
        return wide, wide
    wide = _Layout(block, reach, reach, num_keys, window, causal, (window - 1, window - 1))
    left, right = (window - 1) // 2, window // 2
    narrow = _Layout(block, -(-left // block), -(-right // block), num_keys, window, causal, (left, right))
    return narrow, wide


def _scan(delta: torch.Tensor, decay: torch.Tensor, initial: torch.Tensor, order: range) -> list[torch.Tensor]:
    """Exclusive scan `prior[b] = (prior[b'] + delta[b']) * decay[b]` along `order` (`b'` the block before `b` in
    that order, `prior[order[0]] = initial`). `delta` `(B, H, nB, S, D + 1)`, `decay` `(B, H, nB, S)`. A loop of
    small adds: several times faster on CPU than `cumsum` over the block dimension."""
    priors = [initial] * delta.shape[2]
    previous = order[0]
    for b in order[1:]:
        priors[b] = (priors[previous] + delta[:, :, previous]) * decay[:, :, b, :, None]
        previous = b
    return priors


def _far_statistics(
    lk: torch.Tensor, v: torch.Tensor, block: int, num_blocks: int, state: LinearState, causal: bool
) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
    """Kernel statistics of the keys before each block (with `state`) and, unless `causal`, after it: per
    direction `nB` tensors `(B, H, S, D + 1)` and their shifts `(B, H, nB, S)` (see `_pick_far`).

    Each block's sums `phi(K_b)^T [V_b, 1]` are taken relative to the running per-feature key max up to it (from
    the left, or from the right) and scanned with the decay `exp(running[b'] - running[b])` between blocks."""
    nB = num_blocks
    lkb = _pad_rows(lk, 0, nB * block, -torch.inf).unflatten(2, (nB, block))  # (B, H, nB, T, S)
    v1 = blocks(_with_ones(v), 0, nB * block, block)
    chunk_max = lkb.detach().amax(dim=3)  # (B, H, nB, S)
    empty = LinearState.empty(lk.shape[0], lk.shape[1], lk.shape[-1], v)
    far = []
    for reverse, start in ((False, state),) if causal else ((False, state), (True, empty)):
        maxima = torch.maximum(chunk_max, start.shift[:, :, None])
        if reverse:
            running = torch.cummax(maxima.flip(2), dim=2).values.flip(2).clamp_min(_LOG_FLOOR)
        else:
            running = torch.cummax(maxima, dim=2).values.clamp_min(_LOG_FLOOR)
        delta = torch.exp(lkb - running[:, :, :, None]).transpose(-1, -2) @ v1  # (B, H, nB, S, D + 1)
        order = range(nB - 1, -1, -1) if reverse else range(nB)
        decay = torch.exp(running.roll(-1 if reverse else 1, dims=2) - running)  # from the block scanned before
        initial = start.kvz * torch.exp(start.shift - running[:, :, order[0]])[..., None]
        priors = _scan(delta, decay, initial, order)
        far.append((priors, running))
    return far


def _pick_far(
    far: list[tuple[list[torch.Tensor], torch.Tensor]], layout: _Layout, block_ids: range, like: LinearState
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`(kvz (B, H, g, S, D + 1), shift (B, H, g, S))` of the keys of blocks `< b - before` and (bidirectional)
    `> b + after` for the query blocks `block_ids`: every key outside their near spans. `like`: an empty state."""
    (left, left_shift), *right = far
    picks = [max(b - layout.before, 0) for b in block_ids]  # the state alone before block 0
    out = [(torch.stack([left[b] for b in picks], dim=2), left_shift[:, :, picks])]
    if right:
        (right, right_shift), nB = right[0], len(left)
        picks = [b + layout.after for b in block_ids]  # past the last block: nothing (zeros at the floor shift)
        kvz = torch.stack([right[b] if b < nB else like.kvz for b in picks], dim=2)
        shift = torch.stack([right_shift[:, :, b] if b < nB else like.shift for b in picks], dim=2)
        out.append((kvz, shift))
    return out


def _pad_rows(x: torch.Tensor, front: int, length: int, value: float = 0.0) -> torch.Tensor:
    """`x` `(B, H, N, ...)` (or a mask `(B, N)`) padded along its token dimension to `length` rows, `front` first."""
    dim = 2 if x.dim() > 2 else 1
    pad = [0, 0] * (x.dim() - dim - 1) + [front, length - front - x.shape[dim]]
    return F.pad(x, pad, value=value)


@dataclass(frozen=True)
class _Layout:
    """Query blocks of `T` tokens; block `b`'s near span is key blocks `b - before .. b + after` (`M` keys), of
    which the first `Mk` may fall outside a window (all `M` bidirectionally) and get kernel weights, and columns
    `exact_columns` may fall inside one (a window reaches `reach` positions left and right of its query)."""

    T: int
    before: int
    after: int
    num_keys: int
    window: int
    causal: bool
    reach: tuple[int, int]

    @property
    def M(self) -> int:
        return (self.before + 1 + self.after) * self.T

    @property
    def Mk(self) -> int:
        # causal: key j is left of some window of block b only if j <= (b + 1) T - 1 - W
        return max(self.M - self.window, 0) if self.causal else self.M

    @property
    def exact_columns(self) -> tuple[int, int]:
        if self.causal:  # at most W - 1 fewer than M: not worth a second weight buffer
            return 0, self.M
        start = self.before * self.T
        return max(start - self.reach[0], 0), min(start + self.T + self.reach[1], self.M)


def _near_masks(
    layout: _Layout, block_ids: torch.Tensor, key_real: torch.Tensor, bounds_mask: torch.Tensor | None, dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float masks of query blocks `block_ids` `(g,)`, shared by the heads: the exact-logit bias `(B or 1, 1, g,
    T, E)` on the `E` exact columns (0 on a real key of the window, `-inf` elsewhere) and the kernel mask
    `(B or 1, 1, g, T, Mk)` (1 outside the window). `key_real` `(B or 1, g, M)`: near keys that exist, are not
    padding and are not sinks."""
    T, M = layout.T, layout.M
    query_pos = block_ids[:, None] * T + torch.arange(T, device=block_ids.device)  # (g, T)
    key_pos = (block_ids[:, None] - layout.before) * T + torch.arange(M, device=block_ids.device)  # (g, M)
    lo = window_bounds(query_pos, bounds_mask, layout.num_keys, layout.window, layout.causal)[..., None]
    kp = key_pos[None, :, None, :]
    in_window = (kp >= lo) & (kp < lo + layout.window)  # causal: lo + W - 1 is the query itself
    e0, e1 = layout.exact_columns
    exact = (in_window & key_real[:, :, None])[..., e0:e1]
    bias = torch.zeros(exact.shape, dtype=dtype, device=exact.device).masked_fill_(~exact, float("-inf"))
    kernel = (kp < lo) if layout.causal else ~in_window  # causal: never a key after the query
    return bias[:, None], kernel[..., : layout.Mk].to(dtype)[:, None]


def _exp_minus(x: torch.Tensor, top: torch.Tensor, inplace: bool) -> torch.Tensor:
    """`exp(x - top)`, overwriting `x` (a temporary) when `inplace`: no new buffer per group."""
    return x.sub_(top).exp_() if inplace else torch.exp(x - top)


def _group(
    layout: _Layout,
    qs: torch.Tensor,
    lq: torch.Tensor,
    near: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    masks: tuple[torch.Tensor, torch.Tensor],
    far: list[tuple[torch.Tensor, torch.Tensor]],
    sink: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """Normalised output `(B, H, g, T, D)` of a group of `g` query blocks.

    Args:
        qs, lq (`torch.Tensor` of shape `(B, H, g, T, D or S)`): scaled queries and their log-features.
        near: keys `(B, H, g, D, M)`, log-features of the first `Mk` keys `(B, H, g, S, Mk)` (`-inf` = not a key)
            and values with ones `(B, H, g, M, D + 1)` of each block's near span.
        masks: `_near_masks`.
        far: `(kvz (B, H, g, S, D + 1), shift (B, H, g, S))` of the far keys.
        sink: sink keys `(B, H, 1, D, G2)`, values `(B, H, 1, G2, D + 1)`, bias `(B, 1, g or 1, T or 1, G2)`.

    Every term is `exp(logit - top)` under one detached row bound `top`: the exact logits' row max, and for each
    kernel part `max_s (lq_s + c_s)` with `c` its per-feature key max (a kernel logit is at most that plus `log S`).
    """
    kn, lkn, vn1 = near
    bias, kernel_mask = masks
    inplace = not records_grad(qs, lq, kn, lkn, vn1)
    e0, e1 = layout.exact_columns
    exact = qs @ kn[..., e0:e1]
    exact = exact.add_(bias) if inplace else exact + bias
    M, Mk = vn1.shape[-2], lkn.shape[-1]
    far = [(lq + shift[..., None, :], kvz) for kvz, shift in far]
    tops = [exact.detach().amax(dim=-1)] + [a.detach().amax(dim=-1) for a, _ in far]
    if Mk:
        c_near = lkn.detach().amax(dim=-1).clamp_min(_LOG_FLOOR)  # (B, H, g, S)
        near_query = lq + c_near[..., None, :]
        tops.append(near_query.detach().amax(dim=-1))
    if sink is not None:
        sink_keys, sink_values, sink_bias = sink
        sink_logits = qs @ sink_keys + sink_bias
        tops.append(sink_logits.detach().amax(dim=-1))
    top = torch.stack(tops, dim=-1).amax(dim=-1).clamp_min(_LOG_FLOOR)[..., None]  # (B, H, g, T, 1)
    weights = exact.sub_(top).exp_() if inplace else torch.exp(exact - top)
    if Mk:
        near_kernel = _exp_minus(near_query, top, inplace) @ (lkn - c_near[..., None]).exp_()  # (B, H, g, T, Mk)
    if e1 - e0 < M:  # bidirectional narrow span (Mk = M): the exact weights join the kernel ones on their columns
        if inplace:
            near_kernel.mul_(kernel_mask)[..., e0:e1].add_(weights)
            weights = near_kernel
        else:
            weights = near_kernel * kernel_mask + F.pad(weights, (e0, M - e1))
    elif Mk:
        if inplace:
            weights[..., :Mk].addcmul_(near_kernel, kernel_mask)
        else:
            weights = torch.cat([weights[..., :Mk] + near_kernel * kernel_mask, weights[..., Mk:]], dim=-1)
    out = weights @ vn1
    for a, kvz in far:
        out = out + _exp_minus(a, top, inplace) @ kvz
    if sink is not None:
        out = out + torch.exp(sink_logits - top) @ sink_values
    return _normalise(out)


def _groups(
    narrow: _Layout, wide: _Layout, first: int, num_blocks: int, bounds_mask: torch.Tensor | None, rows: int
) -> list[tuple[_Layout, int, int]]:
    """Query blocks `first .. nB - 1` cut into groups `(layout, b0, b1)` of at most `NEAR_ELEMENTS` weights
    (`rows` = `B H`). A block takes the `wide` span if a query of it (in any row) has a window clamped at an edge."""
    T = narrow.T
    if narrow == wide:
        kinds = [wide] * (num_blocks - first)
    else:
        query_pos = torch.arange(first * T, num_blocks * T, device=None if bounds_mask is None else bounds_mask.device)
        lo = window_bounds(query_pos, bounds_mask, narrow.num_keys, narrow.window, False)
        clamped = (lo != query_pos - (narrow.window - 1) // 2).any(0).reshape(-1, T).any(1)
        kinds = [wide if c else narrow for c in clamped.tolist()]
    groups, b0 = [], first
    for b in range(first, num_blocks + 1):
        layout = kinds[b0 - first]
        size = max(1, NEAR_ELEMENTS // (rows * T * layout.M))
        if b == num_blocks or kinds[b - first] is not layout or b - b0 == size:
            groups.append((layout, b0, b))
            b0 = b
    return groups


def windowed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    causal: bool,
    scale: float,
    window: int,
    maps: WindowMaps,
    state: LinearState | None = None,
    block_size: int | None = None,
    sinks: int = 0,
) -> torch.Tensor:
    """Window + kernel hybrid; queries are the last `Nq` of the `Nk` key positions.

    Args:
        q (`torch.Tensor` of shape `(B, H, Nq, D)`): raw queries.
        k, v (`torch.Tensor` of shape `(B, H, Nk, D)`): raw keys and values.
        key_mask (`torch.Tensor` of shape `(B, Nk)`, *optional*): True = real key.
        causal (`bool`): sliding causal window (last `W` keys) or the `W` nearest positions.
        scale (`float`): logit scale `s`.
        window (`int`): `W >= 1`.
        maps (`WindowMaps`): complete log-feature maps.
        state (`LinearState`, *optional*): causal only; kernel statistics of keys before position 0 (decoding).
        block_size (`int`, *optional*): block length `T >= 1` (default `max(W, 16)`).
        sinks (`int`, *optional*, defaults to 0): `G`; the first `G` real keys (bidirectional: and the last `G`) are
            attended exactly by every query that may see them (`sink_positions`); not with `state`.

    Returns:
        `torch.Tensor` of shape `(B, H, Nq, D)`.
    """
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    T = block_size or max(window, MIN_BLOCK)
    narrow, wide = _layouts(window, T, Nk, causal)
    nB = -(-Nk // T)
    lk = maps.key(k)
    S = lk.shape[-1]
    bounds_mask = key_mask
    if sinks:
        sink_pos, sink_ok = sink_positions(key_mask, B, Nk, sinks, causal, q.device)
        is_sink = ((torch.arange(Nk, device=q.device) == sink_pos[..., None]) & sink_ok[..., None]).any(1)
        # sink keys leave the window and the kernel part: they are attended exactly, once
        key_mask = ~is_sink if key_mask is None else key_mask & ~is_sink
    lk = _mask_keys(lk, key_mask)
    empty = LinearState.empty(B, H, S, v)
    far = _far_statistics(lk, v, T, nB, state or empty, causal)

    first = (Nk - Nq) // T  # first block holding a query
    nQ, front = nB - first, Nk - Nq - first * T
    qs = blocks(q * scale, front, nQ * T, T)  # (B, H, nQ, T, D)
    lqb = maps.query(blocks(q, front, nQ * T, T).flatten(2, 3)).unflatten(2, (nQ, T))
    # keys padded by `wide.before` blocks in front and `wide.after` behind
    length, offset = (nB + wide.before + wide.after) * T, wide.before
    kp, vp = _pad_rows(k, offset * T, length), _pad_rows(_with_ones(v), offset * T, length)
    lkp = _pad_rows(lk, offset * T, length, -torch.inf)
    real = torch.ones(1, Nk, dtype=torch.bool, device=q.device) if key_mask is None else key_mask
    realp = _pad_rows(real, offset * T, length)
    if sinks:
        index = sink_pos[:, None, :, None].expand(B, H, -1, D)
        sink_keys = k.gather(2, index).transpose(-1, -2)[:, :, None]  # (B, H, 1, D, G2)
        sink_values = _with_ones(v.gather(2, index))[:, :, None]  # (B, H, 1, G2, D + 1)
        sink_bias = torch.zeros(sink_ok.shape, dtype=q.dtype, device=q.device).masked_fill_(~sink_ok, -torch.inf)
        sink_bias = sink_bias[:, None, None, None]  # (B, 1, 1, 1, G2)
    outs = []
    for layout, b0, b1 in _groups(narrow, wide, first, nB, bounds_mask, B * H):
        M, Mk = layout.M, layout.Mk
        rows = slice((b0 - layout.before + offset) * T, (b1 + layout.after + offset) * T)
        near = (
            kp[:, :, rows].unfold(2, M, T),
            lkp[:, :, rows].unfold(2, M, T)[..., :Mk],
            vp[:, :, rows].unfold(2, M, T).transpose(-1, -2),
        )
        block_ids = torch.arange(b0, b1, device=q.device)
        masks = _near_masks(layout, block_ids, realp[:, rows].unfold(1, M, T), bounds_mask, q.dtype)
        sink = None
        if sinks:
            bias = sink_bias
            if causal:  # a sink is seen from its own position on
                query_pos = (block_ids[:, None] * T + torch.arange(T, device=q.device))[None, None, :, :, None]
                late = sink_pos[:, None, None, None, :] > query_pos
                bias = bias.masked_fill(late, -torch.inf)
            sink = sink_keys, sink_values, bias
        group_far = _pick_far(far, layout, range(b0, b1), empty)
        g0, g1 = b0 - first, b1 - first
        outs.append(_group(layout, qs[:, :, g0:g1], lqb[:, :, g0:g1], near, masks, group_far, sink))
    out = torch.cat(outs, dim=2).reshape(B, H, nQ * T, D)
    return out[:, :, front : front + Nq]


class _Tail:
    """Buffer of window tokens shared by successive `WindowState`s, appended to in place.

    A state sees rows `[start, end)` of a tail and `length` rows are written. A step appends in place only when
    `length == end` (no other step has written past its input state) and the rows fit; otherwise it first copies
    its rows into a new tail. So a row a state sees is never written again: a step leaves its input state intact,
    and two steps from one state (branching) do not see each other's tokens. Memory: `C` rows, `C = 2 W` in steady
    decoding (a copy of the `W - 1` live rows every `W + 1` steps).

    Attributes:
        tokens (`torch.Tensor` of shape `(B, H, C, D + S + D + 1)`): per row `[key, log-features, value, 1]`, one
            buffer so that a step writes a token with one op; log-features are `-inf` where `mask` is False.
        mask (`torch.Tensor` of shape `(B, C)`, bool): True = real token that is not a sink (True on unwritten rows).
        length (`int`): rows written.
        hidden (`int`): every row at or past `hidden` is True in `mask` (a state starting there needs no mask).
    """

    def __init__(self, tokens: torch.Tensor, mask: torch.Tensor, features: int, length: int, hidden: int) -> None:
        self.tokens, self.mask, self.length, self.hidden = tokens, mask, length, hidden
        self.D = (tokens.shape[-1] - features - 1) // 2
        self.S = features

    @property
    def capacity(self) -> int:
        return self.tokens.shape[2]

    @classmethod
    def of(cls, rows: list[torch.Tensor], capacity: int, hidden: bool) -> _Tail:
        """A new tail of `capacity >= w` rows holding `rows` = `[keys, log-features, values with ones]` `(B, H, w,
        .)` and their `mask` `(B, w)` first."""
        *parts, mask = rows
        (B, H, w, D), S = parts[0].shape, parts[1].shape[-1]
        tokens = parts[0].new_empty(B, H, capacity, 2 * D + S + 1)
        tokens[:, :, w:, -1] = 1.0
        if records_grad(*parts):  # autograd: no `out=`
            tokens[:, :, :w] = torch.cat(parts, dim=-1)
        elif w:
            torch.cat(parts, dim=-1, out=tokens[:, :, :w])
        full = torch.ones(B, capacity, dtype=torch.bool, device=mask.device)
        full[:, :w] = mask
        return cls(tokens, full, S, w, w if hidden else 0)

    def keys(self, start: int, end: int) -> torch.Tensor:
        return self.tokens[:, :, start:end, : self.D]

    def log_features(self, start: int, end: int) -> torch.Tensor:
        return self.tokens[:, :, start:end, self.D : self.D + self.S]

    def values(self, start: int, end: int) -> torch.Tensor:
        """Values with a column of ones `(B, H, end - start, D + 1)`."""
        return self.tokens[:, :, start:end, self.D + self.S :]

    def rows(self, start: int, end: int) -> list[torch.Tensor]:
        """Views of rows `[start, end)`: keys `(B, H, w, D)`, log-features, values with ones and the mask `(B, w)`."""
        return [self.keys(start, end), self.log_features(start, end), self.values(start, end), self.mask[:, start:end]]

    def write(self, end: int, k: torch.Tensor, lk: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Write `n` new tokens `(B, H, n, D)`, their log-features and mask `(B, n)` (None = all True) at `end`
        (no autograd: `cat` into the buffer)."""
        n = k.shape[2]
        torch.cat([k, lk, v], dim=-1, out=self.tokens[:, :, end : end + n, :-1])
        if mask is not None:
            self.mask[:, end : end + n] = mask
            self.hidden = end + n
        self.length = end + n


class WindowState:
    """Decoding state of a window hybrid: the last `W - 1` tokens and the sinks exactly, plus the kernel state of
    the others.

    Constant size: at most `2 W (2 D + S + 1) + G (2 D + 1) + S (D + 2)` numbers per (batch, head) plus a
    `(B, 2 W)` mask and a `(B,)` count (the window rows live in a `_Tail` of `2 W` rows, appended to in place).

    Attributes:
        linear (`LinearState`): kernel statistics of the tokens that left the window (sinks excluded).
        tail (`_Tail`), start, end (`int`): the state's window tokens are rows `[start, end)` of `tail`.
        sink_keys (`torch.Tensor` of shape `(B, H, G, D)`): the first `G` real tokens of each row.
        sink_values (`torch.Tensor` of shape `(B, H, G, D + 1)`): their values with a column of ones.
        sink_count (`torch.Tensor` of shape `(B,)`, long): how many of the `G` slots are filled.
        sinks_full (`bool`): every slot of every row is filled (no new sink can come).
    """

    def __init__(
        self,
        linear: LinearState,
        tail: _Tail,
        start: int,
        end: int,
        sink_keys: torch.Tensor,
        sink_values: torch.Tensor,
        sink_count: torch.Tensor,
        sinks_full: bool | None = None,
    ) -> None:
        self.linear, self.tail, self.start, self.end = linear, tail, start, end
        self.sink_keys, self.sink_values, self.sink_count = sink_keys, sink_values, sink_count
        if sinks_full is None:
            sinks_full = bool((sink_count >= sink_keys.shape[2]).all())
        self.sinks_full = sinks_full

    @property
    def keys(self) -> torch.Tensor:
        """Raw keys of the window tokens `(B, H, w, D)`, `w <= W - 1`, oldest first (a view)."""
        return self.tail.keys(self.start, self.end)

    @property
    def values(self) -> torch.Tensor:
        """Their values `(B, H, w, D)` (a view)."""
        return self.tail.values(self.start, self.end)[..., :-1]

    @property
    def log_features(self) -> torch.Tensor:
        """Their key log-features `(B, H, w, S)`, `-inf` for padding and sinks (a view)."""
        return self.tail.log_features(self.start, self.end)

    @property
    def mask(self) -> torch.Tensor:
        """`(B, w)` bool: True = real token that is not a sink (a view)."""
        return self.tail.mask[:, self.start : self.end]

    @property
    def masked(self) -> bool:
        """Whether `mask` may hold a False (if not, the window needs no mask)."""
        return self.tail.hidden > self.start

    def _tensors(self) -> list[torch.Tensor]:
        return [self.linear.kvz, self.linear.shift, *self.tail.rows(self.start, self.end), self.sink_keys,
                self.sink_values, self.sink_count]  # fmt: skip

    def _with(self, tensors: list[torch.Tensor], sinks_full: bool | None = None) -> WindowState:
        """A state with new tensors (as `_tensors`) in a new tail of the same capacity."""
        rows = tensors[2:6]  # keys, log-features, values with ones, mask
        tail = _Tail.of(rows, max(self.tail.capacity, rows[0].shape[2]), self.masked)
        return WindowState(LinearState(*tensors[:2]), tail, 0, rows[0].shape[2], *tensors[6:], sinks_full)

    @property
    def device(self) -> torch.device:
        return self.tail.tokens.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tail.tokens.dtype

    @property
    def batch_size(self) -> int:
        return self.tail.tokens.shape[0]

    def nbytes(self) -> int:
        """Bytes held by the state (the whole tail, which later states may share)."""
        tensors = [self.linear.kvz, self.linear.shift, self.tail.tokens, self.tail.mask, self.sink_keys, self.sink_values,
                   self.sink_count]  # fmt: skip
        return sum(t.numel() * t.element_size() for t in tensors)

    def index_select(self, index: torch.Tensor) -> WindowState:
        """The state of batch rows `index` (beam-search reordering, dropping finished rows)."""
        return self._with([t.index_select(0, index) for t in self._tensors()])

    def to(self, *args, **kwargs) -> WindowState:
        """As `torch.Tensor.to` (`state.to("cpu")`, `state.to(dtype)`): the mask and count keep their dtype; the
        state itself when nothing changes."""
        tensors = self._tensors()
        moved = [
            t.to(*args, **kwargs) if t.is_floating_point() else t.to(device=_device(args, kwargs, t)) for t in tensors
        ]
        if all(a is b for a, b in zip(moved, tensors)):
            return self
        return self._with(moved, self.sinks_full)

    def clone(self) -> WindowState:
        return self._with([t.clone() for t in self._tensors()], self.sinks_full)


def _device(args: tuple, kwargs: dict, t: torch.Tensor) -> torch.device:
    """The device among `Tensor.to` arguments (a dtype-only call keeps `t`'s device)."""
    for a in (*args, kwargs.get("device")):
        if isinstance(a, str | torch.device):
            return torch.device(a)
        if isinstance(a, torch.Tensor):
            return a.device
    return t.device


def empty_window_state(
    batch_size: int, num_heads: int, num_features: int, like: torch.Tensor, sinks: int = 0
) -> WindowState:
    """A state holding no token, for inputs like `like` `(..., D)` (dtype, device and `D`) and `G = sinks`."""
    D = like.shape[-1]
    tokens = like.new_zeros(batch_size, num_heads, 0, D)
    rows = [tokens, like.new_zeros(batch_size, num_heads, 0, num_features), _with_ones(tokens),
            torch.zeros(batch_size, 0, dtype=torch.bool, device=like.device)]  # fmt: skip
    return WindowState(
        LinearState.empty(batch_size, num_heads, num_features, like),
        _Tail.of(rows, 0, False),
        0,
        0,
        like.new_zeros(batch_size, num_heads, sinks, D),
        _with_ones(like.new_zeros(batch_size, num_heads, sinks, D)),
        torch.zeros(batch_size, dtype=torch.long, device=like.device),
        sinks == 0,
    )


def _capture_sinks(
    state: WindowState, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool, torch.Tensor | None]:
    """Sink slots (keys, values with ones), counts, whether all are full and the window mask `(B, n)` of new
    tokens `k`, `v` `(B, H, n, D)` with padding mask `mask` (None = all real): real tokens ranked `<= G` among a
    row's real tokens become sinks and leave the window/kernel parts (their mask turns False)."""
    sinks = state.sink_keys.shape[2]
    if state.sinks_full:  # every slot filled: nothing changes (decoding)
        return state.sink_keys, state.sink_values, state.sink_count, True, mask
    real = torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device) if mask is None else mask
    rank = state.sink_count[:, None] + real.long().cumsum(dim=1)  # 1-based rank of each new real token
    new = real & (rank <= sinks)
    sink_keys, sink_values = state.sink_keys, state.sink_values
    if bool(new.any()):
        rows, cols = new.nonzero(as_tuple=True)
        slots = rank[rows, cols] - 1
        sink_keys, sink_values = sink_keys.clone(), sink_values.clone()
        sink_keys[rows, :, slots] = k[rows, :, cols]
        sink_values[rows, :, slots, :-1] = v[rows, :, cols]
    count = state.sink_count + new.sum(dim=1)
    return sink_keys, sink_values, count, bool((count >= sinks).all()), real & ~new


def _absorb_one(state: LinearState, lk: torch.Tensor, v1: torch.Tensor) -> LinearState:
    """A new `LinearState` with one more token `lk` `(B, H, 1, S)` (`-inf` = not absorbed), `v1` `(B, H, 1, D + 1)`
    (value with a one): the single-token case of `LinearState.absorb` (the running max rises to the token's
    features)."""
    new = lk[:, :, 0]
    # the shift never goes below `_LOG_FLOOR`, so neither does their maximum
    shift = torch.maximum(state.shift, new.detach() if new.requires_grad else new)
    part = torch.exp(lk - shift[:, :, None]).transpose(-1, -2) * v1  # (B, H, S, D + 1)
    return LinearState(torch.addcmul(part, state.kvz, torch.exp(state.shift - shift)[..., None]), shift)


def _absorbed(state: LinearState, lks: torch.Tensor, values1: torch.Tensor) -> LinearState:
    """`state` with the tokens `lks` `(B, H, n, S)` (`-inf` = not absorbed) and values with ones added."""
    if lks.shape[2] == 1:  # decoding: one token leaves the window per step
        return _absorb_one(state, lks, values1)
    # `LinearState.absorb` rebinds its tensors (never writes them in place): a shallow copy leaves `state` intact
    linear = LinearState(state.kvz, state.shift)
    if lks.shape[2]:
        linear.absorb(lks, values1[..., :-1])
    return linear


def _appended(state: WindowState, rows: list[torch.Tensor | None], window: int) -> tuple[_Tail, int, int]:
    """The tail holding the state's rows then new rows `[k, lk, v, mask]` (`(B, H, n, .)`, mask `(B, n)` or None =
    all True) and the span `(start, end)` of them all: in place when the state owns the tail's end (`_Tail`)."""
    k, lk, v, mask = rows
    tail, start, end, n = state.tail, state.start, state.end, k.shape[2]
    if records_grad(k, lk, v, tail.tokens):  # a new tail, so that no tensor a graph saved is written
        joined = [torch.cat([a, b], dim=2) for a, b in zip(tail.rows(start, end)[:3], (k, lk, _with_ones(v)))]
        new_mask = torch.ones(k.shape[0], n, dtype=torch.bool, device=k.device) if mask is None else mask
        joined.append(torch.cat([tail.mask[:, start:end], new_mask], dim=1))
        return _Tail.of(joined, max(2 * window, end - start + n), True), 0, end - start + n
    if tail.length != end or end + n > tail.capacity:
        tail = _Tail.of(tail.rows(start, end), max(2 * window, end - start + n), state.masked)
        start, end = 0, end - start
    tail.write(end, k, lk, v, mask)
    return tail, start, end + n


def window_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    state: WindowState | None,
    scale: float,
    window: int,
    maps: WindowMaps,
    sinks: int = 0,
) -> tuple[torch.Tensor, WindowState]:
    """Causal window hybrid for `n` new tokens `(B, H, n, D)` given the state of the earlier ones.

    `n <= W` runs directly on the buffer and the sinks (`O(n (W + G + n) D + n S D)`); a longer input takes the
    blocked path (a prompt, or any input without sinks: the buffer in front, the kernel state as prefix) or, with
    sinks and an earlier state, chunks of `W` tokens. Returns the output and the new state; `state` is left intact.
    """
    B, H, n, _ = q.shape
    fresh = state is None
    state = state or empty_window_state(B, H, maps.num_features, v, sinks)
    if n > window and sinks and not fresh:
        outs = []
        for start in range(0, n, window):
            part = slice(start, start + window)
            out, state = window_step(q[:, :, part], k[:, :, part], v[:, :, part], None if mask is None else
                                     mask[:, part], state, scale, window, maps, sinks)  # fmt: skip
            outs.append(out)
        return torch.cat(outs, dim=2), state
    sink_keys, sink_values, sink_count, full, kept = _capture_sinks(state, k, v, mask)
    lk = _mask_keys(maps.key(k), kept)  # padding and new sinks never enter the kernel statistics
    if n > window:
        out = _long_output(q, k, v, mask, state, scale, window, maps, None if fresh else state.linear, sinks)
        tail, start, end = _appended(state, [k, lk, v, kept], window)
        leaving = end - start - (window - 1)
        linear = _absorbed(
            state.linear, tail.log_features(start, start + leaving), tail.values(start, start + leaving)
        )
        rows = tail.rows(start + leaving, end)
        tail = _Tail.of(rows, 2 * window, not bool(rows[-1].all()))
        return out, WindowState(linear, tail, 0, window - 1, sink_keys, sink_values, sink_count, full)
    tail, start, end = _appended(state, [k, lk, v, kept], window)
    key_mask = None
    if kept is not mask:  # new sinks: in this step they are window keys of the later new queries
        key_mask = torch.cat([tail.mask[:, start : end - n], torch.ones_like(kept) if mask is None else mask], 1)
    elif tail.hidden > start:
        key_mask = tail.mask[:, start:end]
    qs, lq = q * scale, maps.query(q)
    leaving = max(end - start - (window - 1), 0)
    if n == 1:
        rows, D = tail.tokens[:, :, start:end], tail.D
        out = _decode_output(qs, lq, rows[..., :D], rows[..., D + tail.S :], key_mask, state)
        gone = rows[:, :, :leaving]
        linear = _absorbed(state.linear, gone[..., D : D + tail.S], gone[..., D + tail.S :])
    else:
        out = _step_output(qs, lq, tail.rows(start, end)[:3], key_mask, state, window)
        gone = [tail.log_features(start, start + leaving), tail.values(start, start + leaving)]
        linear = _absorbed(state.linear, *gone)
    return out, WindowState(linear, tail, start + leaving, end, sink_keys, sink_values, sink_count, full)


def _long_output(q, k, v, mask, state: WindowState, scale, window, maps, prefix, sinks) -> torch.Tensor:
    """Output of `n > W` new tokens: the blocked path over the buffered tokens then the new ones."""
    keys, values = torch.cat([state.keys, k], dim=2), torch.cat([state.values, v], dim=2)
    key_mask = None
    if mask is not None or state.masked:
        new = torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device) if mask is None else mask
        key_mask = torch.cat([state.mask, new], dim=1)
    return windowed_attention(q, keys, values, key_mask, True, scale, window, maps, prefix, sinks=sinks)


def _sink_logits(qs: torch.Tensor, state: WindowState) -> torch.Tensor:
    """Logits `(B, H, n, G)` of queries `qs` (scaled) on the sinks captured before this step (`-inf` on empty slots)."""
    logits = qs @ state.sink_keys.transpose(-1, -2)
    if state.sinks_full:
        return logits
    filled = torch.arange(state.sink_keys.shape[2], device=qs.device) < state.sink_count[:, None]  # (B, G)
    return logits.masked_fill(~filled[:, None, None], -torch.inf)


def _decode_output(
    qs: torch.Tensor,
    lq: torch.Tensor,
    keys: torch.Tensor,
    values1: torch.Tensor,
    key_mask: torch.Tensor | None,
    state: WindowState,
) -> torch.Tensor:
    """Output `(B, H, 1, D)` of one new query (`qs` scaled, `lq` log-features `(B, H, 1, S)`) whose window holds
    every key `(B, H, m, D)` (`m <= W`; values with ones, `key_mask` `(B, m)`, None = all real), plus the sinks
    and the kernel state. The window, kernel and sink logits go through one row: one max, one `exp`."""
    m, S = keys.shape[2], lq.shape[-1]
    exact = qs @ keys.transpose(-1, -2)
    if key_mask is not None:
        exact = exact.masked_fill(~key_mask[:, None, None, :], -torch.inf)
    parts = [exact, lq + state.linear.shift[:, :, None, :]]
    if state.sink_keys.shape[2]:
        parts.append(_sink_logits(qs, state))
    logits = torch.cat(parts, dim=-1)  # (B, H, 1, m + S + G)
    grad = records_grad(logits)
    top = (logits.detach() if grad else logits).amax(dim=-1, keepdim=True)
    if key_mask is not None:  # else the query's own key bounds `top` from below
        top = top.clamp_min_(_LOG_FLOOR)
    weights = torch.exp(logits - top) if grad else logits.sub_(top).exp_()
    out = weights[..., :m] @ values1 + weights[..., m : m + S] @ state.linear.kvz
    if state.sink_keys.shape[2]:
        out = out + weights[..., m + S :] @ state.sink_values
    if key_mask is not None:
        return _normalise(out)
    # a real query sees its own key: the largest term has weight 1 and count 1, so the denominator is >= 1
    return out[..., :-1] / out[..., -1:]


def _step_output(
    qs: torch.Tensor,
    lq: torch.Tensor,
    joined: list[torch.Tensor],
    key_mask: torch.Tensor | None,
    state: WindowState,
    window: int,
) -> torch.Tensor:
    """Output `(B, H, n, D)` of `1 < n <= W` new queries (`qs` scaled, `lq` log-features) over the buffer joined
    with the new tokens (`m = w + n` keys, log-features, values with ones; `key_mask` `(B, m)`, None = all real),
    the sinks captured before this step and the kernel state, as in `_group`.

    (New sinks are inside every later new query's window, as `n <= W`; log-features of keys left of a window are
    `-inf` for padding and sinks.)"""
    keys, lks, values1 = joined
    n, m = qs.shape[2], keys.shape[2]
    inplace = not records_grad(qs, lq, keys, values1, lks)
    exact = qs @ keys.transpose(-1, -2)
    query_pos = torch.arange(m - n, m, device=qs.device)[:, None]
    key_pos = torch.arange(m, device=qs.device)
    hidden = ~((key_pos <= query_pos) & (key_pos > query_pos - window))  # (n, m)
    if key_mask is not None:
        hidden = hidden | ~key_mask[:, None, None, :]
    exact = exact.masked_fill_(hidden, -torch.inf) if inplace else exact.masked_fill(hidden, -torch.inf)
    far = lq + state.linear.shift[:, :, None, :]
    top = torch.maximum(exact.detach().amax(dim=-1), far.detach().amax(dim=-1))
    Mk = max(m - window, 0)  # keys that may be left of a new query's window
    if Mk:
        lkn = lks[:, :, :Mk]
        c = lkn.detach().amax(dim=2).clamp_min(_LOG_FLOOR)  # (B, H, S)
        near = lq + c[:, :, None, :]
        top = torch.maximum(top, near.detach().amax(dim=-1))
    if state.sink_keys.shape[2]:
        sink_logits = _sink_logits(qs, state)
        top = torch.maximum(top, sink_logits.detach().amax(dim=-1))
    top = top.clamp_min(_LOG_FLOOR)[..., None]  # (B, H, n, 1)
    weights = exact.sub_(top).exp_() if inplace else torch.exp(exact - top)
    if Mk:
        kernel = torch.exp(near - top) @ torch.exp(lkn - c[:, :, None, :]).transpose(-1, -2)
        left = (key_pos[:Mk] <= query_pos - window).to(qs.dtype)  # (n, Mk)
        weights = torch.cat([weights[..., :Mk] + kernel * left, weights[..., Mk:]], dim=-1)
    out = weights @ values1 + torch.exp(far - top) @ state.linear.kvz
    if state.sink_keys.shape[2]:
        out = out + torch.exp(sink_logits - top) @ state.sink_values
    return _normalise(out)
