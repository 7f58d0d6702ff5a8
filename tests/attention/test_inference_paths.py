"""The in-place paths taken without autograd (`torch.inference_mode`, `torch.no_grad`) against the naive twins.

The bidirectional linear paths compute in place, drop the query softmax normaliser and divide straight into a
preallocated output when no gradient is recorded; the autograd paths are tested elsewhere. Several token blocks
(`block_size`) and fully padded rows are exercised in fp64.
"""

from __future__ import annotations

import pytest
import torch

from hf_lara.attention.lara import LinearRandomizedAttention
from hf_lara.attention.linear import bidirectional_linear_attention
from hf_lara.attention.naive import naive_bidirectional_lara, naive_feature_attention
from hf_lara.attention.rfa import RandomFeatureAttention

from .utils import assert_close, qkv


@pytest.mark.parametrize("mode", ["inference", "no_grad"])
@pytest.mark.parametrize("mis", ["opt", "bh"])
@pytest.mark.parametrize("block_size", [None, 7])
def test_bidirectional_lara_without_autograd(mode, mis, block_size):
    B, H, N, D, C = 2, 2, 31, 8, 5
    q, k, v = qkv(B, H, N, D, std=0.7, generator=torch.Generator().manual_seed(0))
    attn = LinearRandomizedAttention(H, D, num_landmarks=C, mis=mis, alpha_coeff=0.7).double().eval()
    expected = naive_bidirectional_lara(q, k, v, D**-0.5, C, mis, 0.7)[2]
    with torch.inference_mode() if mode == "inference" else torch.no_grad():
        out = attn.bidirectional(q, k, v, D**-0.5, block_size=block_size)
    assert_close("lara", expected, out, 1e-10)
    assert not torch.is_inference(q) and torch.equal(
        q, qkv(B, H, N, D, std=0.7, generator=torch.Generator().manual_seed(0))[0]
    )


@pytest.mark.parametrize("maps", [True, False])
@pytest.mark.parametrize("block_size", [None, 6])
def test_bidirectional_linear_attention_without_autograd(maps, block_size):
    """Feature maps or given log-features (then nothing is modified in place), padding and a fully padded row."""
    B, H, N, D = 3, 2, 23, 8
    q, k, v = qkv(B, H, N, D, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, 17:] = False
    mask[2] = False  # no real key: the row's output is 0, as in the autograd path
    rfa = RandomFeatureAttention(H, D, num_features=12).double()
    fm = rfa.feature_maps(D**-0.5, torch.float64)
    lq, lk = fm.query(q), fm.key(k)
    expected = naive_feature_attention(lq, lk, v, mask)
    lq_before, lk_before = lq.clone(), lk.clone()
    with torch.inference_mode():
        if maps:
            out = bidirectional_linear_attention(q, k, v, mask, block_size, fm.query, fm.key, fm.num_features)
        else:
            out = bidirectional_linear_attention(lq, lk, v, mask, block_size)
    assert_close("rows with keys", expected[:2], out[:2], 1e-10)
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    assert torch.equal(lq, lq_before) and torch.equal(lk, lk_before)
