"""Shared helpers for the estimator tests: small hyper-parameters per method and a relative-error check."""

from __future__ import annotations

import torch

from hf_lara.attention import available_methods, build_attention

# Small settings so that every code path (several chunks, windows, landmarks) is exercised on short inputs.
SMALL_HPARAMS: dict[str, dict] = {
    "softmax": {},
    "rfa": {"num_features": 16, "chunk_size": 8},
    "ra": {},
    "lara": {"num_landmarks": 5, "chunk_size": 8},
    "eva": {"window_size": 8, "num_chunks": 3, "chunk_size": 4},
    "kernel": {"feature_map": "hedgehog", "num_features": 8, "chunk_size": 8},
}


#: the window hybrid of `window.py` (W = 4: with 16-token blocks, inputs of ~40 tokens use near and far blocks)
WINDOWED = {"rfa-window": "rfa", "kernel-window": "kernel", "lara-window": "lara"}
WINDOW_SIZE = 4


def methods() -> list[str]:
    """Every registered method plus its windowed variant (`"<method>-window"`) where it has one."""
    return available_methods() + sorted(WINDOWED)


def build_small(method: str, num_heads: int, head_dim: int, **overrides) -> torch.nn.Module:
    extra = {}
    if method in WINDOWED:
        method, extra = WINDOWED[method], {"window_size": WINDOW_SIZE}
    hparams = {**SMALL_HPARAMS.get(method, {}), **extra, **overrides}
    return build_attention(method, num_heads=num_heads, head_dim=head_dim, **hparams)


def qkv(B: int, H: int, N: int, D: int, dtype=torch.float64, std: float = 1.0, generator=None):
    return tuple(torch.randn(B, H, N, D, dtype=dtype, generator=generator) * std for _ in range(3))


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, ratio: float) -> None:
    """Pass when max-abs <= 1e-12 or the relative L2 error is below `ratio`; the message reports the error."""
    diff = (ref - out).abs().max().item()
    rel = ((ref - out).norm() / ref.norm().clamp_min(1e-30)).item()
    assert diff <= 1e-12 or rel < ratio, f"{name}: max-abs {diff:.3e}, relative {rel:.3e} >= {ratio}"
