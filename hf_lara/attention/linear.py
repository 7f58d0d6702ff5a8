"""Feature-map (kernel) attention in linear time, bidirectional and causal.

Every positive feature map in hf_lara (random features, LARA's causal proposals, learned kernels) hands this module
*log*-features `lq = log phi(q)` `(B, H, Nq, S)` and `lk = log phi(k)` `(B, H, Nk, S)`. Working in log space makes
the result immune to overflow and underflow:

* each feature `s` gets its own key shift `M_s = max_m lk_ms`; `phi_s(q) phi_s(k) = exp(lq_s + M_s) exp(lk_s - M_s)`,
  so the shift is folded into the query side, where a per-query row max cancels between numerator and denominator;
* after both shifts every feature column of the key sums holds a 1 and every query row holds a 1, so the
  normaliser is >= 1 in the bidirectional case and the output is a convex combination of the values;
* inside a causal chunk a per-key shift plays the same role (see `_intra_chunk_scores`), so a large key late in a
  chunk cannot make the earlier rows underflow.

The causal path is the chunkwise form (KERNELS_AND_PERF.md §2.1, form 4): an exact masked product inside each chunk
plus a running `S x D` state for everything before it, rescaled whenever the running per-feature max grows. No
`N x N` tensor and no `N x S x D` cumulative sum is ever built; memory is `O(N S + chunk^2 + S D)` per head.
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_SIZE = 64
# A finite "minus infinity" for running maxima: exp(a - b) stays well defined when both are at the floor.
_LOG_FLOOR = -1e30


def _tiny(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).tiny


def _mask_keys(lk: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    if key_mask is None:
        return lk
    return lk.masked_fill(~key_mask[:, None, :, None], float("-inf"))


def _key_shift(lk: torch.Tensor, dim: int = 2) -> torch.Tensor:
    """Detached per-feature max over keys, floored so that fully masked columns stay finite."""
    return lk.detach().amax(dim=dim).clamp_min(_LOG_FLOOR)


def _query_weights(lq: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """`exp(lq + shift - rowmax)` for `lq` `(B, H, n, S)` and a key shift `(B, H, S)`."""
    shifted = lq + shift[:, :, None, :]
    return torch.exp(shifted - shifted.detach().amax(dim=-1, keepdim=True))


def bidirectional_linear_attention(
    lq: torch.Tensor, lk: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """`phi(Q) (phi(K)^T V) / phi(Q) phi(K)^T 1` from log-features; `(B, H, N, D)`."""
    lk = _mask_keys(lk, key_mask)
    shift = _key_shift(lk)  # (B, H, S)
    phi_k = torch.exp(lk - shift[:, :, None, :])
    phi_q = _query_weights(lq, shift)
    kv = phi_k.transpose(-1, -2) @ v  # (B, H, S, D)
    z = phi_k.sum(dim=2)  # (B, H, S)
    num = phi_q @ kv
    den = (phi_q @ z[..., None]).clamp_min(_tiny(v.dtype))
    return num / den


class LinearState:
    """Running prefix statistics of causal kernel attention, kept relative to a per-feature log shift.

    Attributes:
        kv (`torch.Tensor` of shape `(B, H, S, D)`): `sum_m exp(lk_m - shift) v_m^T`.
        z (`torch.Tensor` of shape `(B, H, S)`): `sum_m exp(lk_m - shift)`.
        shift (`torch.Tensor` of shape `(B, H, S)`): the running (detached) max of the key log-features.
    """

    def __init__(self, kv: torch.Tensor, z: torch.Tensor, shift: torch.Tensor) -> None:
        self.kv, self.z, self.shift = kv, z, shift

    @classmethod
    def empty(cls, lk: torch.Tensor, v: torch.Tensor) -> LinearState:
        B, H, _, S = lk.shape
        kv = v.new_zeros(B, H, S, v.shape[-1])
        return cls(kv, v.new_zeros(B, H, S), v.new_full((B, H, S), _LOG_FLOOR))

    def absorb(self, lk: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Add keys `lk` `(B, H, n, S)` / values `(B, H, n, D)` to the state; returns their `phi(k)`."""
        new_shift = torch.maximum(self.shift, _key_shift(lk))
        decay = torch.exp(self.shift - new_shift)
        phi_k = torch.exp(lk - new_shift[:, :, None, :])
        self.kv = self.kv * decay[..., None] + phi_k.transpose(-1, -2) @ v
        self.z = self.z * decay + phi_k.sum(dim=2)
        self.shift = new_shift
        return phi_k


def _intra_chunk_scores(lq: torch.Tensor, lk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal scores inside one chunk, `P_ij = phi(q_i).phi(k_j)` for `j <= i`, scaled per row.

    A per-key shift `m_j` (its largest log-feature) absorbs the key's magnitude, so the `n x n` product of features
    in `[0, 1]` never underflows because of a large key that comes later in the chunk; the magnitudes come back as
    logits and each row is rescaled by its own causal max `d_i`.

    Returns:
        `P` `(B, H, n, n)` (lower-triangular) and `d` `(B, H, n)` with true scores `P * exp(d)[..., None]`.
    """
    e = lq.detach().amax(dim=-1, keepdim=True)  # (B, H, n, 1)
    key_max = lk.detach().amax(dim=-1)  # (B, H, n); -inf for padded keys
    m = key_max.clamp_min(_LOG_FLOOR)
    products = torch.exp(lq - e) @ torch.exp(lk - m[..., None]).transpose(-1, -2)
    logits = torch.log(products.clamp_min(_tiny(products.dtype))) + m[:, :, None, :] + e
    n = lq.shape[2]
    hidden = torch.ones(n, n, dtype=torch.bool, device=lq.device).triu(1) | (key_max == float("-inf"))[:, :, None, :]
    logits = logits.masked_fill(hidden, float("-inf"))
    d = logits.detach().amax(dim=-1).clamp_min(_LOG_FLOOR)
    return torch.exp(logits - d[..., None]), d


def causal_linear_attention(
    lq: torch.Tensor,
    lk: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    state: LinearState | None = None,
) -> tuple[torch.Tensor, LinearState]:
    """Causal kernel attention, chunkwise; queries are the last `Nq` of the `Nk` key positions.

    Args:
        lq (`torch.Tensor` of shape `(B, H, Nq, S)`): log query features.
        lk (`torch.Tensor` of shape `(B, H, Nk, S)`): log key features.
        v (`torch.Tensor` of shape `(B, H, Nk, D)`): values.
        key_mask (`torch.Tensor` of shape `(B, Nk)`, *optional*): True = real key.
        chunk_size (`int`, defaults to 64): tokens per chunk of the intra-chunk masked product.
        state (`LinearState`, *optional*): statistics of earlier tokens (not in `lk`) to continue from.

    Returns:
        The output `(B, H, Nq, D)` and the state after the last key (for continuing, e.g. decoding).
    """
    lk = _mask_keys(lk, key_mask)
    Nq, Nk = lq.shape[2], lk.shape[2]
    state = LinearState.empty(lk, v) if state is None else state
    prefix = Nk - Nq
    if prefix:
        state.absorb(lk[:, :, :prefix], v[:, :, :prefix])
    outputs = []
    for start in range(0, Nq, chunk_size):
        stop = min(start + chunk_size, Nq)
        lq_c = lq[:, :, start:stop]
        lk_c, v_c = lk[:, :, prefix + start : prefix + stop], v[:, :, prefix + start : prefix + stop]
        # earlier chunks through the state, scaled by exp(c); this chunk exactly, scaled by exp(d)
        shifted = lq_c + state.shift[:, :, None, :]
        c = shifted.detach().amax(dim=-1)
        phi_q = torch.exp(shifted - c[..., None])
        scores, d = _intra_chunk_scores(lq_c, lk_c)
        top = torch.maximum(c, d)
        inter_w, intra_w = torch.exp(c - top)[..., None], torch.exp(d - top)[..., None]
        num = inter_w * (phi_q @ state.kv) + intra_w * (scores @ v_c)
        den = inter_w * (phi_q @ state.z[..., None]) + intra_w * scores.sum(dim=-1, keepdim=True)
        outputs.append(num / den.clamp_min(_tiny(v.dtype)))
        state.absorb(lk_c, v_c)
    return torch.cat(outputs, dim=2), state
