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

**Blocked form.** Keys are cut into blocks of `T >= W` positions from position 0, the block layout of EVA
(`blocks`, shared with `eva.py`). A query of block `b` has its window inside blocks `b - 1 .. b + 1`; those `3T`
*near* keys get one `T x 3T` logit matrix (exact logits inside the window, kernel logits
`log phi(q).phi(k)` outside it), computed with per-row and per-key max shifts as in `linear.py`. Keys of blocks
`< b - 1` (and `> b + 1` when bidirectional) come from the exclusive prefix (suffix) sums of per-block statistics
`phi(K_b)^T [V_b, 1]`, kept relative to a running per-feature max shift (`linear._rescaled_prefix`), and a
`LinearState` of earlier tokens (decoding) joins the prefix. The three parts are merged under one detached
row max. Cost `O(N (3T D + 3T S + S D))`, memory `O(N (T + S + D) + (N / T) S D)`: no `N x N` tensor.

**Decoding** (`WindowState`): the last `W - 1` keys, values and key log-features in a buffer plus the `LinearState`
of the keys that left the window; a step costs `O(W D + S D)` and memory stays constant.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .linear import (
    _LOG_FLOOR,
    LinearState,
    _mask_keys,
    _normalise,
    _rescaled_prefix,
    _scanned_prefix,
    _tiny,
    _with_ones,
)

#: smallest block length of the blocked path (short windows would make the block statistics many and tiny)
MIN_BLOCK = 16


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


def _near(x: torch.Tensor, block: int, num_blocks: int) -> torch.Tensor:
    """Blocks `b - 1, b, b + 1` side by side: `(B, H, N, ...)` -> `(B, H, num_blocks, 3 block, ...)`."""
    padded = blocks(x, block, (num_blocks + 2) * block, block)
    return torch.cat([padded[:, :, :-2], padded[:, :, 1:-1], padded[:, :, 2:]], dim=3)


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


def _kernel_logits(lq: torch.Tensor, lk: torch.Tensor) -> torch.Tensor:
    """`log sum_s exp(lq_is + lk_js)` `(..., n, m)` by one GEMM of max-shifted features (see `linear.py`)."""
    e = lq.detach().amax(dim=-1, keepdim=True)
    m = lk.detach().amax(dim=-1, keepdim=True)
    products = torch.exp(lq - e) @ torch.exp(lk - m).transpose(-1, -2)
    return torch.log(products.clamp_min(_tiny(products.dtype))) + e + m.transpose(-1, -2)


def _state_read(lq: torch.Tensor, kvz: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`sum_s exp(lq_s + shift_s) kvz_s` as `(exp(-c) * value, c)`: `lq` `(..., n, S)`, `kvz` `(..., S, D + 1)`."""
    a = lq + shift[..., None, :]
    c = a.detach().amax(dim=-1)
    return torch.exp(a - c[..., None]) @ kvz, c


def _combine(logits: torch.Tensor, v1: torch.Tensor, far: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Normalised `[exp(logits) @ v1 + sum_far exp(c) part]`, all under one detached row max, `(..., n, D)`."""
    top = logits.detach().amax(dim=-1)
    for _, c in far:
        top = torch.maximum(top, c)
    top = top.clamp_min(_LOG_FLOOR)
    out = torch.exp(logits - top[..., None]) @ v1
    for part, c in far:
        out = out + torch.exp(c - top)[..., None] * part
    return _normalise(out)


def _near_logits(
    q: torch.Tensor,
    kn: torch.Tensor,
    lq: torch.Tensor,
    lkn: torch.Tensor,
    in_window: torch.Tensor,
    linear: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Exact logits inside the window, kernel logits on `linear`, `-inf` elsewhere: `(..., n, m)`."""
    exact = (q @ kn.transpose(-1, -2)) * scale
    logits = exact.masked_fill(~in_window, float("-inf"))
    return torch.where(linear, _kernel_logits(lq, lkn), logits)


def _block_statistics(
    lk: torch.Tensor, v: torch.Tensor, block: int, num_blocks: int, state: LinearState, reverse: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exclusive prefix sums of `phi(K_b)^T [V_b, 1]` over key blocks (suffix sums if `reverse`).

    Returns `prior` `(B, H, nB, S, D + 1)` (statistics of `state` and the blocks before `b`, or after `b`) relative
    to the running max `(B, H, nB, S)` up to block `b`.
    """
    lkb = blocks(lk, 0, num_blocks * block, block)  # padding rows: lk = 0 and v = 0 are masked below
    valid = (torch.arange(num_blocks * block, device=lk.device) < lk.shape[2]).reshape(num_blocks, block, 1)
    lkb = lkb.masked_fill(~valid, float("-inf"))
    v1 = blocks(_with_ones(v), 0, num_blocks * block, block)
    if reverse:
        lkb, v1 = lkb.flip(2), v1.flip(2)
    chunk_max = lkb.detach().amax(dim=3)
    running = torch.cummax(torch.maximum(chunk_max, state.shift[:, :, None]), dim=2).values.clamp_min(_LOG_FLOOR)
    delta = torch.exp(lkb - running[:, :, :, None]).transpose(-1, -2) @ v1
    prefix = _rescaled_prefix(delta, running, state)
    prior, _ = prefix if prefix is not None else _scanned_prefix(delta, running, state)
    return (prior.flip(2), running.flip(2)) if reverse else (prior, running)


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
        block_size (`int`, *optional*): block length `T` (at least `W`; default `max(W, 16)`).

    Returns:
        `torch.Tensor` of shape `(B, H, Nq, D)`.
    """
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    T = max(block_size or MIN_BLOCK, window)
    nB = -(-Nk // T)
    lk = maps.key(k)
    S = lk.shape[-1]
    empty = LinearState.empty(B, H, S, v)
    left, left_shift = _block_statistics(_mask_keys(lk, key_mask), v, T, nB, state or empty, False)
    if not causal:
        right, right_shift = _block_statistics(_mask_keys(lk, key_mask), v, T, nB, empty, True)
    # far statistics of block b: prefix before b - 1 (entry b - 1; the state alone for b = 0), suffix after b + 1
    left = torch.cat([(state or empty).kvz[:, :, None], left[:, :, :-1]], dim=2)
    left_shift = torch.cat([(state or empty).shift[:, :, None], left_shift[:, :, :-1]], dim=2)
    if not causal:
        right = F.pad(right[:, :, 1:], (0, 0, 0, 0, 0, 1))
        right_shift = F.pad(right_shift[:, :, 1:], (0, 0, 0, 1), value=_LOG_FLOOR)

    first = (Nk - Nq) // T  # first block holding a query
    nQ = nB - first
    qb = blocks(q, Nk - Nq - first * T, nQ * T, T)  # (B, H, nQ, T, D)
    lqb = maps.query(qb.flatten(2, 3)).unflatten(2, (nQ, T))
    kn, vn1, lkn = (_near(x, T, nB)[:, :, first:] for x in (k, _with_ones(v), lk))
    device = q.device
    query_pos = (first + torch.arange(nQ, device=device))[:, None] * T + torch.arange(T, device=device)  # (nQ, T)
    key_pos = (first - 1 + torch.arange(nQ, device=device))[:, None] * T + torch.arange(3 * T, device=device)
    real = ((key_pos >= 0) & (key_pos < Nk))[None]  # (1, nQ, 3T)
    if key_mask is not None:
        real = real & (_near(key_mask[:, None, :, None].to(q.dtype), T, nB)[:, 0, first:, :, 0] > 0.5)
    lo = window_bounds(query_pos, key_mask, Nk, window, causal)[..., None]  # (B or 1, nQ, T, 1)
    kp = key_pos[None, :, None, :]
    in_window = real[:, :, None, :] & (kp >= lo) & (kp < lo + window)
    linear = real[:, :, None, :] & ~in_window
    if causal:
        causal_ok = kp <= query_pos[None, :, :, None]
        in_window, linear = in_window & causal_ok, linear & causal_ok
    in_window, linear = in_window[:, None], linear[:, None]  # (B or 1, 1, nQ, T, 3T)

    logits = _near_logits(qb, kn, lqb, lkn, in_window, linear, scale)
    far = [_state_read(lqb, left[:, :, first:], left_shift[:, :, first:])]
    if not causal:
        far.append(_state_read(lqb, right[:, :, first:], right_shift[:, :, first:]))
    out = _combine(logits, vn1, far).reshape(B, H, nQ * T, D)
    start = Nk - Nq - first * T
    return out[:, :, start : start + Nq]


@dataclass
class WindowState:
    """Decoding state of a window hybrid: the last `W - 1` tokens exactly plus the kernel state of the others.

    Constant size: `(W - 1) (2 D + S) + S (D + 2)` numbers per (batch, head) plus a `(B, W - 1)` mask.

    Attributes:
        linear (`LinearState`): kernel statistics of the tokens that left the window.
        keys, values (`torch.Tensor` of shape `(B, H, w, D)`): the last `w <= W - 1` tokens (raw keys).
        log_features (`torch.Tensor` of shape `(B, H, w, S)`): their key log-features.
        mask (`torch.Tensor` of shape `(B, w)`, bool): True = real token.
    """

    linear: LinearState
    keys: torch.Tensor
    values: torch.Tensor
    log_features: torch.Tensor
    mask: torch.Tensor

    def _tensors(self) -> list[torch.Tensor]:
        return [self.linear.kvz, self.linear.shift, self.keys, self.values, self.log_features, self.mask]

    @property
    def device(self) -> torch.device:
        return self.keys.device

    @property
    def batch_size(self) -> int:
        return self.keys.shape[0]

    def nbytes(self) -> int:
        """Bytes held by the state."""
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def index_select(self, index: torch.Tensor) -> WindowState:
        """The state of batch rows `index` (beam-search reordering, dropping finished rows)."""
        picked = [t.index_select(0, index) for t in self._tensors()]
        return WindowState(LinearState(*picked[:2]), *picked[2:])

    def to(self, *args, **kwargs) -> WindowState:
        """A copy on another device (`state.to("cpu")`), as `torch.Tensor.to`; the mask stays bool."""
        moved = [
            t.to(*args, **kwargs) if t.is_floating_point() else t.to(device=_device(args, kwargs, t))
            for t in self._tensors()
        ]
        return WindowState(LinearState(*moved[:2]), *moved[2:])

    def clone(self) -> WindowState:
        return WindowState(self.linear.clone(), *(t.clone() for t in self._tensors()[2:]))


def _device(args: tuple, kwargs: dict, t: torch.Tensor) -> torch.device:
    """The device among `Tensor.to` arguments (a dtype-only call keeps `t`'s device)."""
    for a in (*args, kwargs.get("device")):
        if isinstance(a, str | torch.device):
            return torch.device(a)
        if isinstance(a, torch.Tensor):
            return a.device
    return t.device


def empty_window_state(batch_size: int, num_heads: int, num_features: int, like: torch.Tensor) -> WindowState:
    """A state holding no token, for inputs like `like` `(..., D)` (dtype, device and `D`)."""
    D = like.shape[-1]
    tokens = like.new_zeros(batch_size, num_heads, 0, D)
    return WindowState(
        LinearState.empty(batch_size, num_heads, num_features, like),
        tokens,
        tokens.clone(),
        like.new_zeros(batch_size, num_heads, 0, num_features),
        torch.zeros(batch_size, 0, dtype=torch.bool, device=like.device),
    )


def advance(
    state: WindowState, k: torch.Tensor, v: torch.Tensor, lk: torch.Tensor, mask: torch.Tensor, window: int
) -> WindowState:
    """The state after tokens `k`, `v` `(B, H, n, D)` with log-features `lk` and mask `(B, n)`: the last `W - 1`
    tokens stay in the buffer, the older ones are absorbed into the kernel statistics."""
    keys, values = torch.cat([state.keys, k], dim=2), torch.cat([state.values, v], dim=2)
    lks, masks = torch.cat([state.log_features, lk], dim=2), torch.cat([state.mask, mask], dim=1)
    leaving = max(keys.shape[2] - (window - 1), 0)
    linear = state.linear.clone()
    if leaving:
        linear.absorb(lks[:, :, :leaving], values[:, :, :leaving], masks[:, :leaving])
    return WindowState(linear, keys[:, :, leaving:], values[:, :, leaving:], lks[:, :, leaving:], masks[:, leaving:])


def window_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    state: WindowState | None,
    scale: float,
    window: int,
    maps: WindowMaps,
) -> tuple[torch.Tensor, WindowState]:
    """Causal window hybrid for `n` new tokens `(B, H, n, D)` given the state of the earlier ones.

    `n <= W` runs directly on the buffer (`O(n (W + n) D + n S D)`); longer inputs (a prompt) take the blocked
    path with the buffer in front and the kernel state as prefix. Returns the output and the new state.
    """
    B, H, n, _ = q.shape
    state = state or empty_window_state(B, H, maps.num_features, v)
    mask = torch.ones(B, n, dtype=torch.bool, device=q.device) if mask is None else mask
    keys, values = torch.cat([state.keys, k], dim=2), torch.cat([state.values, v], dim=2)
    key_mask = torch.cat([state.mask, mask], dim=1)
    lk = maps.key(k)
    if n > window:
        out = windowed_attention(q, keys, values, key_mask, True, scale, window, maps, state.linear)
        return out, advance(state, k, v, lk, mask, window)
    w = state.keys.shape[2]
    lq = maps.query(q)
    lks = torch.cat([state.log_features, lk], dim=2)
    query_pos = torch.arange(w, w + n, device=q.device)[:, None]
    key_pos = torch.arange(w + n, device=q.device)[None, :]
    seen = key_mask[:, None, None, :] & (key_pos <= query_pos)  # (B, 1, n, w + n)
    in_window = seen & (key_pos > query_pos - window)
    logits = (q @ keys.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~in_window, float("-inf"))
    if w + n > window:  # some buffered keys are outside the window of the first new queries
        logits = torch.where(seen & ~in_window, _kernel_logits(lq, lks), logits)
    far = [_state_read(lq, state.linear.kvz, state.linear.shift)]
    out = _combine(logits, _with_ones(values), far)
    return out, advance(state, k, v, lk, mask, window)
