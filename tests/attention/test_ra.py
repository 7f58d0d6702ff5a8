"""Tests of `hf_lara/attention/ra.py`: RA is an unbiased Monte-Carlo estimate of softmax attention."""

from __future__ import annotations

import pytest
import torch

from hf_lara.attention import build_attention
from hf_lara.attention.naive import naive_softmax_attention
from hf_lara.attention.ra import RandomizedAttention

from .utils import assert_close

SEED = 42
# 5 standard errors per entry: P(|t_63| > 5) is about 5e-6, so even over the ~1,000 entries of a case a false alarm
# has probability < 1e-2, while a bias of a few standard errors (the official noise scale) is caught.
Z_BOUND = 5.0


def make_inputs(B, H, Nq, Nk, D, pad, dtype=torch.float64):
    """Gaussian q, k, v and a padding mask: batch row 1 left-padded (`pad="left"`) or right-padded by 3."""
    g = torch.Generator().manual_seed(SEED)
    q = torch.randn(B, H, Nq, D, generator=g, dtype=dtype)
    k, v = (torch.randn(B, H, Nk, D, generator=g, dtype=dtype) for _ in range(2))
    mask = None
    if pad is not None:
        mask = torch.ones(B, Nk, dtype=torch.bool)
        if pad == "left":
            mask[1, :3] = False
        else:
            mask[1, -3:] = False
    return q, k, v, mask


def repeat_batch(x: torch.Tensor | None, copies: int) -> torch.Tensor | None:
    return None if x is None else x.repeat_interleave(copies, dim=0)


CONVERGENCE_CASES = [
    pytest.param(2, 2, 11, 11, 8, False, "right", id="B2-T11-H2-D8-bidirectional-rightpad"),
    pytest.param(2, 2, 11, 11, 8, True, "left", id="B2-T11-H2-D8-causal-leftpad"),
    pytest.param(2, 2, 4, 13, 8, True, "left", id="B2-Tq4-Tk13-H2-D8-decode-leftpad"),
]


@pytest.mark.parametrize("B, H, Nq, Nk, D, causal, pad", CONVERGENCE_CASES)
def test_training_mean_converges_to_softmax(B, H, Nq, Nk, D, causal, pad):
    """The mean of many draws approaches softmax within its standard error, which falls like 1/sqrt(draws)."""
    q, k, v, mask = make_inputs(B, H, Nq, Nk, D, pad)
    copies, per_call = 64, 100
    torch.manual_seed(SEED)
    attn = RandomizedAttention(num_heads=H, head_dim=D, num_samples=per_call).train()
    out = attn(
        repeat_batch(q, copies),
        repeat_batch(k, copies),
        repeat_batch(v, copies),
        padding_mask=repeat_batch(mask, copies),
        causal=causal,
    )
    means = out.view(B, copies, H, Nq, D)  # 64 independent means of 100 draws each
    exact = naive_softmax_attention(q, k, v, mask, causal)
    sd_100 = means.std(dim=1)
    err_400 = (means[:, :4].mean(dim=1) - exact).abs()
    err_6400 = (means.mean(dim=1) - exact).abs()
    se_400, se_6400 = sd_100 / 2, sd_100 / 8
    # the root-mean-square error over all entries is a far steadier yardstick than the max
    ratio = (err_400.square().mean().sqrt() / err_6400.square().mean().sqrt()).item()
    print(
        f"\nRA {B=} {Nq=} {Nk=} {causal=} {pad=}: max err 400 draws {err_400.max():.4f} (max s.e. "
        f"{se_400.max():.4f}), 6400 draws {err_6400.max():.4f} (max s.e. {se_6400.max():.4f}), rms ratio {ratio:.2f}"
    )
    assert bool((err_400 <= Z_BOUND * se_400 + 1e-12).all())
    assert bool((err_6400 <= Z_BOUND * se_6400 + 1e-12).all())
    # 16x the draws: errors shrink by about sqrt(16) = 4x
    assert 2.0 < ratio < 8.0


def official_noise_draws(q, k, v, scale, draws, noise_std, generator):
    """Per-draw RA outputs `(B, H, N, draws, D)` written out independently, with tilde-space noise `noise_std`.

    `noise_std=1` is the paper's estimator; the official code adds `N(0, I)` in raw space, i.e. `noise_std =
    scale**0.5` in tilde space.
    """
    B, H, N, D = q.shape
    q_t, k_t = q * scale**0.5, k * scale**0.5
    probs = torch.softmax(q_t @ k_t.transpose(-1, -2), dim=-1)
    index = torch.multinomial(probs.reshape(-1, N), draws, replacement=True, generator=generator)
    index = index.reshape(B, H, N * draws)
    k_star = torch.stack([k_t[b, h, index[b, h]] for b in range(B) for h in range(H)]).reshape(B, H, N, draws, D)
    eps = torch.randn(B, H, N, draws, D, generator=generator, dtype=q.dtype)
    omega = q_t[:, :, :, None] + k_star + noise_std * eps
    logits = torch.einsum("bhnsd,bhmd->bhnsm", omega, k_t) - 0.5 * (k_t * k_t).sum(-1)[:, :, None, None]
    return torch.einsum("bhnsm,bhmd->bhnsd", torch.softmax(logits, dim=-1), v)


def test_raw_space_noise_is_biased_tilde_space_noise_is_not():
    """Contrast (`hf_lara/attention/README.md`, Notation): the official raw-space noise leaves a bias of many standard errors."""
    B, H, N, D, draws = 1, 2, 10, 16, 6400
    q, k, v, _ = make_inputs(B, H, N, N, D, None)
    scale = D**-0.5
    exact = naive_softmax_attention(q, k, v)
    g = torch.Generator().manual_seed(SEED)
    z_scores = {}
    for label, noise_std in (("tilde N(0, I) (paper)", 1.0), ("raw N(0, I) (official code)", scale**0.5)):
        per_draw = official_noise_draws(q, k, v, scale, draws, noise_std, g)
        se = per_draw.std(dim=3) / draws**0.5
        z_scores[label] = ((per_draw.mean(dim=3) - exact).abs() / se).max().item()
    torch.manual_seed(SEED)
    attn = RandomizedAttention(num_heads=H, head_dim=D, num_samples=100).train()
    ours = attn(*(x.repeat_interleave(64, dim=0) for x in (q, k, v))).view(B, 64, H, N, D)
    z_scores["hf_lara ra"] = ((ours.mean(dim=1) - exact).abs() / (ours.std(dim=1) / 8)).max().item()
    print("\nRA max |bias| / s.e. over 6400 draws:", {name: round(z, 1) for name, z in z_scores.items()})
    assert z_scores["tilde N(0, I) (paper)"] < Z_BOUND
    assert z_scores["hf_lara ra"] < Z_BOUND
    assert z_scores["raw N(0, I) (official code)"] > 2 * Z_BOUND


def test_eval_is_deterministic_mixture_mean():
    """Eval mode: `w = q~ + sum_m pi_m k~_m`, then the key softmax of `w`, with no randomness."""
    B, H, N, D = 2, 2, 9, 8
    q, k, v, mask = make_inputs(B, H, N, N, D, "left")
    attn = RandomizedAttention(num_heads=H, head_dim=D).eval()
    out = attn(q, k, v, padding_mask=mask, causal=True)
    assert torch.equal(out, attn(q, k, v, padding_mask=mask, causal=True))
    scale = D**-0.5
    q_t, k_t = q * scale**0.5, k * scale**0.5
    visible = torch.ones(N, N, dtype=torch.bool).tril()[None, None] & mask[:, None, None, :]
    has_key = visible.any(-1, keepdim=True)
    probs = torch.softmax((q_t @ k_t.transpose(-1, -2)).masked_fill(~visible, -1e300), dim=-1) * has_key
    omega = q_t + probs @ k_t
    logits = omega @ k_t.transpose(-1, -2) - 0.5 * (k_t**2).sum(-1)[:, :, None, :]
    ref = torch.softmax(logits.masked_fill(~visible, -1e300), dim=-1) * has_key @ v
    assert_close("ra eval", ref, out, 1e-10)
    assert bool((out[1, :, :3] == 0).all()), "queries that see no real key must return zeros"


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_padded_keys_get_zero_weight(training):
    """Changing padded keys and values (to huge numbers) changes nothing, in eval and (same seed) in training."""
    B, H, N, D = 2, 2, 10, 8
    q, k, v, mask = make_inputs(B, H, N, N, D, "right")
    attn = RandomizedAttention(num_heads=H, head_dim=D, num_samples=3).train(training)
    torch.manual_seed(SEED)
    out = attn(q, k, v, padding_mask=mask)
    k2, v2 = k.clone(), v.clone()
    k2[1, :, -3:], v2[1, :, -3:] = 1e3, -1e6
    torch.manual_seed(SEED)
    assert torch.equal(out, attn(q, k2, v2, padding_mask=mask))
    assert bool(out.isfinite().all())


def test_gradients_flow_in_training():
    B, H, N, D = 2, 2, 7, 8
    q, k, v, mask = make_inputs(B, H, N, N, D, "left")
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    torch.manual_seed(SEED)
    attn = RandomizedAttention(num_heads=H, head_dim=D, num_samples=2).train()
    attn(q, k, v, padding_mask=mask, causal=True).square().sum().backward()
    for name, x in (("q", q), ("k", k), ("v", v)):
        assert x.grad is not None and bool(x.grad.isfinite().all()) and x.grad.abs().sum() > 0, name


def test_built_by_name_and_rejects_bad_num_samples():
    attn = build_attention("ra", num_heads=2, head_dim=4, num_samples=3)
    assert isinstance(attn, RandomizedAttention) and attn.num_samples == 3 and not attn.is_linear
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="num_samples"):
            RandomizedAttention(num_heads=2, head_dim=4, num_samples=bad)
