"""The branches estimators take when traced (`torch.compile`, `torch.export`): no host synchronisation, static
shapes. Each is checked in fp64 (outputs and gradients) against the eager path, itself tested against the naive
twins; `is_tracing` is patched so these run without compiling (the compiled models are in
`tests/integration/test_tracing.py`)."""

from __future__ import annotations

import pytest
import torch

import hf_lara.attention.base as base
import hf_lara.attention.linear as linear
from hf_lara.attention import build_attention
from hf_lara.attention.linear import causal_linear_attention
from hf_lara.attention.naive import naive_feature_attention

from .utils import assert_close, build_small, qkv


@pytest.fixture
def traced(monkeypatch):
    """Make the estimators believe they are being traced."""

    def trace():
        monkeypatch.setattr(base, "is_tracing", lambda: True)
        monkeypatch.setattr(linear, "is_tracing", lambda: True)

    return trace


def padding_mask(B: int, N: int) -> torch.Tensor:
    """Right and left padding, a hole in the middle, one fully padded row and one full row."""
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[0, -4:] = False
    mask[1, :5] = False
    mask[2, 3] = False
    mask[3] = False
    return mask


def run(attn, q, k, v, mask, causal):
    out = attn(q, k, v, padding_mask=mask, causal=causal)
    return out, torch.autograd.grad(out.square().sum(), (q, k, v))


@pytest.mark.parametrize(
    "method, causal, hparams",
    [
        ("lara", False, {"mis": "opt", "adaptive": True}),
        ("lara", False, {"mis": "bh"}),
        ("lara", True, {}),
        ("rfa", True, {}),
        ("kernel", True, {}),
        ("rfa", False, {}),
    ],
)
def test_traced_branch_equals_eager(traced, method, causal, hparams):
    torch.manual_seed(0)
    attn = build_small(method, num_heads=2, head_dim=8, **hparams).double().eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(0.3 * torch.randn_like(p))
    q, k, v = (x.requires_grad_() for x in qkv(5, 2, 19, 8))
    mask = padding_mask(5, 19)
    ref, ref_grads = run(attn, q, k, v, mask, causal)
    traced()
    out, grads = run(attn, q, k, v, mask, causal)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    assert out[3].abs().max() == 0  # a row without real keys
    if attn.packs_padding(causal):
        assert out[0, :, -4:].abs().max() == 0  # packed paths leave padded queries at zero


def test_traced_mask_free_batch_keeps_the_mask(traced):
    """A traced graph cannot test `mask.all()`: an all-real mask goes through the masked path, same result."""
    torch.manual_seed(0)
    attn = build_small("lara", num_heads=2, head_dim=8).double().eval()
    q, k, v = qkv(2, 2, 13, 8)
    ref = attn(q, k, v)
    traced()
    torch.testing.assert_close(attn(q, k, v, padding_mask=torch.ones(2, 13, dtype=torch.bool)), ref)


def test_packed_estimator_without_traced_form_says_so(traced):
    traced()
    attn = build_attention("eva", num_heads=2, head_dim=8, window_size=4, chunk_size=2).eval()
    q, k, v = qkv(5, 2, 9, 8, dtype=torch.float32)
    with pytest.raises(NotImplementedError, match="cannot be traced .* with a padding mask"):
        attn(q, k, v, padding_mask=padding_mask(5, 9))


@pytest.mark.parametrize("method", ["rfa", "kernel", "lara"])
def test_compiled_causal_equals_eager_and_naive(method):
    """`torch.compile(fullgraph=True)` (no graph break) of the causal linear path with a padding mask, 38 chunks of
    2 in one block (the grouped prefix), equals the eager module and quadratic attention on the same features."""
    torch.manual_seed(0)
    attn = build_small(method, num_heads=2, head_dim=8, chunk_size=2).double().eval()
    q, k, v = (x.requires_grad_() for x in qkv(5, 2, 75, 8))
    mask = padding_mask(5, 75)
    maps = attn.feature_maps(8**-0.5, torch.float64)
    lq, lk = maps.query(q), maps.key(k)
    ref, ref_grads = run(lambda *a, **kw: naive_feature_attention(lq, lk, v, mask, causal=True), q, k, v, mask, True)
    eager, eager_grads = run(attn, q, k, v, mask, True)
    torch._dynamo.reset()
    out, grads = run(torch.compile(attn, fullgraph=True, backend="eager"), q, k, v, mask, True)
    assert_close("eager", ref, eager, 1e-10)
    assert_close("compiled", ref, out, 1e-10)
    torch.testing.assert_close(out, eager, rtol=1e-12, atol=1e-14)
    for name, g, e, r in zip("qkv", grads, eager_grads, ref_grads):
        assert_close(f"grad {name}", r, g, 1e-9)
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["rfa", "kernel"])
def test_compiled_bidirectional_without_autograd_equals_naive(method):
    """`torch.compile(fullgraph=True)` of the no-grad bidirectional path (its block size reads no thread count
    when traced) equals quadratic attention on the same features."""
    torch.manual_seed(0)
    attn = build_small(method, num_heads=2, head_dim=8).double().eval()
    q, k, v = qkv(5, 2, 75, 8)
    mask = padding_mask(5, 75)
    maps = attn.feature_maps(8**-0.5, torch.float64)
    ref = naive_feature_attention(maps.query(q), maps.key(k), v, mask)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(attn, fullgraph=True, backend="eager")(q, k, v, padding_mask=mask)
    assert_close("compiled", ref[:3], out[:3], 1e-10)


def test_causal_graph_has_no_break_and_does_not_grow_with_chunks():
    """Dynamo's count of graph breaks is 0, and the traced graph of one block has as many ops for 40 chunks as for
    900 (the prefix is no Python loop over chunks)."""
    sizes = {}
    for chunks in (40, 900):
        lq, lk, v = (torch.randn(1, 2, chunks, 4) for _ in range(3))
        torch._dynamo.reset()
        explained = torch._dynamo.explain(causal_linear_attention)(lq, lk, v, chunk_size=1, block_size=chunks)
        assert explained.graph_break_count == 0 and explained.graph_count == 1
        sizes[chunks] = len(explained.graphs[0].graph.nodes)
    assert sizes[40] == sizes[900], sizes
