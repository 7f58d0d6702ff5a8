"""`rfa`: positive random features approximate softmax, better with more features; saved features reproduce."""

from __future__ import annotations

import pytest
import torch

from hf_lara.attention import build_attention
from hf_lara.attention.naive import naive_softmax_attention
from hf_lara.attention.random_features import gaussian, orthogonal_gaussian, positive_random_log_features

from .utils import qkv


def _relative_mse(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).square().mean() / ref.square().mean()).item()


def _rfa_error(num_features: int, q, k, v, causal: bool, seeds=range(4)) -> float:
    ref = naive_softmax_attention(q, k, v, causal=causal)
    errors = []
    for seed in seeds:
        torch.manual_seed(seed)
        attn = build_attention("rfa", num_heads=q.shape[1], head_dim=q.shape[-1], num_features=num_features)
        errors.append(_relative_mse(attn.double().eval()(q, k, v, causal=causal), ref))
    return sum(errors) / len(errors)


@pytest.mark.parametrize("causal", [False, True])
def test_error_decreases_with_more_features(causal):
    q, k, v = qkv(2, 2, 50, 16, std=0.6)
    errors = [_rfa_error(s, q, k, v, causal) for s in (8, 32, 128, 512)]
    print(f"rfa relative MSE vs softmax (causal={causal}) for S=8,32,128,512: {errors}")
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    # Monte-Carlo variance falls like 1/S: 64x more features buys far more than 8x lower error in expectation
    assert errors[-1] < errors[0] / 8


def test_many_features_small_norms_is_close_to_softmax():
    q, k, v = qkv(2, 2, 40, 16, std=0.3)
    err = _rfa_error(4096, q, k, v, causal=False, seeds=range(2))
    assert err < 2e-3, err


def test_feature_map_is_an_unbiased_kernel_estimate():
    """E_w[xi(x, w) xi(y, w)] = exp(x.y) for w ~ N(0, I), checked against 4 standard errors."""
    torch.manual_seed(0)
    x, y = torch.randn(2, 1, 1, 3, 6, dtype=torch.float64) * 0.4
    omega = gaussian(1, 200_000, 6).double()
    products = (positive_random_log_features(x, omega) + positive_random_log_features(y, omega)).exp()[0, 0]
    estimate, stderr = products.mean(-1), products.std(-1) / products.shape[-1] ** 0.5
    exact = (x * y).sum(-1).exp()[0, 0]
    assert ((estimate - exact).abs() < 4 * stderr).all(), (estimate, exact, stderr)


def test_orthogonal_rows_within_each_block():
    omega = orthogonal_gaussian(3, 40, 16)
    block = omega[:, :16] / omega[:, :16].norm(dim=-1, keepdim=True)
    gram = block @ block.transpose(-1, -2)
    torch.testing.assert_close(gram, torch.eye(16).expand(3, -1, -1), atol=1e-5, rtol=0)
    assert omega.shape == (3, 40, 16)


def test_features_are_saved_and_restored_exactly():
    attn = build_attention("rfa", num_heads=2, head_dim=8, num_features=12).eval()
    assert "projection" in attn.state_dict()
    clone = build_attention("rfa", num_heads=2, head_dim=8, num_features=12).eval()
    q, k, v = qkv(1, 2, 9, 8, dtype=torch.float32)
    assert not torch.equal(attn(q, k, v), clone(q, k, v))
    clone.load_state_dict(attn.state_dict())
    assert torch.equal(attn(q, k, v), clone(q, k, v))


def test_redraw_only_in_training():
    attn = build_attention("rfa", num_heads=2, head_dim=8, num_features=12, redraw=True)
    q, k, v = qkv(1, 2, 9, 8, dtype=torch.float32)
    attn.train()
    assert not torch.equal(attn(q, k, v), attn(q, k, v))
    attn.eval()
    assert torch.equal(attn(q, k, v), attn(q, k, v))


@pytest.mark.parametrize("field,value", [("num_features", 0), ("chunk_size", -1), ("num_features", 3.0)])
def test_bad_hyper_parameters(field, value):
    with pytest.raises(ValueError, match=field):
        build_attention("rfa", num_heads=2, head_dim=8, **{field: value})
