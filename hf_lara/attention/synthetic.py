"""Inputs with realistic attention patterns, for demos, benchmarks and statistical tests.

I.i.d. Gaussian queries and keys give nearly uniform attention, which flatters every estimator. Here keys sit
around a few cluster centres and each query points at one centre, so attention rows are peaked (low entropy) like
those of trained models, and nearby positions tend to share a cluster (locality).
"""

from __future__ import annotations

import torch


def clustered_qkv(
    batch: int,
    heads: int,
    length: int,
    head_dim: int,
    *,
    num_clusters: int = 32,
    sharpness: float = 3.0,
    span: int = 32,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values `(batch, heads, length, head_dim)` with peaked, local attention.

    Args:
        num_clusters (`int`, defaults to 32): cluster centres per head.
        sharpness (`float`, defaults to 3.0): norm of the centres in units of `head_dim**0.25`; the typical
            softmax logit gap between the right and a wrong cluster is about `sharpness**2`.
        span (`int`, defaults to 32): tokens in a row tend to share a cluster over about this many positions.
    """

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    centres = randn(batch, heads, num_clusters, head_dim)
    centres = centres / centres.norm(dim=-1, keepdim=True) * sharpness * head_dim**0.25
    blocks = (length + span - 1) // span
    block_cluster = torch.randint(num_clusters, (batch, heads, blocks), generator=generator)
    own = block_cluster.repeat_interleave(span, dim=-1)[..., :length]
    switch = torch.rand(batch, heads, length, generator=generator) < 0.25
    other = torch.randint(num_clusters, (batch, heads, length), generator=generator)
    cluster = torch.where(switch, other, own)
    pick = centres.gather(2, cluster[..., None].expand(-1, -1, -1, head_dim))
    noise = 0.5 * head_dim**-0.25
    keys = pick + noise * randn(batch, heads, length, head_dim)
    target = torch.where(torch.rand(batch, heads, length, generator=generator) < 0.5, cluster, other)
    queries = centres.gather(2, target[..., None].expand(-1, -1, -1, head_dim)) + noise * randn(
        batch, heads, length, head_dim
    )
    values = randn(batch, heads, length, head_dim)
    return queries.to(dtype), keys.to(dtype), values.to(dtype)
