"""Feature-map (kernel) attention in linear time, bidirectional and causal.

Every positive feature map in hf_lara (random features, LARA's causal proposals, learned kernels) hands this module
*log*-features `lq = log phi(q)` `(B, H, Nq, S)` and `lk = log phi(k)` `(B, H, Nk, S)`. Working in log space makes
the result immune to overflow and underflow:

* each feature `s` gets its own key shift `M_s = max_m lk_ms`; `phi_s(q) phi_s(k) = exp(lq_s + M_s) exp(lk_s - M_s)`,
  so the shift is folded into the query side, where any per-query factor cancels between numerator and denominator
  (queries are weighted by `softmax_s(lq_s + M_s)`, one fused op);
* after the key shift every feature column of the key sums holds a 1, so no normaliser underflows;
* query log-features are only defined up to a per-query constant (it cancels): feature maps may leave it out.

Values are carried with an extra column of ones, `[v, 1]` `(.., D + 1)`, so one product gives numerator and
denominator together.

**Bidirectional**: `phi(Q) (phi(K)^T [V, 1])`, two GEMMs.

**Causal**: the chunkwise form of linear attention (`hf_lara/attention/README.md`, Numerics), batched over every chunk of a block of tokens:
per chunk `c` the keys are shifted by the running max `M_c` (cumulative max over chunks, the state's shift
included), the chunk sums `dS_c = phi(K_c)^T [V_c, 1]` are accumulated into the prefix states by one rescaled
cumulative sum, and each query row gets `phi(q) prior_c + tril(phi(Q_c) phi(K_c)^T) [V_c, 1]`. A Python loop runs
over *blocks* of `~2^20 / (B H S)` tokens only, carrying an `S x (D + 1)` state: temporaries stay a few MB
(cache-resident, no page faults from fresh large allocations) and the loop costs a handful of iterations.

The fast path is guarded. A row whose denominator falls below `sqrt(tiny)` although it sees a real key (a key far
larger than every earlier one, late in its chunk, for every feature the query weighs) makes its block rerun with
the exact form (`_exact_block`: per-key shifts and log-domain intra-chunk scores, each chunk reading the prefix
state relative to the running max before it). The rescaled cumulative sum needs the running max of a block to grow
by less than `_SCAN_RANGE` nats; otherwise the prefix states come from `_prefix_sums`, products of decays `<= 1`
(valid for any range). Neither loops over chunks in Python: a traced graph (`torch.compile`, which takes the exact
form since it cannot branch on the data) grows with the number of blocks only. No `N x N` tensor and no
`N x S x D` tensor is ever built; memory is `O(N S + N C + (N / C) S D)` per head.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import LOG2E, is_tracing, records_grad

#: `(B, H, n, D)` inputs -> `(B, H, n, S)` log-features; applied block by block.
LogFeatureMap = Callable[[torch.Tensor], torch.Tensor]

DEFAULT_CHUNK_SIZE = 64
#: target number of elements of a `(B, H, block, S)` temporary on the blocked paths (4 MB in fp32)
BLOCK_ELEMENTS = 1 << 20
#: the same for the bidirectional paths, per intra-op thread (2 MB in fp32), at most `BIDIRECTIONAL_BLOCK_ELEMENTS`
#: (16 MB): small blocks keep each thread's temporaries in cache (`benchmarks/results/attention_blocks.md`: 2^19
#: against 2^20 per thread, 1 thread at N=16384: rfa, kernel, lara 5-9 % faster; 2 threads: kernel at N=4096 10-20 %
#: faster, the rest within noise); the cap keeps temporaries below glibc's largest mmap threshold (32 MB)
THREAD_BLOCK_ELEMENTS = 1 << 19
BIDIRECTIONAL_BLOCK_ELEMENTS = 1 << 22


def bidirectional_block_elements() -> int:
    """Elements of one `(B, H, block, S)` temporary on the bidirectional paths for the current thread count."""
    if is_tracing():  # the thread count cannot be read inside a traced graph
        return BIDIRECTIONAL_BLOCK_ELEMENTS
    return min(THREAD_BLOCK_ELEMENTS * max(torch.get_num_threads(), 1), BIDIRECTIONAL_BLOCK_ELEMENTS)


# A finite "minus infinity" for running maxima: exp(a - b) stays well defined when both are at the floor.
_LOG_FLOOR = -1e30
# Largest growth (nats) of the running key max inside one block for the rescaled cumulative sum: exp(-60) keeps
# 26 orders of magnitude above fp32's smallest normal number.
_SCAN_RANGE = {torch.float32: 60.0, torch.float64: 600.0}


def _tiny(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).tiny


def _with_ones(v: torch.Tensor) -> torch.Tensor:
    """`[v, 1]`: `(..., D)` -> `(..., D + 1)`."""
    return F.pad(v, (0, 1), value=1.0)


def _normalise(out: torch.Tensor) -> torch.Tensor:
    """`num / den` for `out = [num, den]` `(..., D + 1)`; rows with nothing to attend to (`den = 0`) give 0.

    Such rows divide by 1 rather than by a tiny clamp, so their gradients stay finite (and zero).
    """
    den = out[..., -1:]
    return out[..., :-1] / torch.where(den > 0, den, torch.ones_like(den))


def block_length(batch_heads: int, width: int, multiple: int = 1, block_size: int | None = None) -> int:
    """Tokens per block: `block_size` if given, else about `BLOCK_ELEMENTS / (batch_heads * width)`.

    Always a positive multiple of `multiple` (the chunk size on the causal path).
    """
    tokens = block_size if block_size is not None else BLOCK_ELEMENTS // max(batch_heads * width, 1)
    return max(tokens // multiple, 1) * multiple


def _mask_keys(lk: torch.Tensor, key_mask: torch.Tensor | None, in_place: bool = False) -> torch.Tensor:
    if key_mask is None:
        return lk
    hidden = ~key_mask[:, None, :, None]
    return lk.masked_fill_(hidden, float("-inf")) if in_place else lk.masked_fill(hidden, float("-inf"))


def _key_shift(lk: torch.Tensor, dim: int = 2) -> torch.Tensor:
    """Detached per-feature max over keys, floored so that fully masked columns stay finite."""
    return lk.detach().amax(dim=dim).clamp_min(_LOG_FLOOR)


def _query_weights(lq: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """`softmax_s(lq + shift)` for `lq` `(..., n, S)` and a key shift broadcastable as `(..., 1, S)`."""
    return torch.softmax(lq + shift, dim=-1)


def _query_weights_in_place(
    lq: torch.Tensor, shift: torch.Tensor, own: bool, scratch: torch.Tensor | None = None
) -> torch.Tensor:
    """`exp(lq + shift - rowmax)` without autograd, in place on `lq` when `own` (a fresh map output or a scratch
    buffer), else written into `scratch` (a buffer of the shape of `lq`) or a new tensor.

    Each row is scaled so that its largest weight is 1 instead of normalised: the factor cancels in the output.
    """
    w = lq.add_(shift) if own else torch.add(lq, shift, out=scratch) if scratch is not None else lq + shift
    return _exp_in_place(w.sub_(w.amax(dim=-1, keepdim=True)))


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def half_squared_norm(x: torch.Tensor, scale: float) -> torch.Tensor:
    """`scale |x|^2 / 2` over the last dimension, `(..., 1)`; without autograd one reduction (no `x^2` copy)."""
    if records_grad(x):
        return 0.5 * scale * x.square().sum(dim=-1, keepdim=True)
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().mul_(0.5 * scale)


def writes_into(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Mark a log-feature map `fn(x, out=None)` that can write its result into a given buffer (see `map_into`)."""
    fn.writes_into = True
    return fn


def map_into(fn: LogFeatureMap, x: torch.Tensor, out: torch.Tensor | None) -> tuple[torch.Tensor, bool]:
    """`fn(x)`, written into the buffer `out` when given and `fn` is marked by `writes_into`.

    Returns the log-features and whether they may be modified in place: written into `out`, or new memory (not the
    caller's input; compared by storage, since views made under `torch.inference_mode` have no `_base`).
    """
    if out is not None and getattr(fn, "writes_into", False):
        result = fn(x, out=out)
    else:
        result = fn(x)
    if result is out or result._base is not None:
        return result, result is out
    # a traced graph cannot read storage pointers (and its views keep their `_base`)
    return result, is_tracing() or result.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()


def _scratch(workspace: torch.Tensor, *shape: int) -> torch.Tensor:
    """A contiguous `shape` view of the first elements of the flat buffer `workspace`."""
    return workspace[: math.prod(shape)].view(shape)


_ALIGN = 16


class Workspace:
    """One flat buffer handed out as consecutive contiguous views, taken again from the start for every block.

    The no-grad blocked paths compute their block temporaries in it, so a call allocates its scratch memory once
    instead of several fresh tensors per block (large fresh allocations are served by mmap or by a heap that glibc
    trims, and page-fault on every use: how often depends on the process's allocation history).
    """

    def __init__(self, like: torch.Tensor, numel: int) -> None:
        self.buffer, self.used = like.new_empty(numel), 0

    def take(self, *shape: int) -> torch.Tensor:
        """A contiguous uninitialised `shape` view (a fresh tensor if the buffer is used up)."""
        numel = math.prod(shape)
        if self.used + numel > self.buffer.numel():
            return self.buffer.new_empty(shape)
        view = self.buffer[self.used : self.used + numel].view(shape)
        self.used += -(-numel // _ALIGN) * _ALIGN  # every view starts on a 64-byte line (fp32)
        return view

    def reset(self) -> None:
        self.used = 0


def bidirectional_linear_attention(
    lq: torch.Tensor,
    lk: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    block_size: int | None = None,
    q_map: LogFeatureMap | None = None,
    k_map: LogFeatureMap | None = None,
    feature_dim: int | None = None,
) -> torch.Tensor:
    """`phi(Q) (phi(K)^T V) / phi(Q) phi(K)^T 1` from log-features, blocked over tokens.

    Keys go through `absorb_keys`; each query block is then one GEMM against the `S x (D + 1)` key statistics.
    Without autograd the query weights are `exp(lq + M - rowmax)` computed in place (as `exp2`) (their per-row normaliser
    cancels) and each block is divided straight into the output: no `(B, H, N, S)` temporary beyond one block.

    Args:
        lq (`torch.Tensor` of shape `(B, H, Nq, S)`): log query features (up to a per-query constant), or the
            queries `(B, H, Nq, D)` when `q_map` is given.
        lk (`torch.Tensor` of shape `(B, H, Nk, S)`): log key features, or the keys when `k_map` is given.
        v (`torch.Tensor` of shape `(B, H, Nk, D)`): values.
        key_mask (`torch.Tensor` of shape `(B, Nk)`, *optional*): True = real key.
        block_size (`int`, *optional*): tokens per block (default: `block_length` with
            `bidirectional_block_elements()`).
        q_map, k_map (`LogFeatureMap`, *optional*): applied to each block of `lq` / `lk` (default: identity), so
            that no `(B, H, N, S)` feature tensor is ever built whole.
        feature_dim (`int`, *optional*): `S` when maps are given (sizes the blocks).

    Returns:
        `torch.Tensor` of shape `(B, H, Nq, D)`.
    """
    q_map = q_map or _identity
    B, H, Nq = lq.shape[:3]
    S, D = feature_dim or lk.shape[-1], v.shape[-1]
    if block_size is None:
        block_size = max(bidirectional_block_elements() // max(B * H * max(S, D + 1), 1), 1)
    block = block_length(B * H, max(S, D + 1), block_size=block_size)
    empty = LinearState.empty(B, H, S, v)
    grad = torch.is_grad_enabled()
    # without autograd every block of keys and queries works in one buffer: one allocation per call, not several
    # per block (large fresh temporaries are served by mmap or a trimmed heap, and page-fault on every use)
    rows = min(block, max(Nq, lk.shape[2], 1))
    workspace = None if grad else v.new_empty(B * H * rows * (S + D + 1))
    kvz, shift = absorb_keys(empty.kvz, empty.shift, lk, v, key_mask, k_map, block, workspace)
    shift = shift[:, :, None, :]
    if grad:
        outs = [_normalise(_query_weights(q_map(lq_b), shift) @ kvz) for lq_b in lq.split(block, dim=2)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    out = v.new_empty(B, H, Nq, D)
    weights_part, num_part = workspace.split([B * H * rows * S, B * H * rows * (D + 1)])
    for start, lq_b in zip(range(0, Nq, block), lq.split(block, dim=2)):
        n = lq_b.shape[2]
        scratch = _scratch(weights_part, B, H, n, S)
        w, own = map_into(q_map, lq_b, scratch)
        w = _query_weights_in_place(w, shift, own, scratch)
        num = torch.matmul(w, kvz, out=_scratch(num_part, B, H, n, D + 1))  # (B, H, n, D + 1)
        den = num[..., -1:]
        if key_mask is not None:  # a row without any real key gives 0, as `_normalise`
            den = den.masked_fill(den == 0, 1.0)
        torch.div(num[..., :-1], den, out=out[:, :, start : start + lq_b.shape[2]])
    return out


def _exp_in_place(x: torch.Tensor) -> torch.Tensor:
    """`exp(x)` in place, as `2 ** (x log2 e)`: on CPU `exp2_` runs several times faster than `exp_`."""
    return x.mul_(LOG2E).exp2_()


def _exp_shifted(x: torch.Tensor, shift: torch.Tensor, own: bool) -> torch.Tensor:
    """`exp(x - shift)`; in place on `x` when `own` (a fresh temporary or a scratch buffer) and no gradient is
    recorded."""
    if not own or records_grad(x, shift):
        return torch.exp(x - shift)
    return _exp_in_place(x.sub_(shift))


def absorb_keys(
    kvz: torch.Tensor,
    shift: torch.Tensor,
    lk: torch.Tensor,
    v: torch.Tensor | None,
    key_mask: torch.Tensor | None = None,
    k_map: LogFeatureMap | None = None,
    block: int | None = None,
    workspace: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Key statistics with a running per-feature max, block by block: the one key-absorption loop of hf_lara.

    Returns `kvz' = sum_m exp(lk_m - shift') [v_m, 1]` added to `kvz` (rescaled from `shift` to `shift'`) and the
    new shift `shift' = max(shift, max_m lk_m)` (detached). Used by `LinearState.absorb` (causal prefixes,
    decoding, bidirectional kernel attention) and by bidirectional LARA (its keys, and with `v=None` the
    column logsumexp of its `t` logits over queries). `[v, 1]` is never materialised: the value and count parts
    are two products of the same `exp` block.

    Args:
        kvz (`torch.Tensor` of shape `(B, H, S, D + 1)`): statistics so far (never modified in place).
        shift (`torch.Tensor` of shape `(B, H, S)`): their shift (`_LOG_FLOOR` for none).
        lk (`torch.Tensor` of shape `(B, H, n, S)`): log key features (`-inf` = padding), or the keys when `k_map`
            is given.
        v (`torch.Tensor` of shape `(B, H, n, D)`, *optional*): values; None for counts only (`D = 0`).
        key_mask (`torch.Tensor` of shape `(B, n)`, *optional*): True = real key.
        k_map (`LogFeatureMap`, *optional*): applied to each block of `lk`.
        block (`int`, *optional*): tokens per block (default: all at once).
        workspace (`torch.Tensor`, *optional*): a flat buffer of at least `B H block S` elements; without autograd
            each block's log-features are computed in it (`map_into`) instead of in fresh memory.

    Returns:
        `(kvz', shift')` of the same shapes.
    """
    kv, z = kvz[..., :-1], kvz[..., -1]
    (B, H, S), n = shift.shape, lk.shape[2]
    block = block or max(n, 1)
    values = v.split(block, dim=2) if v is not None else [None] * len(range(0, n, block))
    # `split`, not slicing: a slice's backward writes its gradient into a zero tensor of the whole input, so
    # slicing block by block costs O(N^2 / block) in backward; one split node concatenates the block gradients
    for start, lk_b, v_b in zip(range(0, n, block), lk.split(block, dim=2), values):
        scratch = None if workspace is None else _scratch(workspace, B, H, lk_b.shape[2], S)
        lk_b, own = map_into(k_map or _identity, lk_b, scratch)
        mask_b = _block(key_mask, start, block)
        if mask_b is not None:  # in place on our own features, else a fresh copy (ours from then on)
            lk_b, own = _mask_keys(lk_b, mask_b, own and not records_grad(lk_b)), True
        new_shift = torch.maximum(shift, _key_shift(lk_b))
        phi = _exp_shifted(lk_b, new_shift[:, :, None, :], own)
        decay = torch.exp(shift - new_shift)
        if v_b is not None:
            kv = torch.addcmul(phi.transpose(-1, -2) @ v_b, kv, decay[..., None])
        z = torch.addcmul(phi.sum(dim=2), z, decay)
        shift = new_shift
    return torch.cat([kv, z[..., None]], dim=-1), shift


def _block(mask: torch.Tensor | None, start: int, length: int) -> torch.Tensor | None:
    return None if mask is None else mask[:, start : start + length]


class LinearState:
    """Running prefix statistics of causal kernel attention, kept relative to a per-feature log shift.

    Constant size: `S x (D + 1) + S` numbers per (batch, head), whatever the number of tokens absorbed.

    Attributes:
        kvz (`torch.Tensor` of shape `(B, H, S, D + 1)`): `sum_m exp(lk_m - shift) [v_m, 1]^T`.
        shift (`torch.Tensor` of shape `(B, H, S)`): the running (detached) max of the key log-features.
    """

    def __init__(self, kvz: torch.Tensor, shift: torch.Tensor) -> None:
        self.kvz, self.shift = kvz, shift

    @property
    def kv(self) -> torch.Tensor:
        """`sum_m exp(lk_m - shift) v_m^T`, `(B, H, S, D)`."""
        return self.kvz[..., :-1]

    @property
    def z(self) -> torch.Tensor:
        """`sum_m exp(lk_m - shift)`, `(B, H, S)`."""
        return self.kvz[..., -1]

    @classmethod
    def empty(cls, batch_size: int, num_heads: int, num_features: int, like: torch.Tensor) -> LinearState:
        """A state holding no token, for values like `like` `(..., D)` (dtype, device and `D`)."""
        kvz = like.new_zeros(batch_size, num_heads, num_features, like.shape[-1] + 1)
        return cls(kvz, like.new_full((batch_size, num_heads, num_features), _LOG_FLOOR))

    def clone(self) -> LinearState:
        return LinearState(self.kvz.clone(), self.shift.clone())

    def to(self, *args, **kwargs) -> LinearState:
        """A copy with both tensors moved or cast as by `torch.Tensor.to` (`state.to("cpu")`, `state.to(dtype)`)."""
        return LinearState(self.kvz.to(*args, **kwargs), self.shift.to(*args, **kwargs))

    @property
    def device(self) -> torch.device:
        return self.kvz.device

    @property
    def batch_size(self) -> int:
        return self.kvz.shape[0]

    def nbytes(self) -> int:
        """Bytes held by the state."""
        return self.kvz.numel() * self.kvz.element_size() + self.shift.numel() * self.shift.element_size()

    def absorb(
        self,
        lk: torch.Tensor,
        v: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        k_map: LogFeatureMap | None = None,
        block_size: int | None = None,
    ) -> None:
        """Add keys and values `(B, H, n, D)` to the state, block by block with a running max shift.

        Args:
            lk (`torch.Tensor` of shape `(B, H, n, S)`): log key features (`-inf` rows are padding), or keys
                `(B, H, n, D)` when `k_map` is given.
            v (`torch.Tensor` of shape `(B, H, n, D)`): values.
            key_mask (`torch.Tensor` of shape `(B, n)`, *optional*): True = real key.
            k_map (`LogFeatureMap`, *optional*): applied to each block of `lk`.
            block_size (`int`, *optional*): tokens per block.
        """
        B, H, S = self.shift.shape
        block = block_length(B * H, max(S, v.shape[-1] + 1), block_size=block_size)
        self.kvz, self.shift = absorb_keys(self.kvz, self.shift, lk, v, key_mask, k_map, block)

    def step(self, lq: torch.Tensor, lk: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One token: absorb `lk` `(B, H, 1, S)` (`-inf` = padding), `v` `(B, H, 1, D)`, then read `lq` `(B, H, 1, S)`.

        `O(S D)` per (batch, head) whatever the number of tokens absorbed before.
        """
        new_shift = torch.maximum(self.shift, lk.detach()[:, :, 0].clamp_min(_LOG_FLOOR))
        phi_k = torch.exp(lk - new_shift[:, :, None, :])  # (B, H, 1, S)
        part = phi_k.transpose(-1, -2) * _with_ones(v)  # outer product (B, H, S, D + 1)
        self.kvz = torch.addcmul(part, self.kvz, torch.exp(self.shift - new_shift)[..., None])
        self.shift = new_shift
        return self.read(lq)

    def index_select(self, index: torch.Tensor) -> LinearState:
        """The state of batch rows `index` (beam-search reordering, dropping finished rows)."""
        return LinearState(self.kvz.index_select(0, index), self.shift.index_select(0, index))

    def read(self, lq: torch.Tensor) -> torch.Tensor:
        """Attention of queries `lq` `(B, H, n, S)` over the absorbed tokens only, `(B, H, n, D)`."""
        return _normalise(_query_weights(lq, self.shift[:, :, None, :]) @ self.kvz)


def _intra_chunk_scores(lq: torch.Tensor, lk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal scores inside each chunk, `P_ij = phi(q_i).phi(k_j)` for `j <= i`, scaled per row (exact path).

    A per-key shift `m_j` (its largest log-feature) absorbs the key's magnitude, so the `C x C` product of features
    in `[0, 1]` never underflows because of a large key that comes later in the chunk; the magnitudes come back as
    logits and each row is rescaled by its own causal max `d_i`.

    Args:
        lq, lk (`torch.Tensor` of shape `(..., C, S)`): log-features of one chunk per leading index.

    Returns:
        `P` `(..., C, C)` (lower-triangular) and `d` `(..., C)` with true scores `P * exp(d)[..., None]`.
    """
    e = lq.detach().amax(dim=-1, keepdim=True)  # (..., C, 1)
    key_max = lk.detach().amax(dim=-1)  # (..., C); -inf for padded keys
    m = key_max.clamp_min(_LOG_FLOOR)
    products = torch.exp(lq - e) @ torch.exp(lk - m[..., None]).transpose(-1, -2)
    logits = torch.log(products.clamp_min(_tiny(products.dtype))) + m[..., None, :] + e
    n = lq.shape[-2]
    hidden = torch.ones(n, n, dtype=torch.bool, device=lq.device).triu(1) | (key_max == float("-inf"))[..., None, :]
    logits = logits.masked_fill(hidden, float("-inf"))
    d = logits.detach().amax(dim=-1).clamp_min(_LOG_FLOOR)
    return torch.exp(logits - d[..., None]), d


def _chunks(
    lq: torch.Tensor, lk: torch.Tensor, v: torch.Tensor, chunk_size: int, workspace: Workspace | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(B, H, L, .)` -> `(B, H, n, C, .)` chunks, the last one padded (keys at `-inf`); values as `[v, 1]` (built in
    `workspace` when given)."""
    B, H, L, S = lk.shape
    n = -(-L // chunk_size)
    pad = n * chunk_size - L
    if pad:
        lq, lk, v = F.pad(lq, (0, 0, 0, pad)), F.pad(lk, (0, 0, 0, pad), value=float("-inf")), F.pad(v, (0, 0, 0, pad))
    if workspace is None:
        v1 = _with_ones(v)
    else:
        v1 = workspace.take(B, H, n * chunk_size, v.shape[-1] + 1)
        v1[..., :-1].copy_(v)
        v1[..., -1].fill_(1.0)
    return lq.reshape(B, H, n, chunk_size, S), lk.reshape(B, H, n, chunk_size, S), v1.view(B, H, n, chunk_size, -1)


def _running_max(lk: torch.Tensor, state: LinearState) -> torch.Tensor:
    """`(B, H, n, S)`: per-feature max of the keys of chunks `0..c` `(B, H, n, C, S)` and of `state` (detached)."""
    chunk_max = lk.detach().amax(dim=3)
    return torch.cummax(torch.maximum(chunk_max, state.shift[:, :, None]), dim=2).values.clamp_min(_LOG_FLOOR)


#: terms summed by one lower-triangular product in `_prefix_sums`; longer sums recurse over groups of this many
_PREFIX_GROUP = 32


def _triangular_prefix(terms: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """`_prefix_sums` of `(..., m, S, E)` terms as one product with the `m x m` lower-triangular factors."""
    m = terms.shape[-3]
    s = shifts.transpose(-1, -2)  # (..., S, m)
    exponents = s[..., None, :] - s[..., :, None]  # (..., S, c, j): shifts_j - shifts_c <= 0 for j <= c
    above = torch.ones(m, m, dtype=torch.bool, device=terms.device).triu(1)
    factors = torch.exp(exponents.masked_fill(above, float("-inf")))
    return (factors @ terms.transpose(-3, -2)).transpose(-3, -2)


def _prefix_sums(terms: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Inclusive prefix sums over `n` terms kept relative to a nondecreasing running log shift.

    `x_c = sum_{j <= c} exp(shifts_j - shifts_c) terms_j`: the recurrence `x_c = exp(shifts_{c-1} - shifts_c)
    x_{c-1} + terms_c` with its products of decays telescoped, so every factor is `<= 1` (no overflow, whatever the
    range of the shifts). Up to `_PREFIX_GROUP` terms this is one lower-triangular product; beyond, the sums inside
    groups of `_PREFIX_GROUP`, then (recursively) the sums of the group totals carried into each group: no Python
    loop over the terms, so a traced graph does not grow with `n`.

    Args:
        terms (`torch.Tensor` of shape `(B, H, n, S, E)`): term `c` relative to `shifts[:, :, c]`.
        shifts (`torch.Tensor` of shape `(B, H, n, S)`): nondecreasing along `n`, finite, detached.

    Returns:
        `torch.Tensor` of shape `(B, H, n, S, E)`: `x_c` relative to `shifts[:, :, c]`.
    """
    (B, H, n, S, E), group = terms.shape, _PREFIX_GROUP
    if n <= group:
        return _triangular_prefix(terms, shifts)
    groups = -(-n // group)
    pad = groups * group - n
    # padding terms are 0 at the last shift (the shifts stay nondecreasing)
    terms = F.pad(terms, (0, 0, 0, 0, 0, pad)).reshape(B, H, groups, group, S, E)
    shifts = torch.cat([shifts, shifts[:, :, -1:].expand(B, H, pad, S)], dim=2).reshape(B, H, groups, group, S)
    inside = _triangular_prefix(terms, shifts)  # (B, H, groups, group, S, E)
    ends = shifts[:, :, :, -1]  # (B, H, groups, S)
    totals = _prefix_sums(inside[:, :, :, -1], ends)  # everything up to the end of each group
    carried = F.pad(totals[:, :, :-1], (0, 0, 0, 0, 1, 0))  # before each group (0 before the first)
    carried_shift = torch.cat([shifts[:, :, :1, 0], ends[:, :, :-1]], dim=2)
    out = inside + torch.exp(carried_shift[:, :, :, None] - shifts)[..., None] * carried[:, :, :, None]
    return out.reshape(B, H, groups * group, S, E)[:, :, :n]


def _chunk_states(delta: torch.Tensor, running: torch.Tensor, state: LinearState) -> tuple[torch.Tensor, torch.Tensor]:
    """The statistics after `state` and each chunk, `(B, H, n + 1, S, D + 1)`, relative to `before` `(B, H, n + 1, S)`
    (the state's shift, then the running max after each chunk)."""
    before = torch.cat([state.shift[:, :, None], running], dim=2)
    return _prefix_sums(torch.cat([state.kvz[:, :, None], delta], dim=2), before), before


def _chunk_sums(lk: torch.Tensor, v1: torch.Tensor, running: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`phi(K_c)` `(B, H, n, C, S)` relative to `running[c]` and `dS_c = phi(K_c)^T [V_c, 1]` `(B, H, n, S, D + 1)`."""
    phi_k = torch.exp(lk - running[:, :, :, None])
    return phi_k, phi_k.transpose(-1, -2) @ v1


def _exact_block(
    lq: torch.Tensor, lk: torch.Tensor, v: torch.Tensor, chunk_size: int, state: LinearState
) -> torch.Tensor:
    """Causal attention over one block, exact for any feature range, all chunks at once; updates `state`.

    Chunk `c` reads the earlier chunks through the statistics before it, relative to the running max before it
    (row scale `exp(c_i)`), and its own keys through `_intra_chunk_scores` (row scale `exp(d_i)`); both parts are
    rescaled to `max(c_i, d_i)`, so neither overflows nor hides the other.

    Args:
        lq, lk (`torch.Tensor` of shape `(B, H, L, S)`): log-features of the block (padded keys at `-inf`).
        v (`torch.Tensor` of shape `(B, H, L, D)`): values.
        chunk_size (`int`): `C`.
        state (`LinearState`): statistics before the block; replaced by those after it.

    Returns:
        `torch.Tensor` of shape `(B, H, L, D)`.
    """
    B, H, L, _ = lk.shape
    lq, lk, v1 = _chunks(lq, lk, v, chunk_size)
    running = _running_max(lk, state)
    sums, before = _chunk_states(_chunk_sums(lk, v1, running)[1], running, state)
    shifted = lq + before[:, :, :-1, None]  # (B, H, n, C, S)
    c = shifted.detach().amax(dim=-1)
    scores, d = _intra_chunk_scores(lq, lk)
    top = torch.maximum(c, d)
    inter = torch.exp(shifted - top[..., None]) @ sums[:, :, :-1]
    out = inter + torch.exp(d - top)[..., None] * (scores @ v1)  # (B, H, n, C, D + 1)
    state.kvz, state.shift = sums[:, :, -1], running[:, :, -1]
    return _normalise(out.reshape(B, H, -1, v1.shape[-1])[:, :, :L])


def _cumsum_chunks(terms: torch.Tensor) -> torch.Tensor:
    """`terms.cumsum(dim=2)` for `(B, H, n, S, E)`; without autograd an in-place loop over `n` (eager only: it
    runs several times faster than `cumsum` over a non-last dimension on CPU)."""
    if records_grad(terms):
        return terms.cumsum(dim=2)
    for c in range(1, terms.shape[2]):
        terms[:, :, c].add_(terms[:, :, c - 1])  # not `+=`, whose item assignment copies the chunk onto itself
    return terms


def _in_scan_range(running: torch.Tensor, state: LinearState) -> bool:
    """Whether the running max `(B, H, n, S)` of a block grows by at most `_SCAN_RANGE` nats over the state's shift
    (where it has one): the condition of the rescaled cumulative sums. Always False when traced (it reads the data)."""
    if is_tracing():
        return False
    shifts = torch.cat([state.shift[:, :, None], running], dim=2)  # (B, H, n + 1, S)
    seen = shifts > _LOG_FLOOR / 2
    limit = _SCAN_RANGE.get(running.dtype, 60.0)
    return not bool(((running[:, :, -1:] - shifts) * seen).amax() > limit)


def _rescaled_prefix_in_place(
    delta_t: torch.Tensor, running: torch.Tensor, state: LinearState, workspace: Workspace | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`_rescaled_prefix` without autograd on transposed chunk sums, as one product (in range only).

    The chunk sums are moved to the block's last running max in place, summed over earlier chunks (starting from
    the state) straight into the prefix buffer, and each prefix is moved to its own running max: no concatenated
    copy. (A product with the triangular matrix of ones, or `baddbmm` with a broadcast bias, ran slower on CPU.)

    Args:
        delta_t (`torch.Tensor` of shape `(B, H, n, D + 1, S)`): chunk sums `dS_c^T`, chunk `c` relative to
            `running[c]`; overwritten.
        running (`torch.Tensor` of shape `(B, H, n, S)`): running max after each chunk (the state's included).
        state (`LinearState`): statistics before the first chunk.

    Returns:
        `prior^T` `(B, H, n, D + 1, S)` relative to `running[c]` and the final statistics `(B, H, S, D + 1)` relative
        to `running[-1]`.
    """
    B, H, n, E, S = delta_t.shape
    top = running[:, :, -1]  # (B, H, S)
    delta_t.mul_(torch.exp(running - top[:, :, None])[:, :, :, None, :])  # relative to `top`
    start = state.kvz.transpose(-1, -2) * torch.exp(state.shift - top)[:, :, None, :]  # (B, H, E, S)
    prior_t = delta_t.new_empty(delta_t.shape) if workspace is None else workspace.take(*delta_t.shape)
    prior_t[:, :, 0] = start
    for c in range(1, n):  # `out=`: no copy of the chunk onto itself, as `+=` on an item would make
        torch.add(prior_t[:, :, c - 1], delta_t[:, :, c - 1], out=prior_t[:, :, c])
    final = (prior_t[:, :, -1] + delta_t[:, :, -1]).transpose(-1, -2)
    # before any real key `running` is at the floor and the sums are exactly 0: clamp the factor, not the sums
    limit = _SCAN_RANGE.get(delta_t.dtype, 60.0)
    factor = torch.exp((top[:, :, None] - running).clamp_max(limit))[:, :, :, None, :]
    return prior_t.mul_(factor), final


def _rescaled_prefix(
    delta: torch.Tensor, running: torch.Tensor, state: LinearState
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Exclusive prefix sums of chunk statistics by one rescaled cumulative sum, or None if out of range.

    Always None when traced: the range test reads the data, and `_scanned_prefix` is valid for any range.

    Args:
        delta (`torch.Tensor` of shape `(B, H, n, S, D + 1)`): chunk sums, chunk `c` relative to `running[c]`.
        running (`torch.Tensor` of shape `(B, H, n, S)`): running max after each chunk (the state's included).
        state (`LinearState`): statistics before the first chunk.

    Returns:
        `prior` `(B, H, n, S, D + 1)`, the statistics before chunk `c` relative to `running[c]`, and the final
        statistics `(B, H, S, D + 1)` relative to `running[-1]`.
    """
    if not _in_scan_range(running, state):
        return None
    shifts = torch.cat([state.shift[:, :, None], running], dim=2)  # (B, H, n + 1, S)
    top = running[:, :, -1:]
    limit = _SCAN_RANGE.get(delta.dtype, 60.0)
    grad = records_grad(delta, state.kvz)  # without autograd the fresh temporaries are rescaled in place
    terms, factor = torch.cat([state.kvz[:, :, None], delta], dim=2), torch.exp(shifts - top)[..., None]
    sums = _cumsum_chunks(terms * factor if grad else terms.mul_(factor))  # (B, H, n + 1, S, D + 1), relative to `top`
    # before any real key `running` is at the floor and the sums are exactly 0: clamp the factor, not the sums
    factor = torch.exp((top - running).clamp_max(limit))[..., None]
    prior = sums[:, :, :-1] * factor if grad else sums[:, :, :-1].mul_(factor)
    return prior, sums[:, :, -1]


def _scanned_prefix(
    delta: torch.Tensor, running: torch.Tensor, state: LinearState
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same as `_rescaled_prefix` for any range of the running max, by `_prefix_sums` (no loop over chunks)."""
    sums, before = _chunk_states(delta, running, state)
    # the statistics before chunk c, moved from the max before it to the max after it (a factor <= 1)
    prior = sums[:, :, :-1] * torch.exp(before[:, :, :-1] - running)[..., None]
    return prior, sums[:, :, -1]


def _fast_block(
    lq: torch.Tensor,
    lk: torch.Tensor,
    v: torch.Tensor,
    visible: torch.Tensor | None,
    chunk_size: int,
    state: LinearState,
    out: torch.Tensor | None = None,
    own: tuple[bool, bool] | None = None,
    workspace: Workspace | None = None,
) -> tuple[torch.Tensor, LinearState] | None:
    """Causal attention over one block, all chunks batched; None when a row underflows (use `_exact_block`).

    With `out` (no autograd) the exponentials run in place on our own features (`own`; by default fresh map outputs,
    i.e. not views), query weights are scaled to a row max of 1 rather than normalised (the underflow test then only
    sees larger denominators, by at most a factor `S`), the block temporaries are taken from `workspace` (if given)
    and the result is divided straight into `out`.

    Args:
        lq, lk (`torch.Tensor` of shape `(B, H, L, S)`): log-features of the block (padded keys at `-inf`).
        v (`torch.Tensor` of shape `(B, H, L, D)`): values.
        visible (`torch.Tensor` of shape `(B, H or 1, L)`, *optional*): rows that see at least one real key
            (None: all of them).
        chunk_size (`int`): `C`.
        state (`LinearState`): statistics before the block (not modified).
        out (`torch.Tensor` of shape `(B, H, L, D)`, *optional*): where to write the output, without autograd.
        own (`tuple[bool, bool]`, *optional*): whether `lq`, `lk` may be overwritten (with `out` only).
        workspace (`Workspace`, *optional*): scratch memory for the block (with `out` only).

    Returns:
        The output `(B, H, L, D)` and the state after the block.
    """
    B, H, L, _ = lk.shape
    inference = out is not None
    own_q, own_k = (lq._base is None, lk._base is None) if own is None else own
    workspace = workspace if inference else None
    lq, lk, v1 = _chunks(lq, lk, v, chunk_size, workspace)
    running = _running_max(lk, state)  # (B, H, n, S)
    if inference:
        n, C, E, S = *lk.shape[2:4], v1.shape[-1], lk.shape[-1]

        def take(*shape: int) -> torch.Tensor | None:
            return None if workspace is None else workspace.take(*shape)

        phi_k = _exp_in_place(lk.sub_(running[:, :, :, None])) if own_k else torch.exp(lk - running[:, :, :, None])
        # transposed chunk sums `[V_c, 1]^T phi(K_c)` `(B, H, n, D + 1, S)`: the product `phi(K_c)^T [V_c, 1]` with
        # its odd width D + 1 on the right runs about 1.7x slower on CPU
        delta_t = torch.matmul(v1.transpose(-1, -2), phi_k, out=take(B, H, n, E, S))
        if _in_scan_range(running, state):
            prior_t, final = _rescaled_prefix_in_place(delta_t, running, state, workspace)
        else:
            prior, final = _scanned_prefix(delta_t.transpose(-1, -2), running, state)
            prior_t = prior.transpose(-1, -2)
        phi_q = _query_weights_in_place(lq, running[:, :, :, None], own_q)
        scores = torch.matmul(phi_q, phi_k.transpose(-1, -2), out=take(B, H, n, C, C)).tril_()
        num_den = torch.matmul(phi_q, prior_t.transpose(-1, -2), out=take(B, H, n, C, E))  # (B, H, n, C, D + 1)
        # a separate product and add: an in-place `baddbmm_` ran about twice as slow on CPU
        num_den.add_(torch.matmul(scores, v1, out=take(B, H, n, C, E)))
    else:
        phi_k, delta = _chunk_sums(lk, v1, running)
        prefix = _rescaled_prefix(delta, running, state)
        prior, final = prefix if prefix is not None else _scanned_prefix(delta, running, state)
        phi_q = _query_weights(lq, running[:, :, :, None])  # (B, H, n, C, S)
        scores = (phi_q @ phi_k.transpose(-1, -2)).tril_()  # (B, H, n, C, C)
        num_den = phi_q @ prior + scores @ v1
    num_den = num_den.reshape(B, H, -1, v1.shape[-1])[:, :, :L]
    den = num_den[..., -1].detach()
    weak = den < _tiny(den.dtype) ** 0.5
    if visible is not None:
        weak &= visible
    if bool(weak.any()):
        return None
    after = LinearState(final, running[:, :, -1])
    if not inference:
        return _normalise(num_den), after
    den = num_den[..., -1:]
    if visible is not None:  # a row without any real key gives 0, as `_normalise`
        den = den.masked_fill(den == 0, 1.0)
    return torch.div(num_den[..., :-1], den, out=out), after


def causal_linear_attention(
    lq: torch.Tensor,
    lk: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    state: LinearState | None = None,
    block_size: int | None = None,
    q_map: LogFeatureMap | None = None,
    k_map: LogFeatureMap | None = None,
    feature_dim: int | None = None,
) -> tuple[torch.Tensor, LinearState]:
    """Causal kernel attention, chunkwise; queries are the last `Nq` of the `Nk` key positions.

    Args:
        lq (`torch.Tensor` of shape `(B, H, Nq, S)`): log query features (up to a per-query constant), or the
            queries `(B, H, Nq, D)` when `q_map` is given.
        lk (`torch.Tensor` of shape `(B, H, Nk, S)`): log key features, or the keys when `k_map` is given.
        v (`torch.Tensor` of shape `(B, H, Nk, D)`): values.
        key_mask (`torch.Tensor` of shape `(B, Nk)`, *optional*): True = real key.
        chunk_size (`int`, defaults to 64): tokens per chunk of the intra-chunk masked product.
        state (`LinearState`, *optional*): statistics of earlier tokens (not in `lk`) to continue from; it is
            updated in place (its tensors are replaced, never modified) and returned.
        block_size (`int`, *optional*): tokens per block of the batched path (default: `block_length`).
        q_map, k_map (`LogFeatureMap`, *optional*): applied block by block to `lq` / `lk` (default: identity).
        feature_dim (`int`, *optional*): `S` when maps are given (sizes the blocks and the empty state).

    Returns:
        The output `(B, H, Nq, D)` and the state after the last key (for continuing, e.g. decoding).
    """
    q_map, k_map = q_map or _identity, k_map or _identity
    (B, H, Nq), Nk, D = lq.shape[:3], lk.shape[2], v.shape[-1]
    S = feature_dim or lk.shape[-1]
    state = LinearState.empty(B, H, S, v) if state is None else state
    if Nq == Nk == 1:
        return state.step(q_map(lq), _mask_keys(k_map(lk), key_mask), v), state
    # a chunk longer than the input changes nothing but padding work
    chunk_size = min(chunk_size, Nq)
    prefix = Nk - Nq
    block = block_length(B * H, max(S, D + 1, chunk_size), chunk_size, block_size)
    # blocks by `split` rather than slicing: see `LinearState.absorb`
    (lk_prefix, lk), (v_prefix, v) = lk.split([prefix, Nq], dim=2), v.split([prefix, Nq], dim=2)
    if prefix:
        state.absorb(lk_prefix, v_prefix, _block(key_mask, 0, prefix), k_map, block)
    visible = _visible_rows(key_mask, state, prefix)
    # without autograd every block writes into one output (no list of block outputs, no concatenation)
    out = None if torch.is_grad_enabled() or is_tracing() else v.new_empty(B, H, Nq, D)
    workspace = None
    if out is not None:  # features, [v, 1], chunk sums, prefixes, scores and products of one block
        rows = -(-min(block, Nq) // chunk_size) * chunk_size
        E = D + 1
        numel = B * H * (rows * (2 * S + 3 * E + chunk_size) + 2 * (rows // chunk_size) * E * S) + 8 * _ALIGN
        workspace = Workspace(v, numel)
    outputs = []
    blocks = zip(range(0, Nq, block), lq.split(block, dim=2), lk.split(block, dim=2), v.split(block, dim=2))
    for start, q_b, k_b, v_b in blocks:
        mask_b = _block(key_mask, prefix + start, block)
        own = None
        if workspace is None:
            lq_b, lk_b = q_map(q_b), _mask_keys(k_map(k_b), mask_b)
        else:
            workspace.reset()
            n_b = q_b.shape[2]
            lq_b, own_q = map_into(q_map, q_b, workspace.take(B, H, n_b, S))
            lk_b, own_k = map_into(k_map, k_b, workspace.take(B, H, n_b, S))
            if mask_b is not None:  # in place on our own features, else a fresh copy (ours from then on)
                lk_b, own_k = _mask_keys(lk_b, mask_b, own_k), True
            own = (own_q, own_k)
        seen = None if visible is None else visible[:, :, start : start + block]
        out_b = None if out is None else out[:, :, start : start + q_b.shape[2]]
        # a traced graph (torch.compile / export) cannot branch on the data: it takes the exact loop, valid for any range
        result = None if is_tracing() else _fast_block(lq_b, lk_b, v_b, seen, chunk_size, state, out_b, own, workspace)
        if result is None:
            if out_b is not None:  # the fast block may have overwritten fresh features in place
                lq_b, lk_b = q_map(q_b), _mask_keys(k_map(k_b), mask_b)
            exact = _exact_block(lq_b, lk_b, v_b, chunk_size, state)
            outputs.append(exact if out_b is None else out_b.copy_(exact))
        else:
            outputs.append(result[0])
            state.kvz, state.shift = result[1].kvz, result[1].shift
    if out is not None:
        return out, state
    return (outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)), state


def _visible_rows(key_mask: torch.Tensor | None, state: LinearState, prefix: int) -> torch.Tensor | None:
    """`(B, H, Nq)` bool: query rows that see at least one real key (earlier state or keys up to themselves)."""
    if key_mask is None:
        return None
    seen_before = (state.shift > _LOG_FLOOR / 2).any(dim=-1)[:, :, None]  # (B, H, 1)
    seen_here = key_mask[:, prefix:].cumsum(dim=-1)[:, None, :] > 0  # (B, 1, Nq)
    return seen_before | seen_here


@dataclass(frozen=True)
class FeatureMaps:
    """The block-wise log-feature maps of a kernel estimator.

    Attributes:
        query (`LogFeatureMap`): `(B, H, n, D)` queries -> `(B, H, n, S)` log-features (up to a per-row constant).
        key (`LogFeatureMap`): `(B, H, n, D)` keys -> `(B, H, n, S)` log-features.
        num_features (`int`): `S`.
    """

    query: LogFeatureMap
    key: LogFeatureMap
    num_features: int


def kernel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    causal: bool,
    maps: FeatureMaps,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Kernel attention of raw `q` `(B, H, Nq, D)` over `k`, `v` `(B, H, Nk, D)` with block-wise feature maps."""
    kwargs = {"q_map": maps.query, "k_map": maps.key, "feature_dim": maps.num_features}
    if causal:
        return causal_linear_attention(q, k, v, key_mask, chunk_size, **kwargs)[0]
    return bidirectional_linear_attention(q, k, v, key_mask, **kwargs)
