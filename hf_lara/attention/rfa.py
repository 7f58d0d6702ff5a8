"""`rfa`: positive random-feature attention (Performer FAVOR+ / RFA), LARA paper §2.

With `x~ = x * scale**0.5` and `w_s ~ N(0, I)`, `xi(x, w) = exp(w.x~ - |x~|^2 / 2)` satisfies
`E[xi(q, w) xi(k, w)] = exp(scale * q.k)`, so `phi(x) = [xi(x, w_1), ..., xi(x, w_S)]` turns softmax attention into
kernel attention, computed in linear time by `linear.py`. In the LARA paper's view this is self-normalised
importance sampling with the data-independent proposal `N(0, I)`.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import AttentionEstimator, check_int, register_estimator
from .linear import DEFAULT_CHUNK_SIZE, FeatureMaps, half_squared_norm, kernel_attention, writes_into
from .random_features import gaussian, orthogonal_gaussian, positive_random_log_features
from .recurrent import RecurrentStateMixin
from .window import WindowMaps


@register_estimator("rfa")
class RandomFeatureAttention(RecurrentStateMixin, AttentionEstimator):
    """Positive random-feature attention.

    Args:
        num_heads (`int`): number of heads `H`.
        head_dim (`int`): head dimension `D`.
        num_features (`int`, *optional*, defaults to 64): random features `S` per head.
        orthogonal (`bool`, *optional*, defaults to `True`): draw features orthogonal within blocks of `D`.
        redraw (`bool`, *optional*, defaults to `False`): draw fresh features at every training forward pass
            (eval always uses the stored ones).
        chunk_size (`int`, *optional*, defaults to 64): chunk length of the causal path.
        window_size (`int`, *optional*, defaults to 0): `W > 0` attends exactly (softmax) to the `W` nearest keys
            (causal: the last `W`, itself included) and through the random features to the others, under one
            normaliser (`window.py`). `phi(q).phi(k) / S` estimates `exp(scale q.k)`, so both parts share a scale
            with no extra parameter. 0 = features only.
        sink_tokens (`int`, *optional*, defaults to 0): with a window, the first `G` real tokens (bidirectional:
            and the last `G`, e.g. `[CLS]` and `[SEP]`) are attended exactly by every query, as attention sinks
            (StreamingLLM, arXiv 2309.17453); they never enter the estimator. Decoding keeps them in the state.
        learn_features (`bool`, *optional*, defaults to `False`): make `projection` a trainable `nn.Parameter`
            (distillation moves the feature directions away from the Gaussian draw; the estimate is then a learned
            kernel, no longer unbiased). Same name and initial values as the buffer, so outputs at conversion and
            checkpoints are unchanged. Incompatible with `redraw`.

    The features live in `projection` `(H, S, D)` (a persistent buffer, or a parameter with `learn_features`), so a
    saved model reproduces exactly. Trained: nothing by default; `projection` with `learn_features=True`.

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
        window_size: int | None = 0,
        sink_tokens: int | None = 0,
        learn_features: bool = False,
    ) -> None:
        super().__init__(num_heads, head_dim)
        self.num_features = check_int("num_features", num_features)
        self._check_window(window_size, sink_tokens)
        if not isinstance(learn_features, bool):
            raise TypeError(f"`learn_features` must be a bool, got {learn_features!r}.")
        self.learn_features = learn_features
        self.chunk_size = check_int("chunk_size", chunk_size)
        if not isinstance(orthogonal, bool):
            raise TypeError(f"`orthogonal` must be True or False, got {orthogonal!r}.")
        self.orthogonal = orthogonal
        if not isinstance(redraw, bool):
            raise TypeError(f"`redraw` must be True or False, got {redraw!r}.")
        self.redraw = redraw
        if learn_features and redraw:
            raise ValueError("`learn_features=True` trains the features and `redraw=True` replaces them: choose one.")
        if learn_features:
            self.projection = nn.Parameter(self.draw_features())
        else:
            self.register_buffer("projection", self.draw_features(), persistent=True)

    def draw_features(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A fresh `(H, S, D)` draw of feature directions."""
        draw = orthogonal_gaussian if self.orthogonal else gaussian
        return draw(self.num_heads, self.num_features, self.head_dim, generator=generator)

    def log_features(self, x: torch.Tensor, scale: float, omega: torch.Tensor) -> torch.Tensor:
        """`log phi(x)` `(B, H, N, S)` for `x` `(B, H, N, D)`."""
        return positive_random_log_features(x * scale**0.5, omega)

    def current_projection(self, device: torch.device) -> torch.Tensor:
        """The `(H, S, D)` features of this pass: a fresh draw when training with `redraw`, else `projection`."""
        return self.draw_features().to(device) if (self.training and self.redraw) else self.projection

    def feature_maps(self, scale: float, dtype: torch.dtype, omega: torch.Tensor | None = None) -> FeatureMaps:
        """Block-wise log-feature maps `(B, H, n, D) -> (B, H, n, S)` for queries and keys.

        The scale is folded into the projection; the query map leaves out the per-query `-|q~|^2 / 2`, which
        cancels in the normalised output.
        """
        omega = self.projection if omega is None else omega
        weight = (omega.to(dtype) * scale**0.5).transpose(-1, -2)  # (H, D, S)

        @writes_into
        def query_map(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
            return torch.matmul(x, weight, out=out)

        @writes_into
        def key_map(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
            return torch.matmul(x, weight, out=out).sub_(half_squared_norm(x, scale))

        return FeatureMaps(query_map, key_map, self.num_features)

    def window_maps(self, scale: float, dtype: torch.dtype, omega: torch.Tensor | None = None) -> WindowMaps:
        """Complete log-features: `log xi(x, w_s)` for keys and queries, minus `log S` on the query side."""
        key_map = self.feature_maps(scale, dtype, omega).key
        log_s = math.log(self.num_features)

        def query_map(x: torch.Tensor) -> torch.Tensor:
            return key_map(x).sub_(log_s)

        return WindowMaps(query_map, key_map, self.num_features)

    def attend(self, q, k, v, key_mask, causal, scale):
        omega = self.current_projection(q.device)
        if self.window_size:
            return self.attend_windowed(q, k, v, key_mask, causal, scale, self.window_maps(scale, q.dtype, omega))
        maps = self.feature_maps(scale, q.dtype, omega)
        return kernel_attention(q, k, v, key_mask, causal, maps, self.chunk_size)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_features={self.num_features}, orthogonal={self.orthogonal}, "
            f"window_size={self.window_size}, sink_tokens={self.sink_tokens}, learn_features={self.learn_features}"
        )
