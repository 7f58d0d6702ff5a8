"""Properties every registered estimator must have: padding invariance, causal prefix consistency and decoding,
determinism, gradients, numerics and argument checks. Each method's own maths is tested in its own file."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from hf_lara.attention import available_methods, build_attention

from .utils import assert_close, build_small, methods, qkv

H, D = 2, 8
MODES = [pytest.param(False, id="bidirectional"), pytest.param(True, id="causal")]


def _pad(x: torch.Tensor, length: int, side: str) -> torch.Tensor:
    """Pad `(1, H, n, D)` to `(1, H, length, D)` with noise (padding must not matter, whatever it holds)."""
    filler = torch.randn(1, x.shape[1], length - x.shape[2], x.shape[3], dtype=x.dtype) * 3
    return torch.cat([filler, x] if side == "left" else [x, filler], dim=2)


def _mask(n: int, length: int, side: str) -> torch.Tensor:
    real = torch.zeros(length, dtype=torch.bool)
    if side == "left":
        real[length - n :] = True
    else:
        real[:n] = True
    return real


def test_registry_lists_every_method():
    assert {"softmax", "rfa", "ra", "lara", "eva", "kernel"} <= set(available_methods())


@pytest.mark.parametrize("method", methods())
@pytest.mark.parametrize("causal", MODES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_invariance(method, causal, side):
    """Outputs at real positions equal the unpadded run, with left or right padding (fp32, 1e-5)."""
    attn = build_small(method, H, D).eval()
    lengths, total = [29, 37, 18], 37
    seqs = [qkv(1, H, n, D, dtype=torch.float32) for n in lengths]
    batch = [torch.cat([_pad(s[i], total, side) for s in seqs]) for i in range(3)]
    mask = torch.stack([_mask(n, total, side) for n in lengths])
    with torch.no_grad():
        out = attn(*batch, padding_mask=mask, causal=causal)
        for row, s in enumerate(seqs):
            alone = attn(*s, causal=causal)[0]
            torch.testing.assert_close(out[row][:, mask[row]], alone, atol=1e-5, rtol=1e-5)
            assert torch.isfinite(out[row]).all()


@pytest.mark.parametrize("method", methods())
def test_causal_prefix_consistency(method):
    """out[:n] of the full sequence equals the output on the prefix: no query sees the future."""
    attn = build_small(method, H, D).eval()
    q, k, v = qkv(2, H, 41, D)
    with torch.no_grad():
        full = attn(q, k, v, causal=True)
        for n in (1, 7, 8, 9, 23, 40):
            prefix = attn(q[:, :, :n], k[:, :, :n], v[:, :, :n], causal=True)
            torch.testing.assert_close(full[:, :, :n], prefix, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("method", methods())
@pytest.mark.parametrize("side", [None, "left"])
def test_decoding_matches_full_pass(method, side):
    """Nq < Nk (queries are the last Nq positions) equals the matching rows of the full output."""
    attn = build_small(method, H, D).eval()
    total = 37
    q, k, v = qkv(2, H, total, D)
    mask = None if side is None else torch.stack([_mask(30, total, "left"), _mask(total, total, "left")])
    with torch.no_grad():
        full = attn(q, k, v, padding_mask=mask, causal=True)
        for nq in (1, 2, 5, 13):
            step = attn(q[:, :, -nq:], k, v, padding_mask=mask, causal=True)
            torch.testing.assert_close(step, full[:, :, -nq:], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("method", methods())
@pytest.mark.parametrize("causal", MODES)
def test_eval_is_deterministic(method, causal):
    attn = build_small(method, H, D).eval()
    q, k, v = qkv(2, H, 19, D, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(attn(q, k, v, causal=causal), attn(q, k, v, causal=causal))


# the windowed variants' gradients are checked against their quadratic twin in test_window.py (cheaper than
# finite differences through the blocked path)
@pytest.mark.parametrize("method", available_methods())
@pytest.mark.parametrize("causal", MODES)
def test_gradcheck(method, causal):
    """fp64 gradcheck through q, k, v and every trainable parameter, on a tiny case (eval mode)."""
    attn = build_small(method, H, 4).double().eval()
    # move parameters away from their (often identity/zero) init so every path is exercised
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(0.1 * torch.randn_like(p))
    names = [n for n, p in attn.named_parameters() if p.requires_grad]
    params = [attn.get_parameter(n).detach().clone().requires_grad_() for n in names]
    q, k, v = (t.requires_grad_() for t in qkv(1, H, 7, 4, std=0.7))

    def fn(q, k, v, *params):
        return functional_call(attn, dict(zip(names, params)), (q, k, v), {"causal": causal})

    assert torch.autograd.gradcheck(fn, (q, k, v, *params), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", methods())
def test_every_parameter_gets_a_gradient(method):
    """Each trainable parameter receives a non-zero gradient in at least one of the two modes."""
    attn = build_small(method, H, D).train()
    q, k, v = (t.requires_grad_() for t in qkv(2, H, 23, D, dtype=torch.float32))
    for causal in (False, True):
        attn(q, k, v, causal=causal).square().sum().backward()
    for name, t in [("q", q), ("k", k), ("v", v), *attn.named_parameters()]:
        assert t.grad is not None and t.grad.abs().sum() > 0, f"no gradient reaches {name}"


def _value_bounds(v: torch.Tensor, mask: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query row, the min and max of the values it may attend to: `(B, H, N, D)` each."""
    big = torch.finfo(v.dtype).max
    lo = v.masked_fill(~mask[:, None, :, None], big)
    hi = v.masked_fill(~mask[:, None, :, None], -big)
    if causal:
        return lo.cummin(dim=2).values, hi.cummax(dim=2).values
    return lo.amin(2, keepdim=True).expand_as(v), hi.amax(2, keepdim=True).expand_as(v)


@pytest.mark.parametrize("method", methods())
@pytest.mark.parametrize("causal", MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_large_logits(method, causal, dtype):
    """bf16/fp16 inputs with q and k scaled up 10x stay finite; convex estimators stay inside the value range."""
    attn = build_small(method, H, 16).eval()
    q, k, v = qkv(2, H, 45, 16, dtype=torch.float32)
    q, k, v = (q * 10).to(dtype), (k * 10).to(dtype), v.to(dtype)
    mask = torch.ones(2, 45, dtype=torch.bool)
    mask[1, :9] = False
    with torch.no_grad():
        out = attn(q, k, v, padding_mask=mask, causal=causal)
    assert out.dtype == dtype and torch.isfinite(out).all()
    if attn.is_convex:
        lo, hi = _value_bounds(v.float(), mask, causal)
        real = (mask[:, None, :, None] & (lo <= hi)).expand_as(lo)
        slack = 2 * torch.finfo(dtype).eps * v.float().abs().amax()
        assert (out.float() >= lo - slack)[real].all() and (out.float() <= hi + slack)[real].all()


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ValueError, match="Valid methods: .*softmax"):
        build_attention("flash", num_heads=2, head_dim=8)


@pytest.mark.parametrize("method", methods())
@pytest.mark.parametrize("field,value", [("num_heads", 0), ("head_dim", -3), ("num_heads", 2.5)])
def test_bad_sizes_raise(method, field, value):
    sizes = {"num_heads": 2, "head_dim": 8, field: value}
    with pytest.raises(ValueError, match=field):
        build_small(method, sizes["num_heads"], sizes["head_dim"])


def test_shape_and_mask_errors():
    attn = build_attention("softmax", num_heads=2, head_dim=8)
    q, k, v = qkv(1, 2, 5, 8)
    with pytest.raises(ValueError, match="num_heads"):
        build_attention("softmax", num_heads=3, head_dim=8)(q, k, v)
    with pytest.raises(ValueError, match="causal=True"):
        attn(q[:, :, :3], k, v)
    with pytest.raises(TypeError, match="bool"):
        attn(q, k, v, padding_mask=torch.ones(1, 5))
    with pytest.raises(ValueError, match="padding_mask"):
        attn(q, k, v, padding_mask=torch.ones(1, 4, dtype=torch.bool))


@pytest.mark.parametrize("method", methods())
def test_autocast_does_not_lower_the_estimator_precision(method):
    """Under bf16 autocast the estimator still computes in fp32: same result as without autocast."""
    attn = build_small(method, H, D).eval()
    q, k, v = qkv(2, H, 21, D, dtype=torch.float32)
    with torch.no_grad():
        plain = attn(q, k, v, causal=True)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            mixed = attn(q, k, v, causal=True)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, plain, atol=1e-6, rtol=1e-6)


#: options that give every method something to train, and the parameters that must learn in *each* mode
TRAINABLE = {
    "rfa": ({"learn_features": True}, ["projection"]),
    "lara": ({}, ["proposal_mean"]),
    "eva": ({}, ["chunk_key_proj.weight", "proposal_proj.weight"]),
    "kernel": ({}, ["feature_map.weight"]),
    "rfa-window": ({"learn_features": True}, ["projection"]),
    "lara-window": ({}, ["proposal_mean"]),
    "kernel-window": ({}, ["feature_map.weight", "window_log_factor"]),
}


@pytest.mark.parametrize("method", sorted(TRAINABLE))
@pytest.mark.parametrize("causal", MODES)
def test_each_mode_has_parameters_that_learn(method, causal):
    """Distillation has something to train in every method and mode: the listed parameters get finite, non-zero
    gradients (training mode, a padded batch)."""
    options, names = TRAINABLE[method]
    attn = build_small(method, H, D, **options).train()
    q, k, v = qkv(2, H, 41, D, dtype=torch.float32)
    mask = torch.ones(2, 41, dtype=torch.bool)
    mask[0, :6] = False
    attn(q, k, v, padding_mask=mask, causal=causal).square().sum().backward()
    for name in names:
        grad = attn.get_parameter(name).grad
        assert grad is not None and bool(grad.isfinite().all()) and grad.abs().sum() > 0, f"{name} does not learn"


@pytest.mark.parametrize("method", ["rfa", "rfa-window"])
def test_learnable_features_do_not_change_a_fresh_conversion(method):
    """`learn_features=True` only turns the buffer into a parameter: same draw, same outputs, same state dict.

    Outputs agree to rounding: a buffer needs no gradient, so its keys take the in-place path (`exp2`).
    """
    q, k, v = qkv(2, H, 37, D)
    torch.manual_seed(5)
    fixed = build_small(method, H, D).double().eval()
    torch.manual_seed(5)
    learned = build_small(method, H, D, learn_features=True).double().eval()
    assert fixed.state_dict().keys() == learned.state_dict().keys()
    assert [n for n, _ in learned.named_parameters()] == ["projection"]
    for causal in (False, True):
        assert_close(f"causal={causal}", fixed(q, k, v, causal=causal), learned(q, k, v, causal=causal), 1e-13)
    reloaded = build_small(method, H, D, learn_features=True).double().eval()
    reloaded.load_state_dict(fixed.state_dict())
    assert_close("reloaded", fixed(q, k, v), reloaded(q, k, v), 1e-13)


def test_learnable_features_and_redraw_are_exclusive():
    with pytest.raises(ValueError, match="redraw"):
        build_attention("rfa", num_heads=H, head_dim=D, learn_features=True, redraw=True)
    with pytest.raises(TypeError, match="learn_features"):
        build_attention("rfa", num_heads=H, head_dim=D, learn_features="yes")


# (B, Nq, Nk, causal); fewer queries than keys is a causal (decoding) case only
EMPTY_SHAPES = [
    pytest.param(0, 5, 5, False, id="empty-batch-bidirectional"),
    pytest.param(0, 5, 5, True, id="empty-batch-causal"),
    pytest.param(2, 0, 0, False, id="empty-sequence-bidirectional"),
    pytest.param(2, 0, 0, True, id="empty-sequence-causal"),
    pytest.param(2, 0, 5, True, id="no-query-causal"),
]


@pytest.mark.parametrize("method", methods())
@pytest.mark.parametrize("B, Nq, Nk, causal", EMPTY_SHAPES)
def test_degenerate_shapes_give_empty_outputs_like_softmax(method, B, Nq, Nk, causal):
    """Empty batch, empty sequence, no query: the same empty output as SDPA, still differentiable."""
    attn = build_small(method, H, D).eval()
    q = torch.randn(B, H, Nq, D, requires_grad=True)
    k, v = torch.randn(B, H, Nk, D), torch.randn(B, H, Nk, D)
    mask = torch.ones(B, Nk, dtype=torch.bool)
    out = attn(q, k, v, padding_mask=mask, causal=causal)
    assert out.shape == (B, H, Nq, D) and out.dtype == q.dtype
    out.sum().backward()
    assert q.grad.shape == q.shape


RECURRENT = [m for m in methods() if build_small(m, H, D).supports_recurrent_state]


@pytest.mark.parametrize("method", RECURRENT)
def test_prefill_and_step_accept_empty_inputs(method):
    """prefill of 0 tokens gives a usable empty state; a step of 0 tokens leaves the state as it was; an empty batch
    prefills and steps."""
    attn = build_small(method, H, D).double().eval()
    q, k, v = qkv(2, H, 6, D)
    out, empty = attn.prefill(q[:, :, :0], k[:, :, :0], v[:, :, :0])
    assert out.shape == (2, H, 0, D)
    after, _ = attn.step(q, k, v, empty)
    torch.testing.assert_close(after, attn.prefill(q, k, v)[0], rtol=0, atol=1e-12)
    _, state = attn.prefill(q, k, v)
    out, same = attn.step(q[:, :, :0], k[:, :, :0], v[:, :, :0], state)
    assert out.shape == (2, H, 0, D) and same is state
    out, none = attn.prefill(*qkv(0, H, 4, D))
    assert out.shape == (0, H, 4, D)
    assert attn.step(*qkv(0, H, 1, D), none)[0].shape == (0, H, 1, D)


@pytest.mark.parametrize("method", methods())
@pytest.mark.parametrize("scale", [0.0, -0.125, float("nan"), float("inf"), "0.1", True])
def test_invalid_scale_is_a_clear_error(method, scale):
    attn = build_small(method, H, D)
    q, k, v = qkv(1, H, 5, D)
    with pytest.raises(ValueError, match="`scale` must be a finite number > 0"):
        attn(q, k, v, scale=scale)
    if attn.supports_recurrent_state:
        with pytest.raises(ValueError, match="`scale`"):
            attn.step(q, k, v, None, scale=scale)
