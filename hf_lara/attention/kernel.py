"""`kernel`: trainable feature-map attention (FFN/GLU/deep kernels, Hedgehog, T2R): arXiv 2211.04076,
Hedgehog arXiv 2402.04347, T2R arXiv 2103.13076.

One per-head feature map `phi` is shared by queries and keys and acts on tilde inputs `x~ = x * scale**0.5`;
the attention row is `o_i = sum_j phi(q~_i).phi(k~_j) v_j / sum_j phi(q~_i).phi(k~_j)`, computed in linear time
by `linear.py`. Every map returns *log*-features `(B, H, N, S)`, so exp-type maps never overflow:

* `ffn`: `softplus(W x + b)` (Yorsh & Kovalenko, arXiv 2211.04076), `W` orthogonal.
* `glu`: `softplus(W1 x + b1) * sigmoid(W2 x + b2)` (same paper), `W1` orthogonal.
* `deep`: `depth` gated blocks, `(W_o h) * sigmoid(W_g h)` inside, `softplus(W_o h) * sigmoid(W_g h)` last.
* `hedgehog`: `[exp(W x + b - |x|^2 / 2), exp(-(W x + b) - |x|^2 / 2)]` (Hedgehog, arXiv 2402.04347, S = 2 F).
* `t2r`: `relu(W x + b)` (T2R, arXiv 2103.13076), floored at `RELU_FLOOR`.

The `|x|^2 / 2` term of `hedgehog` is ours: with `W` drawn by `orthogonal_gaussian` and `b = 0` the map is exactly
the antithetic positive random features of Performer, `E[phi(q).phi(k)] / 2F = exp(q~.k~)`, so a fresh conversion
starts as an unbiased estimate of softmax attention and distillation moves it toward a learned map. The paper
normalises `[exp(Wx), exp(-Wx)]` by a per-token softmax instead; both are per-token factors, which cancel for
queries and re-weight keys. `feature_init="identity"` gives the paper's `W = I, b = 0`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import AttentionEstimator, check_choice, check_float, check_int, register_estimator
from .linear import DEFAULT_CHUNK_SIZE, FeatureMaps, half_squared_norm, kernel_attention, writes_into
from .random_features import orthogonal_gaussian
from .recurrent import RecurrentStateMixin
from .window import WindowMaps

FEATURE_INITS = ("random", "identity")
#: relu features are floored here before the log, so every feature is positive and every normaliser is > 0.
RELU_FLOOR = 1e-12
# Below this, softplus(z) = exp(z) (1 - exp(z) / 2 + ...) equals exp(z) to within fp64 rounding.
_SOFTPLUS_TAIL = -40.0


def log_softplus(z: torch.Tensor) -> torch.Tensor:
    """`log(softplus(z))` without underflow to `-inf` for very negative `z`; same shape as `z`."""
    softplus = z.clamp_min(0) + torch.log1p(torch.exp(-z.abs()))
    tail = z < _SOFTPLUS_TAIL
    # the unused branch must stay finite, or its gradient (0 * inf) turns into NaN
    return torch.where(tail, z, torch.log(torch.where(tail, torch.ones_like(z), softplus)))


def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Per-head linear layer: `x` `(B, H, N, D)`, `weight` `(H, S, D)`, `bias` `(H, S)` -> `(B, H, N, S)`."""
    out = torch.einsum("bhnd,hsd->bhns", x, weight.to(x.dtype))
    return out if bias is None else out + bias.to(x.dtype)[None, :, None, :]


def orthogonal_init(num_heads: int, num_rows: int, dim: int) -> torch.Tensor:
    """Haar-random `(H, S, D)` with orthonormal rows (`W W^T = I`) if `S <= D`, else orthonormal columns."""
    tall = torch.randn(num_heads, max(num_rows, dim), min(num_rows, dim))
    q, r = torch.linalg.qr(tall)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]
    return q.transpose(-1, -2) if num_rows <= dim else q


def identity_init(num_heads: int, num_rows: int, dim: int) -> torch.Tensor:
    """`(H, S, D)` whose row `s` is the unit vector `e_(s mod D)`: exactly `I` when `S = D`."""
    rows = torch.eye(dim)[torch.arange(num_rows) % dim]
    return rows.expand(num_heads, -1, -1).clone()


def gate_init(num_heads: int, num_rows: int, dim: int) -> torch.Tensor:
    """`U(-1/sqrt(D), 1/sqrt(D))` entries, the scale of `nn.Linear`'s default init, `(H, S, D)`."""
    bound = 1.0 / math.sqrt(dim)
    return torch.empty(num_heads, num_rows, dim).uniform_(-bound, bound)


def orthogonality_error(weight: torch.Tensor) -> torch.Tensor:
    """`mean((W W^T - I)^2)` over heads for `weight` `(H, S, D)`, using `W^T W` (`D x D`) when `S > D`."""
    if weight.shape[-2] > weight.shape[-1]:
        weight = weight.transpose(-1, -2)
    gram = weight @ weight.transpose(-1, -2)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return (gram - eye).pow(2).mean()


class FeatureMap(nn.Module):
    """A per-head positive feature map; `forward(x~)` `(B, H, N, D)` returns log-features `(B, H, N, S)`.

    Args:
        num_heads (`int`): heads `H`, each with its own weights.
        head_dim (`int`): input dimension `D`.
        num_features (`int`): features `F` per branch (`S = F`, or `2F` for two-branch maps).
        feature_init (`str`, *optional*, defaults to `"random"`): `"random"` (the map's random init) or
            `"identity"` (main weight `e_(s mod D)` rows, biases zero).
    """

    def __init__(self, num_heads: int, head_dim: int, num_features: int, feature_init: str = "random") -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.num_features = num_heads, head_dim, num_features
        self.feature_init = feature_init

    @property
    def output_features(self) -> int:
        """`S`, the width of the log-features."""
        return self.num_features

    def main_weight(self, num_rows: int | None = None) -> nn.Parameter:
        """Main weight `(H, num_rows, D)` (default `num_rows = F`): orthogonal, or identity-like per `feature_init`."""
        shape = (self.num_heads, num_rows or self.num_features, self.head_dim)
        return nn.Parameter(identity_init(*shape) if self.feature_init == "identity" else orthogonal_init(*shape))

    def forward(
        self, x: torch.Tensor, scale: float | None = None, query: bool = False, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`log phi(x~)` `(B, H, N, S)`: of tilde inputs `x` if `scale` is None, else of `x~ = x * scale**0.5`.

        With `query=True` a map may leave out any per-row additive constant (it cancels for queries). `out` (a
        `(B, H, N, S)` buffer, without autograd) may receive the result; maps that cannot use it return a new tensor.
        """
        if scale is None:
            return self.log_features(x)
        return self.raw_log_features(x, scale, query, out)

    def raw_log_features(
        self, x: torch.Tensor, scale: float, query: bool, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Log-features of raw inputs `x` `(B, H, N, D)` (the scale folded in where the map allows it)."""
        return self.log_features(x * scale**0.5)

    def log_features(self, x_tilde: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def orthogonal_weights(self) -> list[torch.Tensor]:
        """Weights the orthogonality penalty applies to."""
        return []

    def block_maps(self, scale: float) -> FeatureMaps:
        """Maps of raw (not tilde) blocks `(B, H, n, D) -> (B, H, n, S)` for queries and keys (module calls)."""

        @writes_into
        def query_map(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
            return self(x, scale, True, out)

        @writes_into
        def key_map(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
            return self(x, scale, False, out)

        return FeatureMaps(query_map, key_map, self.output_features)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, output_features={self.output_features}"


class FFNFeatureMap(FeatureMap):
    """`softplus(W x + b)`, `W` `(H, S, D)` orthogonal, `b` `(H, S)` zero."""

    def __init__(self, num_heads: int, head_dim: int, num_features: int, feature_init: str = "random") -> None:
        super().__init__(num_heads, head_dim, num_features, feature_init)
        self.weight = self.main_weight()
        self.bias = nn.Parameter(torch.zeros(num_heads, num_features))

    def log_features(self, x_tilde: torch.Tensor) -> torch.Tensor:
        return log_softplus(project(x_tilde, self.weight, self.bias))

    def orthogonal_weights(self) -> list[torch.Tensor]:
        return [self.weight]


class GLUFeatureMap(FFNFeatureMap):
    """`softplus(W x + b) * sigmoid(W_g x + b_g)`; the gate `W_g` has `nn.Linear`-scale uniform init."""

    def __init__(self, num_heads: int, head_dim: int, num_features: int, feature_init: str = "random") -> None:
        super().__init__(num_heads, head_dim, num_features, feature_init)
        self.gate_weight = nn.Parameter(gate_init(num_heads, num_features, head_dim))
        self.gate_bias = nn.Parameter(torch.zeros(num_heads, num_features))

    def log_features(self, x_tilde: torch.Tensor) -> torch.Tensor:
        gate = F.logsigmoid(project(x_tilde, self.gate_weight, self.gate_bias))
        return super().log_features(x_tilde) + gate


class DeepFeatureMap(FeatureMap):
    """`depth` gated blocks: `h <- (W_o h) * sigmoid(W_g h)` (`D -> D`), then `softplus(W_o h) * sigmoid(W_g h)`.

    Inner weights are `(H, D, D)`, the last block's `(H, S, D)`; every `W_o` is orthogonal and penalised.
    """

    def __init__(
        self, num_heads: int, head_dim: int, num_features: int, feature_init: str = "random", depth: int = 2
    ) -> None:
        super().__init__(num_heads, head_dim, num_features, feature_init)
        self.depth = depth
        widths = [head_dim] * (depth - 1) + [num_features]
        self.out_weights = nn.ParameterList(self.main_weight(width) for width in widths)
        self.gate_weights = nn.ParameterList(nn.Parameter(gate_init(num_heads, w, head_dim)) for w in widths)

    def log_features(self, x_tilde: torch.Tensor) -> torch.Tensor:
        # index, never slice: a sliced ParameterList re-wraps tensors as new leaves (breaks `functional_call`)
        *inner, (last_out, last_gate) = zip(self.out_weights, self.gate_weights, strict=True)
        h = x_tilde
        for w_out, w_gate in inner:
            h = project(h, w_out) * torch.sigmoid(project(h, w_gate))
        return log_softplus(project(h, last_out)) + F.logsigmoid(project(h, last_gate))

    def orthogonal_weights(self) -> list[torch.Tensor]:
        return list(self.out_weights)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, depth={self.depth}"


class HedgehogFeatureMap(FeatureMap):
    """`[exp(W x + b - |x|^2 / 2), exp(-(W x + b) - |x|^2 / 2)]`, `S = 2F`; random init = antithetic Performer.

    `"random"` draws `W` with `orthogonal_gaussian` (rows orthogonal within blocks of `D`, chi-distributed norms),
    so the rows are not orthonormal by design and no weight is penalised.
    """

    def __init__(self, num_heads: int, head_dim: int, num_features: int, feature_init: str = "random") -> None:
        super().__init__(num_heads, head_dim, num_features, feature_init)
        if feature_init == "identity":
            weight = identity_init(num_heads, num_features, head_dim)
        else:
            weight = orthogonal_gaussian(num_heads, num_features, head_dim)
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.zeros(num_heads, num_features))

    @property
    def output_features(self) -> int:
        return 2 * self.num_features

    def log_features(self, x_tilde: torch.Tensor) -> torch.Tensor:
        z = project(x_tilde, self.weight, self.bias)
        half_norm = 0.5 * x_tilde.pow(2).sum(dim=-1, keepdim=True)
        return torch.cat([z - half_norm, -z - half_norm], dim=-1)

    def raw_log_features(
        self, x: torch.Tensor, scale: float, query: bool, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One GEMM for `z = sqrt(scale) W x + b` `(B, H, n, F)`, then `[z, -z]` (half the FLOPs of `[W; -W]`),
        written into `out` when given.

        Queries leave out `-|q~|^2 / 2`, a per-query constant that cancels in the normalised output.
        """
        weight = (self.weight.to(x.dtype) * scale**0.5).transpose(-1, -2)  # (H, D, F)
        z = torch.matmul(x, weight).add_(self.bias.to(x.dtype)[:, None, :])
        if out is None:
            out = torch.cat([z, -z], dim=-1)
        else:
            torch.cat([z, z], dim=-1, out=out)[..., z.shape[-1] :].neg_()
        return out if query else out.sub_(half_squared_norm(x, scale))


class T2RFeatureMap(FFNFeatureMap):
    """`max(relu(W x + b), RELU_FLOOR)`; `W` orthogonal (`"random"`) or `I` (`"identity"`), `b` zero.

    The floor keeps every normaliser positive (a row of exact zeros would give 0/0) and costs a bias of at most
    `S * RELU_FLOOR^2` per kernel value; the gradient is zero below the floor, as for relu.
    """

    def log_features(self, x_tilde: torch.Tensor) -> torch.Tensor:
        return torch.log(project(x_tilde, self.weight, self.bias).clamp_min(RELU_FLOOR))


FEATURE_MAPS: dict[str, type[FeatureMap]] = {
    "deep": DeepFeatureMap,
    "ffn": FFNFeatureMap,
    "glu": GLUFeatureMap,
    "hedgehog": HedgehogFeatureMap,
    "t2r": T2RFeatureMap,
}


@register_estimator("kernel")
class KernelAttention(RecurrentStateMixin, AttentionEstimator):
    """Linear attention with a trainable feature map shared by queries and keys.

    Args:
        num_heads (`int`): number of heads `H`.
        head_dim (`int`): head dimension `D`.
        feature_map (`str`, *optional*, defaults to `"hedgehog"`): one of `FEATURE_MAPS`
            (`deep`, `ffn`, `glu`, `hedgehog`, `t2r`).
        num_features (`int`, *optional*, defaults to `head_dim`): features `F` per branch (`hedgehog` has `2F`).
        depth (`int`, *optional*, defaults to 2): gated blocks of the `deep` map (ignored by the others).
        feature_init (`str`, *optional*, defaults to `"random"`): `"random"` (orthogonal; for `hedgehog` orthogonal
            Gaussian, i.e. unbiased softmax features) or `"identity"` (Hedgehog's `W = I`, `b = 0`).
        ortho_penalty (`float`, *optional*, defaults to 0.0): weight `lambda` of the orthogonality penalty
            returned by `auxiliary_loss`.
        chunk_size (`int`, *optional*, defaults to 64): chunk length of the causal path.
        window_size (`int`, *optional*, defaults to 0): `W > 0` attends exactly (softmax) to the `W` nearest keys
            (causal: the last `W`, itself included) and through the feature map to the others, under one normaliser
            (`window.py`, LoLCATs arXiv 2410.10254). A learned feature map need not estimate `exp(scale q.k)`, so
            the kernel part is multiplied by `exp(window_log_factor)`, a trainable per-head parameter `(H,)`
            initialised to `-log S` (`S` the number of features: exact in expectation for `hedgehog`'s random
            init, the antithetic Performer features). 0 = kernel only (no extra parameter).
        sink_tokens (`int`, *optional*, defaults to 0): with a window, the first `G` real tokens (bidirectional:
            and the last `G`, e.g. `[CLS]` and `[SEP]`) are attended exactly by every query, as attention sinks
            (StreamingLLM, arXiv 2309.17453); they never enter the estimator. Decoding keeps them in the state.

    Trained: the feature map's weights (`feature_map.*`) and, with a window, `window_log_factor`.

    >>> attn = KernelAttention(num_heads=2, head_dim=16, feature_map="glu", ortho_penalty=0.1)
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        feature_map: str = "hedgehog",
        num_features: int | None = None,
        depth: int = 2,
        feature_init: str = "random",
        ortho_penalty: float = 0.0,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        window_size: int | None = 0,
        sink_tokens: int | None = 0,
    ) -> None:
        super().__init__(num_heads, head_dim)
        self._check_window(window_size, sink_tokens)
        self.feature_map_name = check_choice("feature_map", feature_map, tuple(FEATURE_MAPS))
        self.num_features = check_int("num_features", head_dim if num_features is None else num_features)
        self.depth = check_int("depth", depth)
        self.feature_init = check_choice("feature_init", feature_init, FEATURE_INITS)
        self.ortho_penalty = check_float("ortho_penalty", ortho_penalty)
        self.chunk_size = check_int("chunk_size", chunk_size)
        extra = {"depth": self.depth} if feature_map == "deep" else {}
        self.feature_map = FEATURE_MAPS[feature_map](
            num_heads, head_dim, self.num_features, feature_init=self.feature_init, **extra
        )
        if self.window_size:
            log_s = math.log(self.feature_map.output_features)
            self.window_log_factor = nn.Parameter(torch.full((num_heads,), -log_s))

    def feature_maps(self, scale: float, dtype: torch.dtype) -> FeatureMaps:
        """Block-wise log-feature maps of raw queries and keys (see `FeatureMap.block_maps`)."""
        return self.feature_map.block_maps(scale)

    def window_maps(self, scale: float, dtype: torch.dtype) -> WindowMaps:
        """Complete log-features of the map for keys; queries add `window_log_factor` (per head)."""

        def key_map(x: torch.Tensor) -> torch.Tensor:
            return self.feature_map(x, scale, False)

        def query_map(x: torch.Tensor) -> torch.Tensor:
            return key_map(x) + self.window_log_factor.to(x.dtype)[:, None, None]

        return WindowMaps(query_map, key_map, self.feature_map.output_features)

    def attend(self, q, k, v, key_mask, causal, scale):
        if self.window_size:
            return self.attend_windowed(q, k, v, key_mask, causal, scale)
        return kernel_attention(q, k, v, key_mask, causal, self.feature_maps(scale, q.dtype), self.chunk_size)

    def auxiliary_loss(self) -> torch.Tensor | None:
        """`lambda * sum_W mean((W W^T - I)^2)` over `feature_map.orthogonal_weights()`, or None if `lambda == 0`."""
        if self.ortho_penalty == 0.0:
            return None
        weights = self.feature_map.orthogonal_weights()
        if not weights:
            return next(self.parameters()).new_zeros(())
        return self.ortho_penalty * sum(orthogonality_error(w) for w in weights)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, feature_map={self.feature_map_name!r}, num_features={self.num_features}, "
            f"feature_init={self.feature_init!r}, ortho_penalty={self.ortho_penalty}, window_size={self.window_size}, sink_tokens={self.sink_tokens}"
        )
