"""Tests of `hf_lara/attention/kernel.py`: every feature map against a quadratic form built here from the map's
weights (features written out with exp/softplus/relu), hedgehog's softmax approximation, low-precision numerics,
the orthogonality penalty and argument errors."""

from __future__ import annotations

import pytest
import torch

from hf_lara.attention import build_attention
from hf_lara.attention.kernel import FEATURE_MAPS, KernelAttention
from hf_lara.attention.naive import naive_softmax_attention

SEED = 42
MAPS = ("deep", "ffn", "glu", "hedgehog", "t2r")
PENALISED_MAPS = ("deep", "ffn", "glu", "t2r")


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, ratio: float) -> None:
    """Max-abs error relative to `max(1, max|ref|)` must stay below `ratio`; the message reports it."""
    err = ((ref - out).abs().max() / ref.abs().max().clamp_min(1.0)).item()
    assert err <= ratio, f"{name}: relative error {err:.3e} > {ratio:.1e}"


# ---------------------------------------------------------------------------------------------------------------
# Independent reference: features and the quadratic form written out.
# ---------------------------------------------------------------------------------------------------------------


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`(B, H, N, D)` x `(H, S, D)` -> `(B, H, N, S)`, as a loop over heads."""
    out = torch.stack([x[:, h] @ weight[h].T for h in range(weight.shape[0])], dim=1)
    return out if bias is None else out + bias[None, :, None, :]


def softplus(z: torch.Tensor) -> torch.Tensor:
    return torch.log(1 + torch.exp(z))


def sigmoid(z: torch.Tensor) -> torch.Tensor:
    return 1 / (1 + torch.exp(-z))


def reference_features(attn: KernelAttention, x: torch.Tensor, scale: float) -> torch.Tensor:
    """`phi(x * scale**0.5)` (not its log), `(B, H, N, S)`, from the map's parameters."""
    fmap, x = attn.feature_map, x * scale**0.5
    name = attn.feature_map_name
    if name == "ffn":
        return softplus(linear(x, fmap.weight, fmap.bias))
    if name == "glu":
        return softplus(linear(x, fmap.weight, fmap.bias)) * sigmoid(linear(x, fmap.gate_weight, fmap.gate_bias))
    if name == "deep":
        h, depth = x, len(fmap.out_weights)
        for i in range(depth - 1):
            h = linear(h, fmap.out_weights[i]) * sigmoid(linear(h, fmap.gate_weights[i]))
        return softplus(linear(h, fmap.out_weights[depth - 1])) * sigmoid(linear(h, fmap.gate_weights[depth - 1]))
    if name == "hedgehog":
        z = linear(x, fmap.weight, fmap.bias)
        damp = torch.exp(-0.5 * (x * x).sum(-1, keepdim=True))
        return torch.cat([torch.exp(z) * damp, torch.exp(-z) * damp], dim=-1)
    z = linear(x, fmap.weight, fmap.bias)
    return torch.where(z > 0, z, torch.zeros_like(z)).clamp_min(1e-12)


def reference_attention(
    phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, causal: bool
) -> torch.Tensor:
    """`A V / A 1` with `A = phi(Q) phi(K)^T` masked; queries are the last `Nq` keys; empty rows give zeros."""
    Nq, Nk = phi_q.shape[2], phi_k.shape[2]
    scores = phi_q @ phi_k.transpose(-1, -2)
    visible = torch.ones(Nq, Nk, dtype=torch.bool)
    if causal:
        visible = torch.arange(Nk - Nq, Nk)[:, None] >= torch.arange(Nk)[None, :]
    visible = visible[None, None]
    if key_mask is not None:
        visible = visible & key_mask[:, None, None, :]
    scores = scores * visible
    return (scores @ v) / scores.sum(-1, keepdim=True).clamp_min(1e-300)


def padding(kind: str, B: int, N: int) -> torch.Tensor | None:
    if kind == "none":
        return None
    mask = torch.ones(B, N, dtype=torch.bool)
    if kind == "left":
        mask[1, :6] = False
    else:
        mask[1, -9:] = False
    return mask


# ---------------------------------------------------------------------------------------------------------------
# 1. Fast path == quadratic reference, outputs and gradients, fp64.
# ---------------------------------------------------------------------------------------------------------------

B, H, N, D, CHUNK = 2, 3, 75, 8, 16
# (mode, padding, queries, scale): N=75 is not a multiple of the chunk size 16
MODES = [
    ("bidir", "none", N, None),
    ("bidir", "left", N, 0.3),
    ("bidir", "right", N, None),
    ("causal", "none", N, 0.3),
    ("causal", "left", N, None),
    ("causal", "right", N, 0.3),
    ("decode", "none", 5, None),
    ("decode", "left", 1, 0.3),
]
CASES = [(m, *mode) for m in MAPS for mode in MODES]
CASE_IDS = [f"{m}-{mode}-pad{pad}-B{B}-T{N}-Q{nq}-H{H}-D{D}" for m, mode, pad, nq, _ in CASES]


@pytest.mark.parametrize("feature_map, mode, pad, num_queries, scale", CASES, ids=CASE_IDS)
def test_matches_quadratic_reference(feature_map, mode, pad, num_queries, scale):
    torch.manual_seed(SEED)
    extra = {"depth": 3} if feature_map == "deep" else {}
    attn = KernelAttention(H, D, feature_map=feature_map, num_features=6, chunk_size=CHUNK, **extra).double()
    with torch.no_grad():  # non-trivial biases and off-init weights
        for p in attn.parameters():
            p.add_(0.2 * torch.randn_like(p))
    q = torch.randn(B, H, num_queries, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, H, N, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, H, N, D, dtype=torch.float64, requires_grad=True)
    mask, causal = padding(pad, B, N), mode != "bidir"
    cotangent = torch.randn(B, H, num_queries, D, dtype=torch.float64)

    out = attn(q, k, v, padding_mask=mask, causal=causal, scale=scale)
    s = D**-0.5 if scale is None else scale
    ref = reference_attention(reference_features(attn, q, s), reference_features(attn, k, s), v, mask, causal)
    assert_close("output", ref, out, 1e-10)

    inputs = [q, k, v, *attn.parameters()]
    names = ["q", "k", "v", *(n for n, _ in attn.named_parameters())]
    grads = torch.autograd.grad((out * cotangent).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * cotangent).sum(), inputs)
    for name, g, g_ref in zip(names, grads, ref_grads, strict=True):
        assert g_ref.abs().max() > 0, f"{name}: reference gradient is zero, the test checks nothing"
        assert_close(f"grad {name}", g_ref, g, 1e-9)


@pytest.mark.parametrize("feature_map", MAPS)
def test_functional_call_reaches_every_parameter(feature_map):
    """Swapped-in parameters (torch.func, as gradcheck over parameters does) must stay in the graph."""
    torch.manual_seed(SEED)
    attn = KernelAttention(2, 4, feature_map=feature_map, depth=3, chunk_size=4).double()
    params = {n: p.detach().clone().requires_grad_() for n, p in attn.named_parameters()}
    q, k, v = (torch.randn(1, 2, 9, 4, dtype=torch.float64) for _ in range(3))
    for causal in (False, True):
        out = torch.func.functional_call(attn, params, (q, k, v), {"causal": causal})
        grads = torch.autograd.grad(out.square().sum(), list(params.values()))
        for name, g in zip(params, grads, strict=True):
            assert g.abs().max() > 0, f"{name} gets no gradient through functional_call (causal={causal})"


def test_feature_maps_registry():
    assert tuple(FEATURE_MAPS) == MAPS
    assert KernelAttention(2, 8).feature_map_name == "hedgehog"
    assert KernelAttention(2, 8).feature_map.output_features == 16
    assert KernelAttention(2, 8, feature_map="t2r", num_features=5).feature_map.output_features == 5


# ---------------------------------------------------------------------------------------------------------------
# 2. Hedgehog's random init approximates softmax; its identity init is the paper's.
# ---------------------------------------------------------------------------------------------------------------


def test_hedgehog_random_init_approximates_softmax():
    torch.manual_seed(SEED)
    Hs, Ns, Ds = 8, 40, 16
    # small norms (|q~|^2 ~ 1): the positive-feature estimator's variance grows like exp(|q~ + k~|^2)
    q, k = (0.5 * torch.randn(2, Hs, Ns, Ds, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, Hs, Ns, Ds, dtype=torch.float64)
    exact = naive_softmax_attention(q, k, v)
    errors, abs_errors = {}, {}
    for num_features in (4, 16, 64, 256, 1024, 4096):
        out = KernelAttention(Hs, Ds, feature_map="hedgehog", num_features=num_features).double()(q, k, v)
        errors[num_features] = round(((out - exact).norm() / exact.norm()).item(), 4)
        abs_errors[num_features] = round((out - exact).abs().mean().item(), 4)
    print("\nhedgehog random init vs softmax, relative L2 error by num_features:", errors)
    print("hedgehog random init vs softmax, mean abs error (values ~ N(0, 1)):", abs_errors)
    values = list(errors.values())
    assert all(b < a for a, b in zip(values, values[1:], strict=False)), errors
    assert values[-1] < values[0] / 16
    assert values[-1] < 0.05 and abs_errors[4096] < 0.01


def test_hedgehog_random_init_is_unbiased_kernel():
    torch.manual_seed(SEED)
    heads, Ds = 64, 8
    x, y = (0.4 * torch.randn(Ds, dtype=torch.float64).expand(1, heads, 1, Ds) for _ in range(2))
    # 64 independent draws of 2 x 512 antithetic features
    attn = KernelAttention(heads, Ds, feature_map="hedgehog", num_features=512).double()
    scale = Ds**-0.5
    phi_x, phi_y = reference_features(attn, x, scale), reference_features(attn, y, scale)
    estimate = ((phi_x * phi_y).sum(-1) / phi_x.shape[-1]).mean().item()
    exact = torch.exp(scale * x[0, 0, 0] @ y[0, 0, 0]).item()
    print(f"hedgehog kernel estimate {estimate:.5f} vs exp(q~.k~) {exact:.5f}")
    assert abs(estimate - exact) < 0.01 * exact


def test_hedgehog_identity_init():
    fmap = KernelAttention(3, 8, feature_map="hedgehog", feature_init="identity").feature_map
    assert torch.equal(fmap.weight, torch.eye(8).expand(3, 8, 8))
    assert torch.equal(fmap.bias, torch.zeros(3, 8))
    wide = KernelAttention(3, 4, feature_map="hedgehog", num_features=10, feature_init="identity").feature_map
    assert torch.equal(wide.weight[0], torch.eye(4)[torch.arange(10) % 4])


# ---------------------------------------------------------------------------------------------------------------
# 3. Low precision: log-features finite, outputs convex.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("feature_map", MAPS)
def test_low_precision_large_inputs(feature_map, dtype, causal):
    torch.manual_seed(SEED)
    Bl, Hl, Nl, Dl = 2, 4, 70, 16
    attn = KernelAttention(Hl, Dl, feature_map=feature_map, chunk_size=32).to(dtype)
    captured = []
    attn.feature_map.register_forward_hook(lambda module, args, out: captured.append(out))
    q, k = (10 * torch.randn(Bl, Hl, Nl, Dl)).to(dtype), (10 * torch.randn(Bl, Hl, Nl, Dl)).to(dtype)
    v = torch.randn(Bl, Hl, Nl, Dl).to(dtype)
    with torch.no_grad():
        out = attn(q, k, v, causal=causal)
    assert out.dtype == dtype and torch.isfinite(out).all()
    # once for queries and once for keys; causal blocks that fall back to the exact form (underflowing rows) map
    # their tokens again, since the no-grad fast path works on the first features in place
    assert len(captured) == 2 or (causal and len(captured) == 4)
    for log_phi in captured:
        # finite log-features = strictly positive, finite features
        assert log_phi.dtype == torch.float32 and torch.isfinite(log_phi).all()
    vf, of = v.float(), out.float()
    if causal:
        lo, hi = vf.cummin(dim=2).values, vf.cummax(dim=2).values
    else:
        lo, hi = vf.amin(dim=2, keepdim=True), vf.amax(dim=2, keepdim=True)
    tol = 1e-6 * vf.abs().max()
    assert (of >= lo - tol).all() and (of <= hi + tol).all()


# ---------------------------------------------------------------------------------------------------------------
# 4. Orthogonality penalty.
# ---------------------------------------------------------------------------------------------------------------


def reference_penalty(weights: list[torch.Tensor], lam: float) -> torch.Tensor:
    total = torch.zeros(())
    for w in weights:
        gram = w @ w.transpose(-1, -2) if w.shape[1] <= w.shape[2] else w.transpose(-1, -2) @ w
        total = total + ((gram - torch.eye(gram.shape[-1])) ** 2).mean()
    return lam * total


@pytest.mark.parametrize("num_features", [4, 8, 16], ids=["S4", "S8", "S16"])
@pytest.mark.parametrize("feature_map", PENALISED_MAPS)
def test_auxiliary_loss(feature_map, num_features):
    torch.manual_seed(SEED)
    attn = KernelAttention(3, 8, feature_map=feature_map, num_features=num_features, ortho_penalty=0.5)
    weights = attn.feature_map.orthogonal_weights()
    assert len(weights) == (2 if feature_map == "deep" else 1)
    assert attn.auxiliary_loss().item() < 1e-10
    with torch.no_grad():
        for w in weights:
            w.add_(0.3 * torch.randn_like(w))
    loss = attn.auxiliary_loss()
    assert loss.dim() == 0 and loss.item() > 1e-3
    torch.testing.assert_close(loss, reference_penalty(weights, 0.5))
    loss.backward()
    assert all(w.grad is not None and w.grad.abs().max() > 0 for w in weights)


def test_auxiliary_loss_identity_init_and_off():
    attn = KernelAttention(2, 8, feature_map="t2r", feature_init="identity", ortho_penalty=1.0)
    assert attn.auxiliary_loss().item() == 0.0
    for feature_map in MAPS:
        assert KernelAttention(2, 8, feature_map=feature_map).auxiliary_loss() is None
    # hedgehog's random rows have chi norms by design: nothing is penalised
    hedgehog = KernelAttention(2, 8, feature_map="hedgehog", ortho_penalty=1.0)
    assert hedgehog.feature_map.orthogonal_weights() == []
    assert hedgehog.auxiliary_loss().item() == 0.0


# ---------------------------------------------------------------------------------------------------------------
# 5. Errors.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"feature_map": "rbf"}, r"`feature_map`.*'deep', 'ffn', 'glu', 'hedgehog', 't2r'.*'rbf'"),
        ({"num_features": 0}, r"`num_features` must be an integer >= 1, got 0"),
        ({"num_features": -3}, r"`num_features`"),
        ({"depth": 0}, r"`depth` must be an integer >= 1, got 0"),
        ({"ortho_penalty": -0.1}, r"`ortho_penalty` must be a number >= 0"),
        ({"feature_init": "xavier"}, r"`feature_init`.*'random', 'identity'.*'xavier'"),
        ({"chunk_size": 0}, r"`chunk_size`"),
    ],
    ids=["map", "features0", "features-neg", "depth", "penalty", "init", "chunk"],
)
def test_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_attention("kernel", num_heads=2, head_dim=8, **kwargs)
