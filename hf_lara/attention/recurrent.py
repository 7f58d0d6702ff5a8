"""Constant-size decoding state for the kernel-type estimators (`rfa`, `kernel`, causal `lara`).

A causal kernel estimator is an RNN: everything a query needs from the tokens before it is the `LinearState`
`(kvz, shift)`, `S x (D + 1) + S` numbers per (batch, head), whatever the context length. `prefill` runs the
chunkwise path over a prompt and returns that state; `step` continues from it with one or more new tokens. Both
give the rows of the full causal forward (`module(q, k, v, causal=True)`) over prompt + new tokens, up to rounding.

With `window_size > 0` (the window hybrid of `window.py`) the state is a `WindowState`: the last `W - 1` tokens
exactly plus the `LinearState` of the tokens that left the window, still constant in size (successive states share
one buffer of window tokens that steps append to without touching the rows an earlier state sees).

Feature maps are the stored ones (`projection`, `proposal_noise`): `redraw` never applies here, since a redraw
between prefill and decoding would silently corrupt the state.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .base import check_int, compute_dtype, is_empty, resolve_scale
from .linear import FeatureMaps, LinearState, causal_linear_attention
from .window import WindowMaps, WindowState, empty_window_state, window_step, windowed_attention


class RecurrentStateMixin:
    """Adds `prefill` / `step` to an `AttentionEstimator` that provides `feature_maps(scale, dtype)`."""

    #: True when `prefill` / `step` exist: decoding costs `O(S D)` per token and head with a constant-size state.
    supports_recurrent_state: ClassVar[bool] = True

    #: `W` of the window hybrid; 0 = plain kernel attention
    window_size: int = 0
    #: `G` of the window hybrid: the first `G` real tokens (bidirectional: and the last `G`) are always exact
    sink_tokens: int = 0

    def feature_maps(self, scale: float, dtype: torch.dtype) -> FeatureMaps:  # pragma: no cover - abstract
        raise NotImplementedError

    def window_maps(self, scale: float, dtype: torch.dtype) -> WindowMaps:  # pragma: no cover - abstract
        """Complete log-feature maps on the scale of `exp(scale q.k)` (see `window.WindowMaps`)."""
        raise NotImplementedError

    def _empty_state(self, batch_size: int, like: torch.Tensor) -> LinearState | WindowState:
        """The state before any token, for values like `like` `(..., D)`."""
        if self.window_size:
            num_features = self.window_maps(1.0, like.dtype).num_features
            return empty_window_state(batch_size, self.num_heads, num_features, like, self.sink_tokens)
        return LinearState.empty(batch_size, self.num_heads, self.feature_maps(1.0, like.dtype).num_features, like)

    def _check_window(self, window_size, sink_tokens) -> None:
        """Set `window_size` and `sink_tokens` (both ints >= 0; sinks need a window)."""
        self.window_size = check_int("window_size", window_size or 0, minimum=0)
        self.sink_tokens = check_int("sink_tokens", sink_tokens or 0, minimum=0)
        if self.sink_tokens and not self.window_size:
            raise ValueError(f"`sink_tokens={self.sink_tokens}` needs a window: set `window_size` > 0 as well.")

    def attend_windowed(self, q, k, v, key_mask, causal, scale, maps: WindowMaps | None = None) -> torch.Tensor:
        """The window hybrid of `window.py` with this estimator's maps."""
        maps = self.window_maps(scale, q.dtype) if maps is None else maps
        return windowed_attention(q, k, v, key_mask, causal, scale, self.window_size, maps, sinks=self.sink_tokens)

    def prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        padding_mask: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> tuple[torch.Tensor, LinearState | WindowState]:
        """Causal attention over a prompt; returns the output and the state after its last token.

        Args:
            q, k, v (`torch.Tensor` of shape `(B, H, N, D)`): the prompt.
            padding_mask (`torch.Tensor` of shape `(B, N)`, *optional*): True = real token (padded keys never
                enter the state).
            scale (`float`, *optional*): logit scale (default `D ** -0.5`).

        Returns:
            `out` `(B, H, N, D)` in `q.dtype` and the `LinearState` (`WindowState` with a window; fp32, fp64 for
            fp64 inputs).
        """
        return self.step(q, k, v, None, padding_mask=padding_mask, scale=scale)

    def step(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        state: LinearState | WindowState | None,
        *,
        padding_mask: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> tuple[torch.Tensor, LinearState | WindowState]:
        """Attend `n >= 1` new tokens given the state of every earlier one; the input state is not modified.

        Args:
            q, k, v (`torch.Tensor` of shape `(B, H, n, D)`): the new tokens only.
            state (`LinearState` or `WindowState`, *optional*): from `prefill` or an earlier `step`; None = no
                earlier token.
            padding_mask (`torch.Tensor` of shape `(B, n)`, *optional*): True = real token, for the new tokens.
            scale (`float`, *optional*): logit scale (default `D ** -0.5`).

        Returns:
            `out` `(B, H, n, D)` in `q.dtype` and the new state. Cost `O(n S D)` per head (`O(n (W + S) D)` with a
            window).
        """
        self._check_inputs(q, k, v, padding_mask, True)
        if q.shape[2] != k.shape[2]:
            raise ValueError(f"`step` takes the new tokens only: got {q.shape[2]} queries and {k.shape[2]} keys.")
        scale = resolve_scale(scale, q.shape[-1])
        input_dtype, dtype = q.dtype, compute_dtype(q.dtype)
        expected = WindowState if self.window_size else LinearState
        if state is not None and not isinstance(state, expected):
            raise TypeError(
                f"`state` must be a {expected.__name__} for this estimator (window_size={self.window_size}), got "
                f"{type(state).__name__}; start from `prefill` or `state=None`."
            )
        if is_empty(q):
            # no batch row or no new token: an empty output and the state unchanged (an empty one if None)
            return q * 0, state if state is not None else self._empty_state(q.shape[0], v.to(dtype))
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        if self.window_size:
            state = state if state is None or state.dtype == dtype else state.to(dtype)
            maps = self.window_maps(scale, dtype)
            out, state = window_step(q, k, v, padding_mask, state, scale, self.window_size, maps, self.sink_tokens)
            return out.to(input_dtype), state
        maps = self.feature_maps(scale, dtype)
        # a fresh container: the caller's state object keeps its tensors
        state = None if state is None else LinearState(state.kvz.to(dtype), state.shift.to(dtype))
        out, state = causal_linear_attention(
            q,
            k,
            v,
            padding_mask,
            self.chunk_size,
            state,
            q_map=maps.query,
            k_map=maps.key,
            feature_dim=maps.num_features,
        )
        return out.to(input_dtype), state
