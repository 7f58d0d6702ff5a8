"""`rfa`: positive random-feature attention (Performer FAVOR+ / RFA), LARA paper §2.

With `x~ = x * scale**0.5` and `w_s ~ N(0, I)`, `xi(x, w) = exp(w.x~ - |x~|^2 / 2)` satisfies
`E[xi(q, w) xi(k, w)] = exp(scale * q.k)`, so `phi(x) = [xi(x, w_1), ..., xi(x, w_S)]` turns softmax attention into
kernel attention, computed in linear time by `linear.py`. In the LARA paper's view this is self-normalised
importance sampling with the data-independent proposal `N(0, I)`.
"""

from __future__ import annotations

import torch

from .base import AttentionEstimator, check_int, register_estimator
from .linear import DEFAULT_CHUNK_SIZE, bidirectional_linear_attention, causal_linear_attention
from .random_features import gaussian, orthogonal_gaussian, positive_random_log_features


@register_estimator("rfa")
class RandomFeatureAttention(AttentionEstimator):
    """Positive random-feature attention.

    Args:
        num_heads (`int`): number of heads `H`.
        head_dim (`int`): head dimension `D`.
        num_features (`int`, *optional*, defaults to 64): random features `S` per head.
        orthogonal (`bool`, *optional*, defaults to `True`): draw features orthogonal within blocks of `D`.
        redraw (`bool`, *optional*, defaults to `False`): draw fresh features at every training forward pass
            (eval always uses the stored ones).
        chunk_size (`int`, *optional*, defaults to 64): chunk length of the causal path.

    The features live in the persistent buffer `projection` `(H, S, D)`, so a saved model reproduces exactly.

    >>> attn = RandomFeatureAttention(num_heads=2, head_dim=16, num_features=32)
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        num_features: int = 64,
        orthogonal: bool = True,
        redraw: bool = False,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        super().__init__(num_heads, head_dim)
        self.num_features = check_int("num_features", num_features)
        self.chunk_size = check_int("chunk_size", chunk_size)
        self.orthogonal = bool(orthogonal)
        self.redraw = bool(redraw)
        self.register_buffer("projection", self.draw_features(), persistent=True)

    def draw_features(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A fresh `(H, S, D)` draw of feature directions."""
        draw = orthogonal_gaussian if self.orthogonal else gaussian
        return draw(self.num_heads, self.num_features, self.head_dim, generator=generator)

    def log_features(self, x: torch.Tensor, scale: float, omega: torch.Tensor) -> torch.Tensor:
        """`log phi(x)` `(B, H, N, S)` for `x` `(B, H, N, D)`."""
        return positive_random_log_features(x * scale**0.5, omega)

    def attend(self, q, k, v, key_mask, causal, scale):
        omega = self.draw_features().to(q.device) if (self.training and self.redraw) else self.projection
        lq, lk = self.log_features(q, scale, omega), self.log_features(k, scale, omega)
        if causal:
            return causal_linear_attention(lq, lk, v, key_mask, self.chunk_size)[0]
        return bidirectional_linear_attention(lq, lk, v, key_mask)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_features={self.num_features}, orthogonal={self.orthogonal}"
