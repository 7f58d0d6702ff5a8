"""Tests of `hf_lara/attention/eva.py` against `naive_eva_attention` (`attention/naive.py`), a per-query loop over
explicit token sets written from the formula, and against exact softmax when the window covers the sequence."""

from __future__ import annotations

import pytest
import torch

import hf_lara.attention.eva as eva_module
from hf_lara.attention import build_attention
from hf_lara.attention.eva import EVAAttention, causal_eva, causal_summaries, chunk_length
from hf_lara.attention.naive import eva_visible_sets, naive_eva_attention, naive_softmax_attention

from .utils import assert_close, qkv

# The reference, `naive_eva_attention`, lists which keys are exact and which token sets are summarised, query by
# query (`eva_visible_sets` in `attention/naive.py`).


def _eva(D: int, H: int, window: int, num_chunks: int = 64, chunk: int = 1, **kw) -> EVAAttention:
    return (
        build_attention(
            "eva", num_heads=H, head_dim=D, window_size=window, num_chunks=num_chunks, chunk_size=chunk, **kw
        )
        .double()
        .eval()
    )


def _perturb(attn: EVAAttention, std: float = 0.2) -> None:
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(std * torch.randn_like(p))


def _reference(attn: EVAAttention, q, k, v, causal: bool) -> torch.Tensor:
    return naive_eva_attention(
        q,
        k,
        v,
        causal=causal,
        window_size=attn.window_size,
        num_chunks=attn.num_chunks,
        chunk_size=attn.chunk_size,
        key_proj=attn.chunk_key_proj,
        proposal_proj=attn.proposal_proj,
        sinks=attn.sink_tokens,
        local_windows=attn.local_windows,
    )


# (B, N, H, D, window_size, num_chunks): several windows per chunk, partial last windows and chunks,
# a last chunk holding a single window (its excluded summary is empty), one window per chunk (P == E) and chunks
# shorter than the window (N / C < E: chunks of 4 in windows of 8, of 6 in windows of 12, of 1 in windows of 4).
BIDIRECTIONAL = [
    pytest.param(2, 29, 2, 8, 4, 3, id="B2-T29-H2-D8-E4-C3"),
    pytest.param(1, 23, 3, 6, 5, 2, id="B1-T23-H3-D6-E5-C2"),
    pytest.param(2, 25, 2, 8, 4, 3, id="B2-T25-H2-D8-E4-C3"),
    pytest.param(1, 30, 2, 8, 4, 64, id="B1-T30-H2-D8-E4-C64"),
    pytest.param(2, 37, 1, 4, 7, 2, id="B2-T37-H1-D4-E7-C2"),
    pytest.param(1, 25, 2, 8, 4, 7, id="B1-T25-H2-D8-E4-C7"),
    pytest.param(2, 29, 2, 8, 8, 8, id="B2-T29-H2-D8-E8-C8"),
    pytest.param(1, 50, 2, 4, 12, 10, id="B1-T50-H2-D4-E12-C10"),
]
# (B, N, H, D, window_size, chunk_size)
CAUSAL = [
    pytest.param(2, 29, 2, 8, 8, 4, id="B2-T29-H2-D8-E8-P4"),
    pytest.param(1, 23, 3, 6, 6, 2, id="B1-T23-H3-D6-E6-P2"),
    pytest.param(2, 37, 2, 8, 4, 4, id="B2-T37-H2-D8-E4-P4"),
    pytest.param(1, 19, 1, 4, 3, 1, id="B1-T19-H1-D4-E3-P1"),
]
# `local_windows`: block-aligned windows (1, the old causal EVA), the default (2), and a wider span (3)
LOCAL = pytest.mark.parametrize("K", [1, 2, 3], ids=["K1", "K2", "K3"])
LOCAL12 = pytest.mark.parametrize("K", [1, 2], ids=["K1", "K2"])


# ---------------------------------------------------------------------------------------------------------------
# 1. A window covering the sequence is exact softmax.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "B,N,H,D", [(2, 29, 2, 8), (1, 13, 3, 16), (2, 64, 1, 4)], ids=["B2-T29-H2-D8", "B1-T13-H3-D16", "B2-T64-H1-D4"]
)
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("extra", [0, 7], ids=["E=N", "E>N"])
@LOCAL12
def test_window_covering_sequence_is_softmax(B, N, H, D, causal, extra, K):
    """No summary is left (even in training mode, with perturbed maps): EVA is exact softmax."""
    attn = _eva(D, H, N + extra, num_chunks=3, chunk=1, local_windows=K).train()
    _perturb(attn)
    q, k, v = qkv(B, H, N, D)
    with torch.no_grad():
        out = attn(q, k, v, causal=causal)
    assert_close("eva vs softmax", naive_softmax_attention(q, k, v, causal=causal), out, 1e-12)


@pytest.mark.parametrize("grad", [False, True], ids=["fast", "autograd"])
@pytest.mark.parametrize("K,E", [(2, 15), (2, 16), (3, 10)], ids=["K2-E15", "K2-E16", "K3-E10"])
def test_causal_span_covering_sequence_is_softmax(K, E, grad):
    """Causal, `N = 29 <= K E` with `E < N`: every query's exact span holds all its keys, no summary is left (also in
    training mode, perturbed maps), so EVA is exact softmax on the fast, autograd and decoding paths."""
    attn = _eva(8, 2, E, chunk=1, local_windows=K).train()
    _perturb(attn)
    q, k, v = qkv(2, 2, 29, 8)
    expected = naive_softmax_attention(q, k, v, causal=True)
    with torch.set_grad_enabled(grad):
        assert_close("span vs softmax", expected, attn(q, k, v, causal=True), 1e-12)
        out, state = attn.prefill(q[:, :, :20], k[:, :, :20], v[:, :, :20])
        step, _ = attn.step(q[:, :, 20:], k[:, :, 20:], v[:, :, 20:], state)
    assert_close("decoding vs softmax", expected, torch.cat([out, step], dim=2), 1e-12)


@pytest.mark.parametrize("K", [1, 2, 3], ids=["K1", "K2", "K3"])
@pytest.mark.parametrize("E,P,G", [(4, 2, 0), (6, 3, 5), (5, 1, 2)], ids=["E4-P2", "E6-P3-G5", "E5-P1-G2"])
def test_causal_visible_sets_count_each_key_once(K, E, P, G):
    """The reference's sets: a causal query at `n` sees `0 .. n` exactly once (exact, or in exactly one summary), its
    exact span is windows `w - K + 1 .. w` (so at least `min(n + 1, (K - 1) E + 1)` keys), the sinks before it, and
    summaries of whole chunks ending by the span's start."""
    N = 40
    for n in range(N):
        exact, summaries = eva_visible_sets(n, N, True, E, 1, P, G, K)
        summarised = [m for tokens, _ in summaries for m in tokens]
        assert sorted(exact + summarised) == list(range(n + 1))
        lo = max(n // E - K + 1, 0) * E
        assert set(range(lo, n + 1)) <= set(exact) and set(exact) - set(range(lo, n + 1)) <= set(range(G))
        assert len(exact) >= min(n + 1, (K - 1) * E + 1)
        assert all(m < lo and m >= G for m in summarised)


# ---------------------------------------------------------------------------------------------------------------
# 2. Fast path equals the per-query reference: outputs, decoding and gradients.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("B,N,H,D,E,C", BIDIRECTIONAL)
@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive", "fixed"])
def test_bidirectional_matches_naive(B, N, H, D, E, C, adaptive):
    attn = _eva(D, H, E, num_chunks=C, adaptive=adaptive)
    _perturb(attn)
    q, k, v = qkv(B, H, N, D)
    with torch.no_grad():
        assert_close("bidirectional", _reference(attn, q, k, v, False), attn(q, k, v), 1e-10)


@pytest.mark.parametrize("B,N,H,D,E,P", CAUSAL)
@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive", "fixed"])
@LOCAL
def test_causal_matches_naive(B, N, H, D, E, P, adaptive, K):
    """Fast path and decoding over a cache (`Nq < N`: direct or blocked) against the reference; the prefix property:
    the forward over the first `M` tokens equals the first `M` rows of the full forward."""
    attn = _eva(D, H, E, chunk=P, adaptive=adaptive, local_windows=K)
    _perturb(attn)
    q, k, v = qkv(B, H, N, D)
    with torch.no_grad():
        full = attn(q, k, v, causal=True)
        assert_close("causal", _reference(attn, q, k, v, True), full, 1e-10)
        for nq in (1, 3, E + 1, N - 1):
            step = attn(q[:, :, -nq:], k, v, causal=True)
            assert_close(f"decode Nq={nq}", _reference(attn, q[:, :, -nq:], k, v, True), step, 1e-10)
            assert_close(f"decode Nq={nq} vs full", full[:, :, -nq:], step, 1e-12)
        for M in (1, E - 1, E, E + 1, 2 * E, 2 * E + 1, N - 2):  # strided slices; 2 E: windows tile the prefix
            prefix = attn(q[:, :, :M], k[:, :, :M], v[:, :, :M], causal=True)
            assert_close(f"prefix M={M}", full[:, :, :M], prefix, 1e-12)


@pytest.mark.parametrize("block_size", [1, 9, 24], ids=["one-window", "two-windows", "three-windows"])
@pytest.mark.parametrize("num_queries", [37, 5, 19], ids=["full", "decode-5", "decode-19"])
@LOCAL
def test_causal_blocks_match_naive_with_gradients(block_size, num_queries, K):
    """Queries processed a few windows at a time (several blocks, a partial last one), with and without autograd:
    outputs and gradients of queries, keys, values and both maps equal the per-query reference in fp64."""
    torch.manual_seed(0)
    attn = _eva(6, 2, 8, chunk=4, local_windows=K)
    _perturb(attn)
    q, k, v = qkv(2, 2, 37, 6)
    q = q[:, :, -num_queries:].clone()
    inputs = [x.requires_grad_() for x in (q, k, v)] + list(attn.parameters())
    maps = attn._map(attn.chunk_key_proj), attn._map(attn.proposal_proj), False
    fast = causal_eva(q, k, v, 8, 4, *maps, scale=6**-0.5, block_size=block_size, local_windows=K)
    slow = _reference(attn, q, k, v, True)
    assert_close("blocked causal", slow, fast, 1e-12)
    with torch.no_grad():
        inference = causal_eva(q, k, v, 8, 4, *maps, scale=6**-0.5, block_size=block_size, local_windows=K)
    assert_close("fast causal", slow, inference, 1e-12)
    weight = torch.randn_like(fast)
    for f, s in zip(
        torch.autograd.grad((fast * weight).sum(), inputs), torch.autograd.grad((slow * weight).sum(), inputs)
    ):
        assert_close("gradient", s, f, 1e-10)


@pytest.mark.parametrize(
    "causal,B,N,H,D,E,C,P",
    [
        pytest.param(False, 2, 29, 2, 6, 4, 3, 1, id="bidirectional-B2-T29-H2-D6-E4-C3"),
        pytest.param(False, 2, 29, 2, 6, 8, 8, 1, id="bidirectional-B2-T29-H2-D6-E8-C8"),
        pytest.param(True, 2, 29, 2, 6, 8, 1, 4, id="causal-B2-T29-H2-D6-E8-P4"),
    ],
)
@LOCAL12
def test_gradients_match_naive(causal, B, N, H, D, E, C, P, K):
    """Gradients w.r.t. q, k, v and both adaptive maps (moved off the identity) equal the reference's."""
    attn = _eva(D, H, E, num_chunks=C, chunk=P, local_windows=K)
    _perturb(attn)
    q, k, v = (t.requires_grad_() for t in qkv(B, H, N, D))
    weight = torch.randn(B, H, N, D, dtype=torch.float64)
    inputs = [q, k, v, *attn.parameters()]
    fast = torch.autograd.grad((attn(q, k, v, causal=causal) * weight).sum(), inputs)
    slow = torch.autograd.grad((_reference(attn, q, k, v, causal) * weight).sum(), inputs)
    names = ["q", "k", "v", *(name for name, _ in attn.named_parameters())]
    assert len(names) == 7
    for name, ref, out in zip(names, slow, fast, strict=True):
        assert_close(f"grad {name}", ref, out, 1e-10)


# ---------------------------------------------------------------------------------------------------------------
# 3. Empty summaries get no weight; training-mode sampling.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "N,E,C", [(30, 4, 64), (25, 4, 7), (25, 4, 3), (9, 4, 5)], ids=["T30-E4-C64", "T25-E4-C7", "T25-E4-C3", "T9-E4-C5"]
)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_empty_summaries_get_no_weight(N, E, C, training):
    """With constant values every summary is that constant, so any mass on an empty (zero) summary shows.

    `C=64` gives chunks of one token (the summaries inside a query's window are unused); `C=7` one window per
    chunk (every "chunk minus window" summary is empty); `T25-E4-C3` has a last chunk holding a single window;
    `T9-E4-C5` chunks of 2 tokens, the last real one holding a single token and one past `N`.
    """
    attn = _eva(8, 2, E, num_chunks=C).train(training)
    _perturb(attn)
    q, k, _ = qkv(2, 2, N, 8)
    v = torch.full((2, 2, N, 8), 3.0, dtype=torch.float64)
    with torch.no_grad():
        out = attn(q, k, v)
    assert (out - 3.0).abs().max() < 1e-12
    if not training:
        with torch.no_grad():
            v = torch.randn_like(v)
            assert_close("vs naive", _reference(attn, q, k, v, False), attn(q, k, v), 1e-10)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_training_draws_one_sample_per_batch_head_and_chunk(causal):
    """Identical rows and heads get different outputs in training (independent draws) and equal ones in eval."""
    attn = _eva(8, 2, 4, num_chunks=3, chunk=2)
    q, k, v = qkv(1, 1, 29, 8)
    q, k, v = (t.expand(2, 2, -1, -1) for t in (q, k, v))
    with torch.no_grad():
        out = attn(q, k, v, causal=causal)
        assert torch.equal(out[0], out[1]) and torch.equal(out[:, 0], out[:, 1])
        noisy = attn.train()(q, k, v, causal=causal)
    assert torch.isfinite(noisy).all()
    assert not torch.allclose(noisy[0], noisy[1]) and not torch.allclose(noisy[:, 0], noisy[:, 1])
    if causal:
        # the first window sees no chunk: exact there, whatever the draw
        torch.testing.assert_close(noisy[..., :4, :], out[..., :4, :], atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# 4. Hyper-parameter errors and module surface.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hparams,match",
    [
        ({"window_size": 0}, "window_size"),
        ({"window_size": -4}, "window_size"),
        ({"num_chunks": 0}, "num_chunks"),
        ({"num_chunks": 2.0}, "num_chunks"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"window_size": 10, "chunk_size": 4}, "`window_size` must be a multiple of `chunk_size`"),
        ({"local_windows": 0}, "`local_windows` must be an integer >= 1"),
        ({"local_windows": 1.5}, "`local_windows` must be an integer >= 1"),
    ],
    ids=[
        "window-0",
        "window-neg",
        "chunks-0",
        "chunks-float",
        "chunk-0",
        "chunk-not-dividing",
        "local-0",
        "local-float",
    ],
)
def test_bad_hyper_parameters_raise(hparams, match):
    with pytest.raises(ValueError, match=match):
        build_attention("eva", num_heads=2, head_dim=8, **hparams)


def test_parameters_and_defaults():
    attn = build_attention("eva", num_heads=4, head_dim=8)
    assert isinstance(attn, EVAAttention) and attn.packs_padding
    assert (attn.window_size, attn.num_chunks, attn.chunk_size, attn.adaptive) == (64, 64, 16, True)
    assert attn.local_windows == 2 and "local_windows=2" in repr(attn)
    shapes = {name: tuple(p.shape) for name, p in attn.named_parameters()}
    assert shapes == {
        "chunk_key_proj.weight": (8, 8),
        "chunk_key_proj.bias": (8,),
        "proposal_proj.weight": (8, 8),
        "proposal_proj.bias": (8,),
    }
    assert torch.equal(attn.chunk_key_proj.weight, torch.eye(8)) and not attn.proposal_proj.bias.any()
    assert list(build_attention("eva", num_heads=4, head_dim=8, adaptive=False).parameters()) == []
    assert "window_size=64" in repr(attn)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_fresh_adaptive_equals_fixed(causal):
    """Identity-initialised maps are plain means: a fresh conversion equals `adaptive=False`."""
    q, k, v = qkv(2, 2, 41, 8)
    with torch.no_grad():
        a = _eva(8, 2, 4, num_chunks=3, chunk=2)(q, k, v, causal=causal)
        b = _eva(8, 2, 4, num_chunks=3, chunk=2, adaptive=False)(q, k, v, causal=causal)
    assert_close("adaptive vs fixed", b, a, 1e-14)


# ---------------------------------------------------------------------------------------------------------------
# 5. Accuracy on realistic attention.
# ---------------------------------------------------------------------------------------------------------------


def _drifting_qkv(B: int, H: int, N: int, D: int, rho: float = 0.9):
    """Keys follow a slowly drifting centre (AR(1), correlation `rho` between neighbours), each query sits near
    the key at its position, values are random: attention is peaked and mostly local, as in pretrained models."""
    k = torch.empty(B, H, N, D, dtype=torch.float64)
    state = torch.randn(B, H, D, dtype=torch.float64)
    for t in range(N):
        state = rho * state + (1 - rho**2) ** 0.5 * torch.randn(B, H, D, dtype=torch.float64) if t else state
        k[:, :, t] = 2.0 * state
    return k + 0.5 * torch.randn_like(k), k, torch.randn_like(k)


def _relative_mse(ref: torch.Tensor, out: torch.Tensor) -> float:
    return ((ref - out).square().mean() / ref.square().mean()).item()


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_accuracy_beats_uniform_and_improves_with_window(causal):
    """Eval-mode EVA (identity maps) against softmax: better than uniform averaging, better as the window grows."""
    B, H, N, D = 2, 4, 251, 16
    q, k, v = _drifting_qkv(B, H, N, D)
    exact = naive_softmax_attention(q, k, v, causal=causal)
    if causal:
        uniform = v.cumsum(2) / torch.arange(1, N + 1, dtype=v.dtype)[:, None]
    else:
        uniform = v.mean(2, keepdim=True).expand_as(v)
    baseline = _relative_mse(exact, uniform)
    errors = {}
    for window in (4, 8, 16, 32, 64):
        with torch.no_grad():
            out = _eva(D, H, window, num_chunks=8, chunk=4)(q, k, v, causal=causal)
        errors[window] = _relative_mse(exact, out)
    mode = "causal (P=4)" if causal else "bidirectional (C=8)"
    print(
        f"\n{mode} relative MSE vs softmax, T={N} D={D}: uniform {baseline:.3f}; EVA "
        + ", ".join(f"E={w}: {e:.3f}" for w, e in errors.items())
    )
    assert max(errors.values()) < 0.6 * baseline
    values = list(errors.values())
    assert all(later < earlier for earlier, later in zip(values, values[1:], strict=False)), errors


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("G", [0, 3, 13])
@LOCAL
def test_decoding_state_equals_full_forward(padded, G, K):
    """Prefill, then steps of 1 to 9 tokens crossing windows (and, for G = 13, the sinks' end): the rows of the full
    causal forward (fp64), also with left padding, where windows and chunks start at each row's first real token in
    both passes; the state keeps the exact span (< K E tokens) and with sinks the first G keys and values only."""
    torch.manual_seed(0)
    attn = _eva(6, 2, 8, chunk=4, sink_tokens=G, local_windows=K)
    _perturb(attn)
    q, k, v = qkv(2, 2, 45, 6)
    mask = torch.ones(2, 45, dtype=torch.bool)
    mask[0, :5] = not padded
    with torch.no_grad():
        full = attn(q, k, v, padding_mask=mask, causal=True)
        assert_close("full vs naive (row 1)", _reference(attn, q[1:], k[1:], v[1:], True), full[1:], 1e-10)
        out, state = attn.prefill(q[:, :, :6], k[:, :, :6], v[:, :, :6], padding_mask=mask[:, :6])
        outs, start = [out], 6
        for n in (1, 1, 5, 9, 1, 1, 1, 8, 3, 1, 1, 7):
            part = slice(start, start + n)
            before = [state.chunk_keys.clone(), state.sink_keys.clone()]
            out, new = attn.step(q[:, :, part], k[:, :, part], v[:, :, part], state, padding_mask=mask[:, part])
            assert all(torch.equal(a, b) for a, b in zip(before, [state.chunk_keys, state.sink_keys], strict=True))
            assert new.sink_keys.shape == (2, 2, G, 6) and new.keys.shape == (2, 2, K * 8, 6)
            outs.append(out)
            state, start = new, start + n
    assert_close("decode vs full", full, torch.cat(outs, dim=2), 1e-12)
    real = mask.sum(-1)
    if G == 0:
        summarised = (real // 8 - K + 1).clamp_min(0) * 8  # windows that left the exact span
        assert (
            state.count.tolist() == (summarised // 4).tolist() and state.fill.tolist() == (real - summarised).tolist()
        )
    else:
        first = mask[0].nonzero().flatten()[:G]
        assert torch.equal(state.sink_keys[0], k[0, :, first].to(state.sink_keys.dtype))
        with pytest.raises(ValueError, match="sink_tokens"):
            _eva(6, 2, 8, chunk=4, local_windows=K).step(q[:, :, :1], k[:, :, :1], v[:, :, :1], state)
    with pytest.raises(ValueError, match="local_windows"):
        _eva(6, 2, 8, chunk=4, sink_tokens=G, local_windows=K + 1).step(q[:, :, :1], k[:, :, :1], v[:, :, :1], state)


@LOCAL12
def test_decoding_state_index_select_for_beams(K):
    """Mid-decoding, rows reordered and repeated (`index_select`, beam search) then stepped: equal to the full forward
    of the reordered rows (fp64), left padding and sinks included."""
    attn = _eva(6, 2, 4, chunk=2, sink_tokens=2, local_windows=K)
    _perturb(attn)
    q, k, v = qkv(3, 2, 30, 6)
    mask = torch.ones(3, 30, dtype=torch.bool)
    mask[1, :3] = False
    index = torch.tensor([2, 0, 0, 1])
    with torch.no_grad():
        full = attn(q[index], k[index], v[index], padding_mask=mask[index], causal=True)
        _, state = attn.prefill(q[:, :, :17], k[:, :, :17], v[:, :, :17], padding_mask=mask[:, :17])
        state = state.index_select(index)
        outs = []
        for t in range(17, 30):
            part = slice(t, t + 1)
            out, state = attn.step(q[index, :, part], k[index, :, part], v[index, :, part], state)
            outs.append(out)
    assert_close("beams vs full", full[:, :, 17:], torch.cat(outs, dim=2), 1e-12)


@LOCAL
def test_decoding_summarises_each_chunk_once(monkeypatch, K):
    """A step summarises only the window that leaves the exact span: no call ever sees more than `E` tokens after
    the prompt."""
    attn = _eva(6, 2, 8, chunk=4, local_windows=K)
    q, k, v = qkv(1, 2, 60, 6)
    sizes = []
    original = eva_module.causal_summaries
    monkeypatch.setattr(eva_module, "causal_summaries", lambda k, *a: sizes.append(k.shape[2]) or original(k, *a))
    with torch.no_grad():
        _, state = attn.prefill(q[:, :, :20], k[:, :, :20], v[:, :, :20])
        sizes.clear()
        for t in range(20, 60):
            _, state = attn.step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state)
    closed = 60 // 8 - K + 1  # windows summarised after 60 tokens, 20 // 8 - K + 1 of them during the prompt
    assert max(sizes) == 8 and sizes.count(8) == closed - max(20 // 8 - K + 1, 0) and state.count.item() == closed * 2


@LOCAL12
def test_fast_path_overflow_falls_back_to_exact_shifts(K):
    """A summary logit far above every exact logit overflows the shifted fp32 products: the call reruns with max
    shifts and still equals the fp64 reference."""
    attn = _eva(4, 1, 4, chunk=2, local_windows=K).float()
    q, k, v = qkv(1, 1, 12, 4)
    q[..., 0], k[..., :4, 0] = 20.0, 20.0  # the first chunks: logits ~ 200 above the later exact ones
    k[..., 4:, 0] = -20.0
    with torch.no_grad():
        out = attn(q.float(), k.float(), v.float(), causal=True)
        root = 0.5**0.5
        keys, betas = causal_summaries(k.float(), v.float(), 2, lambda x: x, lambda x: x, False, root)
        geo = eva_module._Causal(4, 2, 2, 0, 0.5, local=K)
        shifted = eva_module._causal_fast(q.float(), k.float(), v.float(), keys, betas, geo, None)
    assert not torch.isfinite(shifted).all() and torch.isfinite(out).all()
    # fp32 logits of size ~200 carry absolute rounding ~1e-5, hence the weights a relative error ~1e-5
    assert_close("overflow fallback", _reference(attn.double(), q, k, v, True), out.double(), 1e-4)


# ---------------------------------------------------------------------------------------------------------------
# 6. Attention sinks (`sink_tokens=G`): the first G tokens (bidirectional: and the last G) are exact for every query.
# ---------------------------------------------------------------------------------------------------------------

# (B, N, H, D, window_size, num_chunks, G): sinks spanning several windows and chunks, chunks left empty by the
# sinks, first and last sinks overlapping (N < 2G), every token a sink (N <= G), uneven chunks and windows.
BIDIRECTIONAL_SINKS = [
    pytest.param(2, 29, 2, 8, 4, 3, 2, id="B2-T29-E4-C3-G2"),
    pytest.param(1, 23, 3, 6, 5, 2, 6, id="B1-T23-E5-C2-G6"),
    pytest.param(2, 30, 2, 8, 4, 64, 1, id="B2-T30-E4-C64-G1"),
    pytest.param(1, 9, 2, 4, 2, 3, 5, id="B1-T9-E2-C3-G5"),
    pytest.param(2, 4, 1, 4, 2, 2, 4, id="B2-T4-E2-C2-G4"),
    pytest.param(2, 37, 1, 4, 7, 2, 9, id="B2-T37-E7-C2-G9"),
    pytest.param(2, 29, 2, 8, 8, 8, 3, id="B2-T29-E8-C8-G3"),
    pytest.param(1, 50, 2, 4, 12, 10, 5, id="B1-T50-E12-C10-G5"),
]


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Unused inputs (maps when every token is a sink) get zero gradients."""
    return torch.autograd.grad((out * weight).sum(), inputs, allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("B,N,H,D,E,C,G", BIDIRECTIONAL_SINKS)
def test_bidirectional_sinks_match_naive_with_gradients(B, N, H, D, E, C, G, monkeypatch):
    """Autograd path: outputs and gradients (q, k, v, both maps) equal the per-query reference; the inference path
    (all heads at once and one head at a time) gives the same outputs."""
    attn = _eva(D, H, E, num_chunks=C, sink_tokens=G)
    _perturb(attn)
    q, k, v = (t.requires_grad_() for t in qkv(B, H, N, D))
    inputs = [q, k, v, *attn.parameters()]
    weight = torch.randn(B, H, N, D, dtype=torch.float64)
    fast, slow = attn(q, k, v), _reference(attn, q, k, v, False)
    assert_close("sinks autograd", slow, fast, 1e-10)
    for ref, out in zip(_grads(slow, inputs, weight), _grads(fast, inputs, weight), strict=True):
        assert_close("sinks gradient", ref, out, 1e-10)
    for elements in (1 << 21, 50):
        monkeypatch.setattr(eva_module, "INFERENCE_ELEMENTS", elements)
        with torch.no_grad():
            assert_close(f"sinks inference ({elements})", fast, attn(q, k, v), 1e-12)


def _per_row(mask: torch.Tensor, reference, q, k, v) -> torch.Tensor:
    """`reference` on each row's real tokens alone, zero at padded positions."""
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        real = mask[b].nonzero().flatten()
        out[b, :, real] = reference(q[b : b + 1, :, real], k[b : b + 1, :, real], v[b : b + 1, :, real])[0]
    return out


def _left_and_right_padding(B: int, N: int) -> torch.Tensor:
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, :5] = False
    mask[2, N - 7 :] = False
    return mask


@pytest.mark.parametrize(
    "causal,K", [(False, 2), (True, 1), (True, 2)], ids=["bidirectional", "causal-K1", "causal-K2"]
)
@pytest.mark.parametrize("G", [0, 1, 3])
def test_sinks_with_left_and_right_padding(causal, G, K):
    """Sinks are each row's first (bidirectional: and last) real tokens: padded rows equal their real tokens run
    alone, in the inference path and the autograd path (outputs and gradients); G = 0 is padding invariance alone."""
    B, N, H, D = 3, 26, 2, 6
    attn = _eva(D, H, 4, num_chunks=3, chunk=2, sink_tokens=G, local_windows=K)
    _perturb(attn)
    q, k, v = (t.requires_grad_() for t in qkv(B, H, N, D))
    mask = _left_and_right_padding(B, N)
    weight = torch.randn(B, H, N, D, dtype=torch.float64)
    slow = _per_row(mask, lambda *x: _reference(attn, *x, causal), q, k, v)
    fast = attn(q, k, v, padding_mask=mask, causal=causal)
    assert_close("padded", slow, fast, 1e-10)
    for ref, out in zip(_grads(slow, [q, k, v], weight), _grads(fast, [q, k, v], weight), strict=True):
        assert_close("padded gradient", ref, out, 1e-10)
    with torch.no_grad():
        assert_close("padded inference", slow, attn(q, k, v, padding_mask=mask, causal=causal), 1e-10)


@pytest.mark.parametrize(
    "causal,K,E", [(False, 2, 32), (True, 1, 32), (True, 2, 16)], ids=["bidirectional", "causal-K1", "causal-K2-E16"]
)
@pytest.mark.parametrize("G", [1, 4, 40])
def test_sinks_with_window_covering_sequence_are_softmax(causal, K, E, G):
    """Sinks inside the window (causal K = 2: the exact span of two windows) are counted once: with it covering the
    sequence EVA stays exact."""
    attn = _eva(8, 2, E, num_chunks=3, chunk=1, sink_tokens=G, local_windows=K).train()
    _perturb(attn)
    q, k, v = qkv(2, 2, 29, 8)
    expected = naive_softmax_attention(q, k, v, causal=causal)
    assert_close("autograd", expected, attn(q, k, v, causal=causal), 1e-12)
    with torch.no_grad():
        assert_close("inference", expected, attn(q, k, v, causal=causal), 1e-12)


def test_sinks_hyper_parameter():
    attn = build_attention("eva", num_heads=2, head_dim=8, sink_tokens=3)
    assert attn.sink_tokens == 3 and "sink_tokens=3" in repr(attn)
    assert build_attention("eva", num_heads=2, head_dim=8, sink_tokens=None).sink_tokens == 0
    for bad in (-1, 1.5):
        with pytest.raises(ValueError, match="sink_tokens"):
            build_attention("eva", num_heads=2, head_dim=8, sink_tokens=bad)


# (B, N, H, D, window_size, chunk_size, G): sinks inside the first window, spanning windows and chunks (partial and
# sink-only chunks, whose summaries get no weight), more sinks than tokens.
CAUSAL_SINKS = [
    pytest.param(2, 29, 2, 8, 8, 4, 2, id="B2-T29-E8-P4-G2"),
    pytest.param(1, 23, 3, 6, 6, 2, 7, id="B1-T23-E6-P2-G7"),
    pytest.param(2, 37, 2, 8, 4, 4, 5, id="B2-T37-E4-P4-G5"),
    pytest.param(1, 19, 1, 4, 3, 1, 11, id="B1-T19-E3-P1-G11"),
    pytest.param(1, 6, 1, 4, 2, 2, 9, id="B1-T6-E2-P2-G9"),
]


@pytest.mark.parametrize("B,N,H,D,E,P,G", CAUSAL_SINKS)
@LOCAL
def test_causal_sinks_match_naive_with_gradients(B, N, H, D, E, P, G, K):
    """Autograd path (outputs and gradients of q, k, v and both maps), the no-grad fast path and decoding over a
    cache (`Nq < N`, the direct path) equal the per-query reference."""
    attn = _eva(D, H, E, chunk=P, sink_tokens=G, local_windows=K)
    _perturb(attn)
    q, k, v = (t.requires_grad_() for t in qkv(B, H, N, D))
    inputs = [q, k, v, *attn.parameters()]
    weight = torch.randn(B, H, N, D, dtype=torch.float64)
    fast, slow = attn(q, k, v, causal=True), _reference(attn, q, k, v, True)
    assert_close("causal sinks autograd", slow, fast, 1e-10)
    for ref, out in zip(_grads(slow, inputs, weight), _grads(fast, inputs, weight), strict=True):
        assert_close("causal sinks gradient", ref, out, 1e-10)
    with torch.no_grad():
        assert_close("causal sinks fast path", slow, attn(q, k, v, causal=True), 1e-10)
        for nq in (1, 3, E + 1, N - 1):
            part = attn(q[:, :, -nq:], k, v, causal=True)
            assert_close(f"causal sinks Nq={nq}", slow[:, :, -nq:], part, 1e-10)


@pytest.mark.parametrize("block_size", [1, 9, 24], ids=["one-window", "two-windows", "three-windows"])
@pytest.mark.parametrize("grad", [True, False], ids=["blocked", "fast"])
@LOCAL12
def test_causal_sinks_any_block_size(block_size, grad, K):
    """Sinks across several query blocks (windows of 4, chunks of 2, G = 6): both block loops equal the reference."""
    attn = _eva(6, 2, 4, chunk=2, sink_tokens=6, local_windows=K)
    _perturb(attn)
    q, k, v = qkv(2, 2, 31, 6)
    maps = attn._map(attn.chunk_key_proj), attn._map(attn.proposal_proj), False
    with torch.set_grad_enabled(grad):
        q.requires_grad_(grad)
        out = causal_eva(q, k, v, 4, 2, *maps, scale=6**-0.5, block_size=block_size, sinks=6, local_windows=K)
    assert_close("blocks", _reference(attn, q, k, v, True), out, 1e-10)


@LOCAL12
def test_causal_sinks_overflow_falls_back_to_exact_shifts(K):
    """A low sink and summaries far above every exact logit: the shifted fp32 pass overflows, the fallback (with
    the sinks) equals the fp64 reference."""
    attn = _eva(4, 1, 4, chunk=2, sink_tokens=1, local_windows=K).float()
    q, k, v = qkv(1, 1, 12, 4)
    q[..., 0], k[..., 1:4, 0], k[..., 0, 0], k[..., 4:, 0] = 20.0, 20.0, -20.0, -20.0
    with torch.no_grad():
        out = attn(q.float(), k.float(), v.float(), causal=True)
        maps = (lambda x: x, lambda x: x, False)
        keys, betas = causal_summaries(k.float(), v.float(), 2, *maps, 0.5**0.5, 1)
        geo = eva_module._Causal(4, 2, 2, 0, 0.5, 1, K)
        sinks = (k[:, :, :1].float(), v[:, :, :1].float())
        shifted = eva_module._causal_fast(q.float(), k.float(), v.float(), keys, betas, geo, None, sinks)
    assert not torch.isfinite(shifted).all() and torch.isfinite(out).all()
    assert_close("overflow fallback", _reference(attn.double(), q, k, v, True), out.double(), 1e-4)


@pytest.mark.parametrize(
    "N,E,C,P",
    [(512, 64, 64, 8), (300, 64, 64, 8), (4096, 64, 64, 64), (5000, 64, 64, 128), (60, 16, 8, 8), (50, 12, 10, 6)],
)
def test_bidirectional_chunk_length(N, E, C, P):
    """`num_chunks` is honoured at every length: chunks of at least `N / C` tokens, a divisor of the window below it
    and a multiple above it, and never more than `C` chunks that hold a token."""
    assert chunk_length(N, E, C) == P
    assert -(-N // P) <= C
    assert E % P == 0 or P % E == 0
