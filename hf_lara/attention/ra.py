"""`ra`: randomized attention (LARA paper §3), the quadratic and *unbiased* Monte-Carlo form of softmax attention.

In tilde space (`x~ = x * scale**0.5`, so `scale * q.k = q~.k~`) and with `xi(x, w) = exp(w.x~ - |x~|^2 / 2)`,
softmax attention is an expectation (arXiv 2204.04667 §3; `hf_lara/attention/README.md`, Notation):

    softmax-attn(q_n) = E_{w ~ p_n}[f(w)],
    p_n(w) = sum_m pi_nm N(w; q~_n + k~_m, I),        pi_nm = softmax_m(q~_n.k~_m)   (the exact probabilities),
    f(w)   = sum_m softmax_m(w.k~_m - |k~_m|^2 / 2) v_m,

both sums running over the keys query `n` may see (padding masked, causal with `Nq < Nk` offsets). Training draws,
for each query and each of `num_samples` draws, a component `m* ~ Categorical(pi_n)` (no gradient through the
choice) and `w = q~_n + k~_{m*} + eps` with `eps ~ N(0, I)` **in tilde space**, and returns the mean of `f(w)`.
The official code adds `N(0, I)` noise in raw space, i.e. standard deviation `scale**0.5` in tilde space, which
makes the estimator biased (`hf_lara/attention/README.md`, Notation); we do not copy it.

Eval is deterministic: `w = q~_n + sum_m pi_nm k~_m`, the mean of the mixture `p_n` (the official
`num_samples=-1` mode). It is not exact softmax attention, only a plug-in point estimate of the expectation.
Cost is `O(Nq Nk (D + num_samples D))` time and `O(Nq Nk num_samples)` memory: RA is a reference, not a fast path.
"""

from __future__ import annotations

import torch

from .base import AttentionEstimator, check_int, register_estimator
from .naive import masked_softmax, visibility_mask


def sample_omega(q_t: torch.Tensor, k_t: torch.Tensor, probs: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Draws `w ~ p_n`, shape `(B, H, Nq, S, D)`, for `q_t` `(B, H, Nq, D)`, `k_t` `(B, H, Nk, D)`, `probs` `pi`."""
    B, H, Nq, Nk = probs.shape
    with torch.no_grad():
        weights = probs.reshape(-1, Nk)
        # a row that sees no key still needs a valid component; its output is zeroed by the key mask later
        weights = torch.where(weights.sum(-1, keepdim=True) > 0, weights, torch.ones_like(weights))
        index = torch.multinomial(weights, num_samples, replacement=True).reshape(B, H, Nq * num_samples)
    k_star = k_t.gather(2, index[..., None].expand(-1, -1, -1, k_t.shape[-1]))
    k_star = k_star.reshape(B, H, Nq, num_samples, -1)
    eps = torch.randn(k_star.shape, dtype=k_t.dtype, device=k_t.device)
    return q_t[:, :, :, None] + k_star + eps


def key_average(omega: torch.Tensor, k_t: torch.Tensor, v: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """`f(w)` for every sample: `omega` `(B, H, Nq, S, D)`, `k_t`, `v` `(B, H, Nk, D)` -> `(B, H, Nq, S, D)`."""
    B, H, Nq, S, D = omega.shape
    # one (Nq * S) x Nk product per head rather than Nq tiny ones
    logits = omega.reshape(B, H, Nq * S, D) @ k_t.transpose(-1, -2)
    logits = (logits - 0.5 * (k_t * k_t).sum(-1)[:, :, None, :]).reshape(B, H, Nq, S, -1)
    probs = masked_softmax(logits, visible[:, :, :, None])
    return (probs.reshape(B, H, Nq * S, -1) @ v).reshape(B, H, Nq, S, -1)


@register_estimator("ra")
class RandomizedAttention(AttentionEstimator):
    """Randomized attention: an unbiased Monte-Carlo estimate of softmax attention (quadratic).

    Args:
        num_heads (`int`): number of heads `H`.
        head_dim (`int`): head dimension `D`.
        num_samples (`int`, *optional*, defaults to 1): independent draws per query averaged in training mode.
            Eval mode ignores it and uses the mixture mean (see the module docstring).

    Training-mode outputs are random (use `torch.manual_seed` to reproduce them); eval mode is deterministic.

    >>> attn = RandomizedAttention(num_heads=2, head_dim=16, num_samples=4)
    """

    is_linear = False

    def __init__(self, num_heads: int, head_dim: int, num_samples: int = 1) -> None:
        super().__init__(num_heads, head_dim)
        self.num_samples = check_int("num_samples", num_samples)

    def attend(self, q, k, v, key_mask, causal, scale):
        q_t, k_t = q * scale**0.5, k * scale**0.5
        visible = visibility_mask(key_mask, q.shape[2], k.shape[2], causal, q.device)  # (B or 1, 1, Nq, Nk)
        probs = masked_softmax(q_t @ k_t.transpose(-1, -2), visible)
        if self.training:
            omega = sample_omega(q_t, k_t, probs, self.num_samples)
        else:
            omega = (q_t + probs @ k_t)[:, :, :, None]
        return key_average(omega, k_t, v, visible).mean(dim=3)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_samples={self.num_samples}"
