"""Gaussian draws shared by the randomized estimators (RFA, hedgehog's random init, causal LARA)."""

from __future__ import annotations

import torch


def orthogonal_gaussian(
    num_heads: int, num_rows: int, dim: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Rows with the marginal law of `N(0, I_dim)` that are exactly orthogonal within each block of `dim` rows.

    Each block is the Q factor of a Gaussian matrix (sign-corrected so it is Haar distributed), with every row
    rescaled by the norm of an independent Gaussian vector (chi law), as in Performer's FAVOR+.

    Returns:
        `torch.Tensor` of shape `(num_heads, num_rows, dim)`, fp32.
    """
    blocks = []
    for _ in range((num_rows + dim - 1) // dim):
        gaussian = torch.randn(num_heads, dim, dim, generator=generator)
        q, r = torch.linalg.qr(gaussian)
        q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]
        blocks.append(q.transpose(-1, -2))
    rows = torch.cat(blocks, dim=1)[:, :num_rows]
    norms = torch.randn(num_heads, num_rows, dim, generator=generator).norm(dim=-1, keepdim=True)
    return rows * norms


def gaussian(num_heads: int, num_rows: int, dim: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """I.i.d. `N(0, 1)` entries, shape `(num_heads, num_rows, dim)`."""
    return torch.randn(num_heads, num_rows, dim, generator=generator)


def positive_random_log_features(x_tilde: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """`log xi(x, w) = w.x - |x|^2 / 2` for every row of `omega`.

    Args:
        x_tilde (`torch.Tensor` of shape `(B, H, N, D)`): inputs already in "tilde space" (`x * scale**0.5`).
        omega (`torch.Tensor` of shape `(H, S, D)` or `(B, H, S, D)`): sample points.

    Returns:
        `torch.Tensor` of shape `(B, H, N, S)`. `E_w[xi(x, w) xi(y, w)] = exp(x.y)` for `w ~ N(0, I)`.
    """
    proj = x_tilde @ omega.to(x_tilde.dtype).transpose(-1, -2)
    return proj - 0.5 * (x_tilde * x_tilde).sum(dim=-1, keepdim=True)
