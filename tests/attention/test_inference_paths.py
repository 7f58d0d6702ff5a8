"""The in-place paths taken without autograd (`torch.inference_mode`, `torch.no_grad`) against the naive twins.

The bidirectional linear paths compute in place, drop the query softmax normaliser and divide straight into a
preallocated output when no gradient is recorded; the autograd paths are tested elsewhere. Several token blocks
(`block_size`) and fully padded rows are exercised in fp64.
"""

from __future__ import annotations

import pytest
import torch

import hf_lara.attention.eva as eva_module
import hf_lara.attention.lara as lara_module
import hf_lara.attention.linear as linear_module
from hf_lara.attention import build_attention
from hf_lara.attention.eva import EVAAttention
from hf_lara.attention.lara import LinearRandomizedAttention
from hf_lara.attention.linear import bidirectional_linear_attention, causal_linear_attention
from hf_lara.attention.naive import naive_bidirectional_lara, naive_eva_attention, naive_feature_attention
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


# ---------------------------------------------------------------------------------------------------------------
# The per-head-group inference paths of bidirectional LARA and EVA (`_bidirectional_inference`,
# `bidirectional_eva_inference`): padding masks (packed groups of several lengths), lengths that no landmark or chunk
# count divides, one head per group and all heads in one group, the `(B, N, H, D)` output layout.
# ---------------------------------------------------------------------------------------------------------------


def _padding_mask(B: int, N: int) -> torch.Tensor:
    """Row 0 full, row 1 left-padded by 5, row 2 right-padded to 11 tokens (B = 3)."""
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, :5] = False
    mask[2, 11:] = False
    return mask


def _per_row(mask: torch.Tensor, q, k, v, reference) -> torch.Tensor:
    """`reference` on each row's real tokens, zero at padded queries (what the packed estimators return)."""
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        real = mask[b].nonzero().flatten()
        out[b, :, real] = reference(q[b : b + 1, :, real], k[b : b + 1, :, real], v[b : b + 1, :, real])[0]
    return out


def _spy(monkeypatch, module, name: str) -> list:
    calls = []
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return calls


@pytest.mark.parametrize("mis", ["opt", "bh"])
@pytest.mark.parametrize("elements", [1 << 21, 300], ids=["all-heads", "head-groups"])
@pytest.mark.parametrize("mode", ["inference", "no_grad"])
def test_lara_inference_path_with_padding(mis, elements, mode, monkeypatch):
    """N = 29 (row 1: 24, row 2: 11 real tokens) with C = 5 landmarks: uneven segments everywhere."""
    B, H, N, D, C = 3, 3, 29, 8, 5
    monkeypatch.setattr(lara_module, "GROUP_ELEMENTS", elements)  # 300: one head (opt) or two (bh) per group
    calls = _spy(monkeypatch, LinearRandomizedAttention, "_bidirectional_inference")
    attn = LinearRandomizedAttention(H, D, num_landmarks=C, mis=mis, alpha_coeff=0.7).double().eval()
    q, k, v = qkv(B, H, N, D, std=0.8, generator=torch.Generator().manual_seed(2))
    mask = _padding_mask(B, N)
    with torch.inference_mode() if mode == "inference" else torch.no_grad():
        out = attn(q, k, v, padding_mask=mask)
        full = attn(q, k, v)
    assert len(calls) == 4  # three packed groups, one unpadded call

    def reference(qb, kb, vb):
        return naive_bidirectional_lara(qb, kb, vb, D**-0.5, C, mis, 0.7)[2]

    assert_close("lara padded", _per_row(mask, q, k, v, reference), out, 1e-10)
    assert_close("lara unpadded", reference(q, k, v), full, 1e-10)
    assert full.transpose(1, 2).is_contiguous()  # written as (B, N, H, D)


def test_lara_inference_path_only_without_autograd_and_within_budget(monkeypatch):
    """Autograd, an explicit `block_size` or `N 2C` above the budget take the blocked path (same numbers)."""
    B, H, N, D, C = 1, 2, 40, 8, 4
    calls = _spy(monkeypatch, LinearRandomizedAttention, "_bidirectional_inference")
    attn = LinearRandomizedAttention(H, D, num_landmarks=C).double().eval()
    q, k, v = qkv(B, H, N, D, generator=torch.Generator().manual_seed(4))
    expected = naive_bidirectional_lara(q, k, v, D**-0.5, C, "opt", 1.0)[2]
    assert_close("autograd", expected, attn(q, k, v), 1e-10)
    with torch.no_grad():
        assert_close("block_size", expected, attn.bidirectional(q, k, v, D**-0.5, block_size=9), 1e-10)
        monkeypatch.setattr(lara_module, "INFERENCE_ELEMENTS", N * 2 * C - 1)
        assert_close("over budget", expected, attn(q, k, v), 1e-10)
    assert calls == []


def _eva_reference(attn: EVAAttention):
    def reference(qb, kb, vb):
        return naive_eva_attention(
            qb,
            kb,
            vb,
            causal=False,
            window_size=attn.window_size,
            num_chunks=attn.num_chunks,
            key_proj=attn.chunk_key_proj,
            proposal_proj=attn.proposal_proj,
        )

    return reference


# (N, window_size, num_chunks): P divides N (views), P does not (zero-padded copy), a partial last window, one
# window per chunk (empty excluded summaries), the window holding everything (softmax), chunks shorter than the
# window (4 in windows of 8; 6 in windows of 12 with a partial last window).
EVA_SHAPES = [(32, 4, 4), (29, 4, 3), (30, 4, 64), (23, 5, 2), (12, 16, 3), (29, 8, 8), (50, 12, 10)]


@pytest.mark.parametrize("N,E,C", EVA_SHAPES, ids=[f"T{n}-E{e}-C{c}" for n, e, c in EVA_SHAPES])
@pytest.mark.parametrize("elements", [1 << 21, 50], ids=["all-heads", "one-head"])
@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive", "fixed"])
def test_eva_inference_path_with_padding(N, E, C, elements, adaptive, monkeypatch):
    B, H, D = 3, 3, 8
    monkeypatch.setattr(eva_module, "INFERENCE_ELEMENTS", elements)
    calls = _spy(monkeypatch, eva_module, "bidirectional_eva_inference")
    attn = EVAAttention(H, D, window_size=E, num_chunks=C, chunk_size=1, adaptive=adaptive).double().eval()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(5)
        for p in attn.parameters():
            p.add_(0.2 * torch.randn(p.shape, dtype=p.dtype, generator=gen))
    q, k, v = qkv(B, H, N, D, generator=torch.Generator().manual_seed(6))
    mask = _padding_mask(B, N)
    with torch.inference_mode():
        out = attn(q, k, v, padding_mask=mask)
        full = attn(q, k, v)
    assert len(calls) == 4
    reference = _eva_reference(attn)
    assert_close("eva padded", _per_row(mask, q, k, v, reference), out, 1e-10)
    assert_close("eva unpadded", reference(q, k, v), full, 1e-10)
    assert full.transpose(1, 2).is_contiguous()  # written as (B, N, H, D)


def test_eva_inference_path_on_strided_inputs_and_autograd_path(monkeypatch):
    """Expanded (stride 0) and transposed inputs; with autograd the reference path runs (same numbers)."""
    H, N, D = 2, 26, 8
    calls = _spy(monkeypatch, eva_module, "bidirectional_eva_inference")
    attn = EVAAttention(H, D, window_size=4, num_chunks=3, chunk_size=1).double().eval()
    q, k, v = qkv(1, 1, N, D, generator=torch.Generator().manual_seed(7))
    q, k = q.expand(2, H, N, D), k.expand(2, H, N, D)
    v = torch.randn(2, N, H, D, dtype=torch.float64).transpose(1, 2)
    expected = _eva_reference(attn)(q, k, v)
    with torch.no_grad():
        assert_close("strided", expected, attn(q, k, v), 1e-10)
    assert len(calls) == 1
    assert_close("autograd", expected, attn(q, k, v), 1e-10)
    assert len(calls) == 1


# ---------------------------------------------------------------------------------------------------------------
# The no-grad causal path of `linear.py` (`_fast_block` with an output buffer): in-place exponentials on fresh map
# outputs, max-scaled query weights, the prefix cumulative sum by a loop, blocks divided straight into one output.
# ---------------------------------------------------------------------------------------------------------------


def _fresh(x: torch.Tensor) -> torch.Tensor:
    """A map that hands out a fresh copy (not a view), so the no-grad path works on it in place."""
    return x.clone()


@pytest.mark.parametrize("mode", ["inference", "no_grad"])
@pytest.mark.parametrize("maps", [True, False])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("T,C,block", [(37, 8, 16), (29, 4, 1000), (64, 16, 32)])
def test_causal_linear_attention_without_autograd(mode, maps, masked, T, C, block, monkeypatch):
    """Fresh map outputs (worked on in place) or given log-features (never modified), against the naive twin."""
    calls = _spy(monkeypatch, linear_module, "_fast_block")
    g = torch.Generator().manual_seed(3)
    lq, lk = (torch.randn(2, 2, T, 6, dtype=torch.float64, generator=g) * 3.0 for _ in range(2))
    v = torch.randn(2, 2, T, 5, dtype=torch.float64, generator=g)
    mask = None
    if masked:
        mask = torch.rand(2, T, generator=g) > 0.3
        mask[1, : T // 2] = False  # leading rows with no real key give 0
    expected = naive_feature_attention(lq, lk, v, mask, causal=True)
    lq_before, lk_before = lq.clone(), lk.clone()
    kwargs = {"q_map": _fresh, "k_map": _fresh, "feature_dim": 6} if maps else {}
    with torch.inference_mode() if mode == "inference" else torch.no_grad():
        out, state = causal_linear_attention(lq, lk, v, mask, chunk_size=C, block_size=block, **kwargs)
    assert_close("out", expected, out, 1e-10)
    assert torch.equal(lq, lq_before) and torch.equal(lk, lk_before)
    assert len(calls) == -(-T // block)
    # the final state continues the sequence as the autograd path's does
    _, reference_state = causal_linear_attention(lq, lk, v, mask, chunk_size=C, block_size=block)
    assert_close(
        "state",
        reference_state.kvz * reference_state.shift.exp()[..., None],
        state.kvz * state.shift.exp()[..., None],
        1e-10,
    )


@pytest.mark.parametrize("maps", [True, False])
def test_causal_without_autograd_falls_back_on_original_features(maps, monkeypatch):
    """A key 800 nats above all others, late in a chunk: the fast block fails after working in place on its
    features, and the exact block reruns on fresh ones (or on the untouched given log-features)."""
    calls = _spy(monkeypatch, linear_module, "_exact_block")
    g = torch.Generator().manual_seed(4)
    lq, lk = (torch.randn(1, 1, 40, 4, dtype=torch.float64, generator=g) for _ in range(2))
    v = torch.randn(1, 1, 40, 5, dtype=torch.float64, generator=g)
    lk[0, 0, 13] += 800.0
    kwargs = {"q_map": _fresh, "k_map": _fresh, "feature_dim": 4} if maps else {}
    with torch.no_grad():
        out, _ = causal_linear_attention(lq, lk, v, chunk_size=8, block_size=16, **kwargs)
    assert_close("out", naive_feature_attention(lq, lk, v, causal=True), out, 1e-10)
    assert len(calls) == 1


def test_causal_without_autograd_scanned_prefix(monkeypatch):
    """No range allowed for the rescaled cumulative sum: the prefix states come from `_prefix_sums`."""
    calls = _spy(monkeypatch, linear_module, "_scanned_prefix")
    monkeypatch.setattr(linear_module, "_SCAN_RANGE", {torch.float64: -1.0})
    g = torch.Generator().manual_seed(5)
    lq, lk = (torch.randn(1, 2, 50, 6, dtype=torch.float64, generator=g) * 3.0 for _ in range(2))
    v = torch.randn(1, 2, 50, 5, dtype=torch.float64, generator=g)
    with torch.inference_mode():
        out, _ = causal_linear_attention(lq, lk, v, chunk_size=6, block_size=12, q_map=_fresh, k_map=_fresh)
    assert_close("out", naive_feature_attention(lq, lk, v, causal=True), out, 1e-10)
    assert len(calls) >= 1


@pytest.mark.parametrize("method", ["rfa", "kernel", "lara"])
def test_causal_estimators_without_autograd_equal_naive_twin(method):
    """The estimators' own feature maps under `torch.inference_mode` against the naive twin on their log-features."""
    B, H, N, D = 2, 2, 45, 8
    q, k, v = qkv(B, H, N, D, generator=torch.Generator().manual_seed(6))
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, :7] = False
    attn = build_attention(method, num_heads=H, head_dim=D, chunk_size=8).double().eval()
    fm = attn.feature_maps(D**-0.5, torch.float64)
    expected = naive_feature_attention(fm.query(q), fm.key(k), v, mask, causal=True)
    with torch.inference_mode():
        out = attn(q, k, v, padding_mask=mask, causal=True)
    assert_close(method, expected[0], out[0], 1e-10)
    assert_close(method, expected[1, :, 7:], out[1, :, 7:], 1e-10)


# ---------------------------------------------------------------------------------------------------------------
# Per-call scratch memory of the no-grad paths (`Workspace`, maps writing into a buffer via `map_into`).
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["rfa", "kernel", "lara"])
@pytest.mark.parametrize("query", [True, False])
def test_maps_written_into_a_buffer_equal_fresh_maps(method, query):
    """`map_into` with a buffer gives the map's own numbers, in the buffer when the map can write into it."""
    B, H, N, D = 2, 3, 17, 8
    q = qkv(B, H, N, D, generator=torch.Generator().manual_seed(8))[0]
    attn = build_attention(method, num_heads=H, head_dim=D).double().eval()
    fm = attn.feature_maps(D**-0.5, torch.float64)
    fn = fm.query if query else fm.key
    buffer = torch.full((B, H, N, fm.num_features), float("nan"), dtype=torch.float64)
    with torch.no_grad():
        result, own = linear_module.map_into(fn, q, buffer)
    assert result is buffer and own
    assert_close(method, fn(q), result, 1e-12)


def test_workspace_views_are_aligned_and_fall_back_to_fresh_memory():
    ws = linear_module.Workspace(torch.empty(0), 100)
    a, b = ws.take(3, 5), ws.take(2, 2)
    assert a.data_ptr() == ws.buffer.data_ptr()
    assert b.data_ptr() - a.data_ptr() == 16 * a.element_size()  # 15 elements rounded up to 16
    c = ws.take(10, 10)  # more than is left: a fresh tensor
    assert c.untyped_storage().data_ptr() != ws.buffer.untyped_storage().data_ptr() and c.shape == (10, 10)
    ws.reset()
    assert ws.take(4).data_ptr() == a.data_ptr()


@pytest.mark.parametrize("method", ["rfa", "kernel", "lara"])
@pytest.mark.parametrize("masked", [False, True])
def test_causal_no_grad_blocks_stay_inside_their_workspace(method, masked, monkeypatch):
    """Every block temporary of the no-grad causal path is a view of the one per-call buffer (the sizing covers the
    maps, `[v, 1]`, chunk sums, prefixes, scores and products, also for a short last block with a partial chunk), and
    the result equals the naive twin."""
    B, H, N, D, C = 2, 2, 45, 8, 6
    monkeypatch.setattr(linear_module, "BLOCK_ELEMENTS", B * H * 24 * 12)  # 24-token blocks: a short last block
    fresh = []
    original = linear_module.Workspace.take

    def take(self, *shape):
        view = original(self, *shape)
        if view.untyped_storage().data_ptr() != self.buffer.untyped_storage().data_ptr():
            fresh.append(shape)
        return view

    monkeypatch.setattr(linear_module.Workspace, "take", take)
    q, k, v = qkv(B, H, N, D, generator=torch.Generator().manual_seed(9))
    mask = None
    if masked:
        mask = torch.ones(B, N, dtype=torch.bool)
        mask[1, :7] = False
    attn = build_attention(method, num_heads=H, head_dim=D, chunk_size=C).double().eval()
    fm = attn.feature_maps(D**-0.5, torch.float64)
    expected = naive_feature_attention(fm.query(q), fm.key(k), v, mask, causal=True)
    with torch.inference_mode():
        out = attn(q, k, v, padding_mask=mask, causal=True)
    assert fresh == []
    rows = slice(7, None) if masked else slice(None)
    assert_close(method, expected[1, :, rows], out[1, :, rows], 1e-10)
    assert_close(method, expected[0], out[0], 1e-10)
