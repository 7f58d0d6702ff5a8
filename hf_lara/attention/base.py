"""The estimator contract, the method registry and the factory `build_attention`.

Every estimator is an `nn.Module` whose forward is

    module(q, k, v, *, padding_mask=None, causal=False, scale=None) -> out

with `q` `(B, H, Nq, D)`, `k` and `v` `(B, H, Nk, D)`, `padding_mask` `(B, Nk)` bool (True = real token) and
`out` `(B, H, Nq, D)`. With `causal=True` and `Nq < Nk` the queries are the last `Nq` key positions (decoding over a
cache). Work happens in fp32 (fp64 stays fp64) and the output is cast back to the input dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

ESTIMATORS: dict[str, type[AttentionEstimator]] = {}


def register_estimator(name: str) -> Callable[[type[AttentionEstimator]], type[AttentionEstimator]]:
    """Class decorator adding an estimator to the registry under `name` (the public method name)."""

    def decorator(cls: type[AttentionEstimator]) -> type[AttentionEstimator]:
        if not name.isidentifier() or name != name.lower():
            raise ValueError(f"Estimator name must be a lower-case identifier, got {name!r}.")
        if name in ESTIMATORS and ESTIMATORS[name] is not cls:
            raise ValueError(f"An estimator named {name!r} is already registered ({ESTIMATORS[name].__name__}).")
        cls.method = name
        ESTIMATORS[name] = cls
        return cls

    return decorator


def available_methods() -> list[str]:
    """Names accepted by `build_attention`, sorted."""
    return sorted(ESTIMATORS)


def build_attention(method: str, *, num_heads: int, head_dim: int, **hparams: Any) -> AttentionEstimator:
    """Build the estimator registered as `method`.

    Args:
        method (`str`): one of `available_methods()` (`softmax`, `rfa`, `ra`, `lara`, `eva`, `kernel`).
        num_heads (`int`): number of query heads `H`.
        head_dim (`int`): per-head dimension `D`.
        **hparams: the estimator's own hyper-parameters (see each class docstring).

    >>> from hf_lara.attention import build_attention
    >>> attn = build_attention("rfa", num_heads=4, head_dim=32, num_features=64)
    """
    if method not in ESTIMATORS:
        raise ValueError(f"Unknown attention method {method!r}. Valid methods: {', '.join(available_methods())}.")
    return ESTIMATORS[method](num_heads=num_heads, head_dim=head_dim, **hparams)


def check_int(name: str, value: Any, *, minimum: int = 1) -> int:
    """Return `value` if it is an int >= `minimum`, else raise a `ValueError` naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value}.")
    return value


def check_float(name: str, value: Any, *, minimum: float = 0.0, inclusive: bool = True) -> float:
    """Return `value` as float if it is a number above `minimum`, else raise a `ValueError` naming `name`."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok:
        ok = value >= minimum if inclusive else value > minimum
    if not ok:
        bound = ">=" if inclusive else ">"
        raise ValueError(f"`{name}` must be a number {bound} {minimum}, got {value!r}.")
    return float(value)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """Return `value` if it is one of `choices`, else raise a `ValueError` listing them."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, choices))}, got {value!r}.")
    return value


def resolve_scale(scale: Any, head_dim: int) -> float:
    """The logit scale: `head_dim ** -0.5` for None, else `scale` if it is a finite number > 0."""
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"`scale` must be a finite number > 0 (or None for head_dim ** -0.5), got {scale!r}.")
    return float(scale)


def is_empty(q: torch.Tensor) -> bool:
    """No batch row or no query: `(0, H, N, D)` or `(B, H, 0, D)`."""
    return q.shape[0] == 0 or q.shape[2] == 0


#: `log2 e`: logits times this are base-2 logits for the in-place `exp2_` of the inference paths.
LOG2E = 1.0 / math.log(2.0)


def records_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd would record an operation on any of `tensors` (if not, in-place inference paths may run)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def is_tracing() -> bool:
    """True under `torch.compile` or `torch.export`: no host synchronisation nor data-dependent shape allowed."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Estimators accumulate in fp32; fp64 inputs stay fp64 so exactness tests can be tight."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class PackedGroup:
    """Sequences of one real length, with their padding removed.

    Attributes:
        batch_index (`LongTensor` of shape `(b,)`): rows of the original batch.
        key_index (`LongTensor` of shape `(b, n)`): original key positions of the `n` real keys, in order.
        query_index (`LongTensor` of shape `(b, m)`): original query rows of the `m` real queries, in order;
            their packed positions are `n - m ... n - 1`.
    """

    batch_index: torch.Tensor
    key_index: torch.Tensor
    query_index: torch.Tensor


def packed_groups(padding_mask: torch.Tensor, num_queries: int) -> Iterator[PackedGroup]:
    """Group the batch by (real keys, real queries) so that padding can be cut away, left or right.

    Queries are the last `num_queries` key positions, so the real queries of a row are always its last real
    tokens: in packed coordinates they occupy positions `n - m ... n - 1`. Estimators whose geometry (chunks,
    landmarks, windows) is anchored at position 0 run each group unpadded, which makes them padding invariant.
    """
    num_keys = padding_mask.shape[-1]
    query_mask = padding_mask[:, num_keys - num_queries :]
    key_counts = padding_mask.sum(-1)
    query_counts = query_mask.sum(-1)
    # stable sort puts real tokens first, in their original order
    key_order = torch.sort((~padding_mask).to(torch.int8), dim=-1, stable=True).indices
    query_order = torch.sort((~query_mask).to(torch.int8), dim=-1, stable=True).indices
    pairs = torch.stack([key_counts, query_counts], dim=-1)
    for n, m in torch.unique(pairs, dim=0).tolist():
        if m == 0:
            continue
        rows = torch.nonzero((pairs[:, 0] == n) & (pairs[:, 1] == m)).flatten()
        yield PackedGroup(rows, key_order[rows, :n], query_order[rows, :m])


def gather_tokens(x: torch.Tensor, rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`x[rows][b, :, index[b]]` for `x` of shape `(B, H, N, D)` and `index` `(b, n)` -> `(b, H, n, D)`."""
    picked = x[rows]
    idx = index[:, None, :, None].expand(-1, picked.shape[1], -1, picked.shape[-1])
    return picked.gather(2, idx)


class AttentionEstimator(nn.Module):
    """Base class of every estimator: argument checks, dtype handling and padding/causal bookkeeping.

    Subclasses implement `attend(q, k, v, key_mask, causal, scale)` on fp32/fp64 tensors. `key_mask` is `(B, Nk)`
    bool or None and queries are the last `Nq` key positions. Subclasses that anchor chunks or landmarks at
    position 0 return True from `packs_padding(causal)` and implement `attend_unpadded(q, k, v, causal, scale)`,
    which receives groups with the padding cut away, so that boundaries never move with padding.
    """

    method: ClassVar[str] = ""
    #: True when the estimator has `prefill` / `step` (constant-size decoding state, see `recurrent.py`).
    supports_recurrent_state: ClassVar[bool] = False
    #: True when cost and memory are linear in the sequence length (no N x N tensor anywhere).
    is_linear: ClassVar[bool] = True
    #: True when the output is a convex combination of the attended values.
    is_convex: ClassVar[bool] = True

    def __init__(self, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = check_int("num_heads", num_heads)
        self.head_dim = check_int("head_dim", head_dim)

    def extra_repr(self) -> str:
        return f"method={self.method!r}, num_heads={self.num_heads}, head_dim={self.head_dim}"

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        padding_mask: torch.Tensor | None = None,
        causal: bool = False,
        scale: float | None = None,
    ) -> torch.Tensor:
        """Attend `q` `(B, H, Nq, D)` over `k`, `v` `(B, H, Nk, D)`; returns `(B, H, Nq, D)` in `q.dtype`."""
        self._check_inputs(q, k, v, padding_mask, causal)
        scale = resolve_scale(scale, q.shape[-1])
        if is_empty(q):
            # an empty batch or no query: an empty output, as softmax gives (still attached to the graph)
            return q * 0
        input_dtype, dtype = q.dtype, compute_dtype(q.dtype)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        if padding_mask is not None and not is_tracing() and bool(padding_mask.all()):
            # eager shortcut only: the check reads the mask on the host, which a traced graph cannot do
            padding_mask = None
        # under mixed precision autocast would run the products in bf16/fp16: keep the estimator in `dtype`
        with torch.autocast(device_type=q.device.type, enabled=False):
            if self.packs_padding(causal):
                out = self._attend_packed(q, k, v, padding_mask, causal, scale)
            else:
                out = self.attend(q, k, v, padding_mask, causal, scale)
        return out.to(input_dtype)

    def packs_padding(self, causal: bool) -> bool:
        """Whether this mode runs on unpadded groups (`attend_unpadded`) rather than masks (`attend`)."""
        return False

    def attend(self, q, k, v, key_mask, causal, scale):  # pragma: no cover - abstract
        raise NotImplementedError

    def attend_unpadded(self, q, k, v, causal, scale):  # pragma: no cover - abstract
        raise NotImplementedError

    def attend_left_aligned(self, q, k, v, lengths, causal, scale):
        """`attend_unpadded` on a padded batch whose real tokens come first, row `b` holding `lengths[b]` of them.

        Used when tracing (`torch.compile`, `torch.export`), where packing by length would need data-dependent
        shapes. `q`, `k`, `v` are `(B, H, N, D)`, `lengths` `(B,)` long; rows `>= lengths[b]` may hold anything.
        """
        raise NotImplementedError(
            f"`{self.method}` cannot be traced (torch.compile / torch.export) with a padding mask in this mode "
            f"(causal={causal}): its chunks are anchored at the first real token. Trace it without `attention_mask` "
            "(unpadded batches), or use rfa, kernel or lara."
        )

    def _attend_packed(self, q, k, v, padding_mask, causal, scale):
        if padding_mask is None:
            return self.attend_unpadded(q, k, v, causal, scale)
        if is_tracing():
            return self._attend_aligned(q, k, v, padding_mask, causal, scale)
        out = q.new_zeros(q.shape)
        for group in packed_groups(padding_mask, q.shape[2]):
            qg = gather_tokens(q, group.batch_index, group.query_index)
            kg = gather_tokens(k, group.batch_index, group.key_index)
            vg = gather_tokens(v, group.batch_index, group.key_index)
            og = self.attend_unpadded(qg, kg, vg, causal, scale)
            rows = group.batch_index[:, None, None, None]
            heads = torch.arange(q.shape[1], device=q.device)[None, :, None, None]
            cols = group.query_index[:, None, :, None]
            out[rows, heads, cols, torch.arange(q.shape[-1], device=q.device)] = og
        return out

    def _attend_aligned(self, q, k, v, padding_mask, causal, scale):
        """The packed result with static shapes: real tokens moved to the front of each row (a stable sort), one
        `attend_left_aligned` call, outputs moved back and zero at padded queries."""
        if q.shape[2] != k.shape[2]:
            raise NotImplementedError("Tracing a packed estimator with a padding mask needs as many queries as keys.")
        order = torch.sort((~padding_mask).to(torch.int8), dim=-1, stable=True).indices  # (B, N)
        lengths = padding_mask.sum(-1)
        rows = torch.arange(q.shape[0], device=q.device)
        qa, ka, va = (gather_tokens(x, rows, order) for x in (q, k, v))
        # an empty row runs on its padding (finite numbers) and is zeroed below
        lengths = torch.where(lengths == 0, q.shape[2], lengths)
        out = self.attend_left_aligned(qa, ka, va, lengths, causal, scale)
        back = torch.argsort(order, dim=-1)
        out = gather_tokens(out, rows, back)
        return torch.where(padding_mask[:, None, :, None], out, 0.0)

    def _check_inputs(self, q, k, v, padding_mask, causal) -> None:
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.dim() != 4:
                raise ValueError(f"`{name}` must have shape (batch, heads, length, head_dim), got {tuple(t.shape)}.")
            if not t.is_floating_point():
                raise TypeError(f"`{name}` must be a floating-point tensor, got {t.dtype}.")
        B, H, Nq, D = q.shape
        if k.shape != v.shape[:-1] + (k.shape[-1],) or k.shape[:3] != v.shape[:3]:
            raise ValueError(f"`k` {tuple(k.shape)} and `v` {tuple(v.shape)} must agree on (batch, heads, length).")
        if k.shape[0] != B or k.shape[1] != H or k.shape[-1] != D:
            raise ValueError(f"`q` {tuple(q.shape)} and `k` {tuple(k.shape)} must agree on batch, heads and head_dim.")
        if H != self.num_heads:
            raise ValueError(f"Inputs have {H} heads but the estimator was built with `num_heads={self.num_heads}`.")
        if D != self.head_dim or v.shape[-1] != self.head_dim:
            raise ValueError(
                f"Inputs have head_dim {D} (values {v.shape[-1]}) but the estimator was built with "
                f"`head_dim={self.head_dim}`."
            )
        Nk = k.shape[2]
        if Nq > Nk or (Nq != Nk and not causal):
            raise ValueError(
                f"Query length {Nq} differs from key length {Nk}: only `causal=True` with fewer queries than keys "
                "(decoding over a cache) is supported."
            )
        if padding_mask is not None:
            if padding_mask.dtype != torch.bool:
                raise TypeError(f"`padding_mask` must be a bool tensor (True = real token), got {padding_mask.dtype}.")
            if tuple(padding_mask.shape) != (B, Nk):
                raise ValueError(
                    f"`padding_mask` must have shape (batch, key_length)=({B}, {Nk}), got {tuple(padding_mask.shape)}."
                )

    def auxiliary_loss(self) -> torch.Tensor | None:
        """Extra training loss of the estimator (e.g. an orthogonality penalty), or None."""
        return None
