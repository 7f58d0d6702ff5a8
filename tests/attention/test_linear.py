"""The chunkwise and bidirectional linear-attention paths against the explicit N x N form (fla's recipe)."""

from __future__ import annotations

import pytest
import torch

from hf_lara.attention.linear import bidirectional_linear_attention, causal_linear_attention
from hf_lara.attention.naive import naive_feature_attention

from .utils import assert_close

CASES = [(2, 3, 37, 8, 6), (1, 2, 64, 16, 16), (2, 2, 63, 5, 9)]
IDS = [f"B{b}-T{t}-H{h}-S{s}-C{c}" for b, h, t, s, c in CASES]


def _inputs(B, H, T, S, D=6, spread=3.0):
    lq = torch.randn(B, H, T, S, dtype=torch.float64) * spread
    lk = torch.randn(B, H, T, S, dtype=torch.float64) * spread
    v = torch.randn(B, H, T, D, dtype=torch.float64)
    return lq, lk, v


@pytest.mark.parametrize("B,H,T,S,C", CASES, ids=IDS)
@pytest.mark.parametrize("masked", [False, True])
def test_causal_chunked_equals_quadratic(B, H, T, S, C, masked):
    lq, lk, v = (t.requires_grad_() for t in _inputs(B, H, T, S))
    mask = torch.rand(B, T) > 0.3 if masked else None
    ref = naive_feature_attention(lq, lk, v, mask, causal=True)
    out, _ = causal_linear_attention(lq, lk, v, mask, chunk_size=C)
    assert_close("out", ref, out, 1e-10)
    grad = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (lq, lk, v), grad)
    out_grads = torch.autograd.grad(out, (lq, lk, v), grad)
    for name, r, o in zip(("dlq", "dlk", "dv"), ref_grads, out_grads):
        assert_close(name, r, o, 1e-9)


@pytest.mark.parametrize("B,H,T,S,C", CASES, ids=IDS)
def test_bidirectional_equals_quadratic(B, H, T, S, C):
    lq, lk, v = (t.requires_grad_() for t in _inputs(B, H, T, S))
    mask = torch.rand(B, T) > 0.3
    ref = naive_feature_attention(lq, lk, v, mask)
    out = bidirectional_linear_attention(lq, lk, v, mask)
    assert_close("out", ref, out, 1e-10)
    grad = torch.randn_like(ref)
    for name, r, o in zip(
        ("dlq", "dlk", "dv"), torch.autograd.grad(ref, (lq, lk, v), grad), torch.autograd.grad(out, (lq, lk, v), grad)
    ):
        assert_close(name, r, o, 1e-9)


@pytest.mark.parametrize("split", [1, 17, 32, 50])
def test_split_and_resume_equals_one_pass(split):
    """prefix -> state -> rest gives the same outputs as one pass over the whole sequence."""
    lq, lk, v = _inputs(2, 2, 61, 7)
    full, final = causal_linear_attention(lq, lk, v, chunk_size=8)
    first, state = causal_linear_attention(lq[:, :, :split], lk[:, :, :split], v[:, :, :split], chunk_size=8)
    rest, resumed = causal_linear_attention(
        lq[:, :, split:], lk[:, :, split:], v[:, :, split:], chunk_size=8, state=state
    )
    assert_close("out", full, torch.cat([first, rest], dim=2), 1e-12)
    # the states agree once expressed at the same shift
    assert_close("kv", final.kv * final.shift.exp()[..., None], resumed.kv * resumed.shift.exp()[..., None], 1e-12)


def test_token_by_token_recurrence_equals_full_pass():
    lq, lk, v = _inputs(1, 2, 23, 5)
    full, _ = causal_linear_attention(lq, lk, v, chunk_size=4)
    state, steps = None, []
    for t in range(23):
        out, state = causal_linear_attention(
            lq[:, :, t : t + 1], lk[:, :, t : t + 1], v[:, :, t : t + 1], chunk_size=1, state=state
        )
        steps.append(out)
    assert_close("recurrent", full, torch.cat(steps, dim=2), 1e-12)


def test_extreme_logits_stay_finite_and_convex():
    """Log-features spanning hundreds of nats (a late large key inside a chunk) neither overflow nor underflow."""
    lq, lk, v = _inputs(1, 1, 40, 4, spread=200.0)
    lq, lk, v = lq.float(), lk.float(), v.float()
    for out in (causal_linear_attention(lq, lk, v, chunk_size=16)[0], bidirectional_linear_attention(lq, lk, v)):
        assert torch.isfinite(out).all()
        assert (out <= v.amax(2, keepdim=True) + 1e-5).all()
        assert (out >= v.amin(2, keepdim=True) - 1e-5).all()


def test_fp32_matches_fp64_reference_over_wide_logit_range():
    """Log-features spread over +-100 nats: fp32 chunked output still matches the fp64 quadratic form."""
    lq, lk, v = _inputs(1, 2, 40, 4, spread=40.0)
    ref = naive_feature_attention(lq, lk, v, causal=True)
    out, _ = causal_linear_attention(lq.float(), lk.float(), v.float(), chunk_size=16)
    assert_close("causal fp32 vs fp64 reference", ref, out.double(), 1e-5)
