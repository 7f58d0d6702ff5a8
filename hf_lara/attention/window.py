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
(`blocks`, shared with `eva.py`). A query of block `b` has its window inside blocks `b - 1 .. b + 1` (causal: `b - 1, b`);
those `3T` (`2T`) *near* keys get one `T x 3T` (`T x 2T`) logit matrix (exact logits inside the window, kernel logits
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


def _near(x: torch.Tensor, block: int, num_blocks: int, causal: bool = False) -> torch.Tensor:
    """Blocks `b - 1, b, b + 1` side by side (`b - 1, b` if `causal`: block `b + 1` is all future):
    `(B, H, N, ...)` -> `(B, H, num_blocks, 3 block or 2 block, ...)`."""
    padded = blocks(x, block, (num_blocks + 2) * block, block)
    parts = [padded[:, :, :-2], padded[:, :, 1:-1]] + ([] if causal else [padded[:, :, 2:]])
    return torch.cat(parts, dim=3)


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


def _inference(*tensors: torch.Tensor) -> bool:
    """True when no gradient is recorded for `tensors`: the in-place fast paths may run."""
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def _combine(
    exact: list[tuple[torch.Tensor, torch.Tensor]], far: list[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """Normalised `[sum_exact exp(logits) @ v1 + sum_far exp(c) part]`, all under one detached row max,
    `(..., n, D)`. `exact` holds `(logits (..., n, m), v1 (..., m, D + 1))` pairs; without autograd the logits
    are overwritten (exponentiated in place)."""
    top = None
    for logits, _ in exact:
        row = logits.detach().amax(dim=-1)
        top = row if top is None else torch.maximum(top, row)
    for _, c in far:
        top = torch.maximum(top, c)
    top = top.clamp_min(_LOG_FLOOR)
    out = None
    for logits, v1 in exact:
        if _inference(logits, v1):
            weights = logits.sub_(top[..., None]).exp_()
        else:
            weights = torch.exp(logits - top[..., None])
        out = weights @ v1 if out is None else out + weights @ v1
    for part, c in far:
        out = out + torch.exp(c - top)[..., None] * part
    return _normalise(out)


def _near_logits(
    q: torch.Tensor,
    kn: torch.Tensor,
    lq: torch.Tensor,
    lkn: torch.Tensor,
    in_window: torch.Tensor,
    dead: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Exact logits on `in_window`, `-inf` on `dead`, kernel logits elsewhere: `(..., n, m)` (autograd path)."""
    exact = (q @ kn.transpose(-1, -2)) * scale
    return torch.where(in_window, exact, _kernel_logits(lq, lkn)).masked_fill(dead, float("-inf"))


def _near_logits_inplace(
    q: torch.Tensor,
    kn: torch.Tensor,
    lq: torch.Tensor,
    fkn: torch.Tensor,
    mn: torch.Tensor,
    in_window: torch.Tensor,
    dead: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """`_near_logits` without autograd, in one `(..., n, m)` buffer written in place: the kernel logits, then the
    exact ones where `in_window`, then `-inf` where `dead`. The keys come as `fkn = exp(lk - mn)` and their shift
    `mn` `(..., m, 1)`, computed once per key rather than once per near block. The masks are applied as float
    tensors (`lerp_` by a 0/1 weight, `add_` of a 0/-inf bias): CPU kernels with a broadcast bool mask
    (`where`, `masked_fill_`) run about ten times slower than these."""
    e = lq.amax(dim=-1, keepdim=True)
    logits = torch.exp(lq - e) @ fkn.transpose(-1, -2)
    # clamped as in `_kernel_logits`: finite logits, so that `lerp_` with weight 0 keeps them exactly
    logits.clamp_min_(_tiny(logits.dtype)).log_().add_(e).add_(mn.transpose(-1, -2))  # as `_kernel_logits`
    exact = (q @ kn.transpose(-1, -2)).mul_(scale)
    logits.lerp_(exact, in_window.to(logits.dtype))  # weight 1 gives `exact` exactly, weight 0 the kernel logit
    return logits.add_(
        torch.zeros(dead.shape, dtype=logits.dtype, device=logits.device).masked_fill_(dead, -torch.inf)
    )


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
        block_size (`int`, *optional*): block length `T` (at least `W`; default `max(W, 16)`).
        sinks (`int`, *optional*, defaults to 0): `G`; the first `G` real keys (bidirectional: and the last `G`) are
            attended exactly by every query that may see them (`sink_positions`); not with `state`.

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
    bounds_mask = key_mask
    if sinks:
        sink_pos, sink_ok = sink_positions(key_mask, B, Nk, sinks, causal, q.device)
        is_sink = ((torch.arange(Nk, device=q.device) == sink_pos[..., None]) & sink_ok[..., None]).any(1)
        # sink keys leave the window and the kernel part: they are attended exactly, once
        key_mask = ~is_sink if key_mask is None else key_mask & ~is_sink
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
    M = (2 if causal else 3) * T  # near keys of a block
    kn, vn1 = (_near(x, T, nB, causal)[:, :, first:] for x in (k, _with_ones(v)))
    device = q.device
    query_pos = (first + torch.arange(nQ, device=device))[:, None] * T + torch.arange(T, device=device)  # (nQ, T)
    key_pos = (first - 1 + torch.arange(nQ, device=device))[:, None] * T + torch.arange(M, device=device)
    real = ((key_pos >= 0) & (key_pos < Nk))[None]  # (1, nQ, M)
    if key_mask is not None:
        real = real & (_near(key_mask[:, None, :, None].to(q.dtype), T, nB, causal)[:, 0, first:, :, 0] > 0.5)
    lo = window_bounds(query_pos, bounds_mask, Nk, window, causal)[..., None]  # (B or 1, nQ, T, 1)
    kp = key_pos[None, :, None, :]
    # the pattern depends on positions only (and on B with a key mask): built once, shared by the heads
    in_window = real[:, :, None, :] & (kp >= lo) & (kp < lo + window)
    dead = ~real[:, :, None, :]
    if causal:
        causal_ok = kp <= query_pos[None, :, :, None]
        in_window, dead = in_window & causal_ok, dead | ~causal_ok
    in_window, dead = in_window[:, None], dead[:, None]  # (B or 1, 1, nQ, T, M)

    if _inference(q, k, lqb, lk):
        m = lk.amax(dim=-1, keepdim=True)
        fkn, mn = (_near(x, T, nB, causal)[:, :, first:] for x in (torch.exp(lk - m), m))
        exact = [(_near_logits_inplace(qb, kn, lqb, fkn, mn, in_window, dead, scale), vn1)]
    else:
        lkn = _near(lk, T, nB, causal)[:, :, first:]
        exact = [(_near_logits(qb, kn, lqb, lkn, in_window, dead, scale), vn1)]
    if sinks:
        # the few sink keys get their own small GEMM (no concatenation with the near keys)
        index = sink_pos[:, None, :, None].expand(B, H, -1, D)
        ks, vs1 = k.gather(2, index), _with_ones(v.gather(2, index))  # (B, H, G2, D), (B, H, G2, D + 1)
        seen = sink_ok[:, None, :, None]  # (B, 1, G2, 1) against (B, H, G2, nQ T)
        if causal:
            seen = seen & (sink_pos[:, None, :, None] <= query_pos.reshape(1, 1, 1, -1))
        sink_logits = (ks @ (qb.flatten(2, 3) * scale).transpose(-1, -2)).masked_fill(~seen, float("-inf"))
        exact.append((sink_logits.transpose(-1, -2).unflatten(2, (nQ, T)), vs1[:, :, None]))
    far = [_state_read(lqb, left[:, :, first:], left_shift[:, :, first:])]
    if not causal:
        far.append(_state_read(lqb, right[:, :, first:], right_shift[:, :, first:]))
    out = _combine(exact, far).reshape(B, H, nQ * T, D)
    start = Nk - Nq - first * T
    return out[:, :, start : start + Nq]


@dataclass
class WindowState:
    """Decoding state of a window hybrid: the last `W - 1` tokens and the sinks exactly, plus the kernel state of
    the others.

    Constant size: `(W - 1) (2 D + S) + 2 G D + S (D + 2)` numbers per (batch, head) plus a `(B, W - 1)` mask and a
    `(B,)` count.

    Attributes:
        linear (`LinearState`): kernel statistics of the tokens that left the window (sinks excluded).
        keys, values (`torch.Tensor` of shape `(B, H, w, D)`): the last `w <= W - 1` tokens (raw keys).
        log_features (`torch.Tensor` of shape `(B, H, w, S)`): their key log-features.
        mask (`torch.Tensor` of shape `(B, w)`, bool): True = real token that is not a sink.
        sink_keys, sink_values (`torch.Tensor` of shape `(B, H, G, D)`): the first `G` real tokens of each row.
        sink_count (`torch.Tensor` of shape `(B,)`, long): how many of the `G` slots are filled.
    """

    linear: LinearState
    keys: torch.Tensor
    values: torch.Tensor
    log_features: torch.Tensor
    mask: torch.Tensor
    sink_keys: torch.Tensor
    sink_values: torch.Tensor
    sink_count: torch.Tensor

    def _tensors(self) -> list[torch.Tensor]:
        return [
            self.linear.kvz, self.linear.shift, self.keys, self.values, self.log_features, self.mask,
            self.sink_keys, self.sink_values, self.sink_count,
        ]  # fmt: skip

    @classmethod
    def _from(cls, tensors: list[torch.Tensor]) -> WindowState:
        return cls(LinearState(*tensors[:2]), *tensors[2:])

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
        return self._from([t.index_select(0, index) for t in self._tensors()])

    def to(self, *args, **kwargs) -> WindowState:
        """A copy on another device (`state.to("cpu")`), as `torch.Tensor.to`; the mask and count keep their dtype."""
        return self._from([
            t.to(*args, **kwargs) if t.is_floating_point() else t.to(device=_device(args, kwargs, t))
            for t in self._tensors()
        ])  # fmt: skip

    def clone(self) -> WindowState:
        return self._from([t.clone() for t in self._tensors()])


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
    return WindowState(
        LinearState.empty(batch_size, num_heads, num_features, like),
        tokens,
        tokens.clone(),
        like.new_zeros(batch_size, num_heads, 0, num_features),
        torch.zeros(batch_size, 0, dtype=torch.bool, device=like.device),
        like.new_zeros(batch_size, num_heads, sinks, D),
        like.new_zeros(batch_size, num_heads, sinks, D),
        torch.zeros(batch_size, dtype=torch.long, device=like.device),
    )


def _capture_sinks(
    state: WindowState, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sink slots, counts and the buffer mask after new tokens: real tokens ranked `<= G` among a row's real
    tokens become sinks and leave the window/kernel parts (their mask turns False)."""
    sinks = state.sink_keys.shape[2]
    if not sinks or bool((state.sink_count >= sinks).all()):  # every slot filled: nothing changes (decoding)
        return state.sink_keys, state.sink_values, state.sink_count, mask
    rank = state.sink_count[:, None] + mask.long().cumsum(dim=1)  # 1-based rank of each new real token
    new = mask & (rank <= sinks)
    sink_keys, sink_values = state.sink_keys, state.sink_values
    if bool(new.any()):
        rows, cols = new.nonzero(as_tuple=True)
        slots = rank[rows, cols] - 1
        sink_keys, sink_values = sink_keys.clone(), sink_values.clone()
        sink_keys[rows, :, slots] = k[rows, :, cols]
        sink_values[rows, :, slots] = v[rows, :, cols]
    return sink_keys, sink_values, state.sink_count + new.sum(dim=1), mask & ~new


def advance(
    state: WindowState, k: torch.Tensor, v: torch.Tensor, lk: torch.Tensor, mask: torch.Tensor, window: int
) -> WindowState:
    """The state after tokens `k`, `v` `(B, H, n, D)` with log-features `lk` and mask `(B, n)`: sinks go to their
    slots, the last `W - 1` tokens stay in the buffer, the older ones are absorbed into the kernel statistics."""
    keys, values = torch.cat([state.keys, k], dim=2), torch.cat([state.values, v], dim=2)
    lks, masks = torch.cat([state.log_features, lk], dim=2), torch.cat([state.mask, mask], dim=1)
    return _advance(state, k, v, mask, (keys, values, lks, masks), window)


def _advance(
    state: WindowState,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    joined: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    window: int,
) -> WindowState:
    """`advance` given the buffer joined with the new tokens (`keys`, `values`, `log_features`, `mask`)."""
    keys, values, lks, masks = joined
    sink_keys, sink_values, sink_count, kept_mask = _capture_sinks(state, k, v, mask)
    if kept_mask is not mask:
        masks = torch.cat([state.mask, kept_mask], dim=1)
    leaving = max(keys.shape[2] - (window - 1), 0)
    # `LinearState.absorb` rebinds its tensors (never writes them in place): a shallow copy leaves `state` intact
    linear = LinearState(state.linear.kvz, state.linear.shift)
    if leaving:
        linear.absorb(lks[:, :, :leaving], values[:, :, :leaving], masks[:, :leaving])
    kept = keys[:, :, leaving:], values[:, :, leaving:], lks[:, :, leaving:], masks[:, leaving:]
    return WindowState(linear, *kept, sink_keys, sink_values, sink_count)


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
    sinks and an earlier state, chunks of `W` tokens. Returns the output and the new state.
    """
    B, H, n, _ = q.shape
    fresh = state is None
    state = state or empty_window_state(B, H, maps.num_features, v, sinks)
    mask = torch.ones(B, n, dtype=torch.bool, device=q.device) if mask is None else mask
    if n > window and sinks and not fresh:
        outs = []
        for start in range(0, n, window):
            part = slice(start, start + window)
            out, state = window_step(q[:, :, part], k[:, :, part], v[:, :, part], mask[:, part], state, scale,
                                     window, maps, sinks)  # fmt: skip
            outs.append(out)
        return torch.cat(outs, dim=2), state
    keys, values = torch.cat([state.keys, k], dim=2), torch.cat([state.values, v], dim=2)
    key_mask = torch.cat([state.mask, mask], dim=1)
    lk = maps.key(k)
    if n > window:
        prefix = None if fresh else state.linear
        out = windowed_attention(q, keys, values, key_mask, True, scale, window, maps, prefix, sinks=sinks)
        return out, advance(state, k, v, lk, mask, window)
    w = state.keys.shape[2]
    lq = maps.query(q)
    lks = torch.cat([state.log_features, lk], dim=2)
    query_pos = torch.arange(w, w + n, device=q.device)[:, None]
    key_pos = torch.arange(w + n, device=q.device)[None, :]
    seen = key_mask[:, None, None, :] & (key_pos <= query_pos)  # (B, 1, n, w + n)
    in_window = seen & (key_pos > query_pos - window)
    logits = (q @ keys.transpose(-1, -2)) * scale
    if w + n > window:  # some buffered keys are outside the window of the first new queries
        logits = torch.where(in_window, logits, _kernel_logits(lq, lks)).masked_fill(~seen, float("-inf"))
    else:
        logits = logits.masked_fill(~in_window, float("-inf"))
    exact = [(logits, _with_ones(values))]
    if sinks:
        # sinks captured before this step (new ones are inside every later new query's window, as n <= W)
        filled = torch.arange(sinks, device=q.device) < state.sink_count[:, None]  # (B, G)
        sink_logits = (q @ state.sink_keys.transpose(-1, -2) * scale).masked_fill(~filled[:, None, None], -torch.inf)
        exact.append((sink_logits, _with_ones(state.sink_values)))
    far = [_state_read(lq, state.linear.kvz, state.linear.shift)]
    out = _combine(exact, far)
    return out, _advance(state, k, v, mask, (keys, values, lks, key_mask), window)
