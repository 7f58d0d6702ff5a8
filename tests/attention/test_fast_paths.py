"""The blocked fast paths of `linear.py` and the decoding-state API against the slow reference forms, in fp64.

Blocks and chunks are forced small so that several blocks, partial chunks (lengths that are not multiples of the
chunk size), the sequential-scan prefix and the exact fallback all run on short inputs.
"""

from __future__ import annotations

import pytest
import torch

import hf_lara.attention.linear as linear
from hf_lara.attention import build_attention
from hf_lara.attention.linear import LinearState, bidirectional_linear_attention, causal_linear_attention
from hf_lara.attention.naive import naive_feature_attention

from .utils import assert_close, qkv

# (T, chunk, block): T not a multiple of the chunk, blocks of several chunks, a block shorter than T
SHAPES = [(37, 8, 16), (50, 6, 12), (64, 16, 32), (29, 4, 1000)]
SHAPE_IDS = [f"T{t}-C{c}-blk{b}" for t, c, b in SHAPES]


def _log_features(B, H, T, S, D=5, spread=3.0):
    lq = torch.randn(B, H, T, S, dtype=torch.float64) * spread
    lk = torch.randn(B, H, T, S, dtype=torch.float64) * spread
    return lq, lk, torch.randn(B, H, T, D, dtype=torch.float64)


class PathCounter:
    """Counts calls of the internal paths of `linear.py` (to check that a test exercises what it claims)."""

    def __init__(self, monkeypatch):
        self.counts = {"fast": 0, "exact": 0, "scanned": 0}
        for name, attr in (("fast", "_fast_block"), ("exact", "_exact_block"), ("scanned", "_scanned_prefix")):
            monkeypatch.setattr(linear, attr, self._wrap(name, getattr(linear, attr)))

    def _wrap(self, name, fn):
        def wrapped(*args, **kwargs):
            self.counts[name] += 1
            return fn(*args, **kwargs)

        return wrapped


@pytest.mark.parametrize("T,C,block", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_blocked_causal_equals_quadratic_with_grads(T, C, block, masked, monkeypatch):
    paths = PathCounter(monkeypatch)
    lq, lk, v = (t.requires_grad_() for t in _log_features(2, 2, T, 6))
    mask = torch.rand(2, T) > 0.3 if masked else None
    ref = naive_feature_attention(lq, lk, v, mask, causal=True)
    out, _ = causal_linear_attention(lq, lk, v, mask, chunk_size=C, block_size=block)
    assert_close("out", ref, out, 1e-10)
    grad = torch.randn_like(ref)
    for name, r, o in zip(
        ("dlq", "dlk", "dv"), torch.autograd.grad(ref, (lq, lk, v), grad), torch.autograd.grad(out, (lq, lk, v), grad)
    ):
        assert_close(name, r, o, 1e-9)
    assert paths.counts["fast"] >= -(-T // block) and paths.counts["exact"] == 0


@pytest.mark.parametrize("T,C,block", SHAPES, ids=SHAPE_IDS)
def test_sequential_scan_prefix_equals_quadratic(T, C, block, monkeypatch):
    """With no range allowed for the rescaled cumulative sum, the prefix states come from the sequential scan."""
    paths = PathCounter(monkeypatch)
    monkeypatch.setattr(linear, "_SCAN_RANGE", {torch.float64: -1.0})
    lq, lk, v = _log_features(1, 2, T, 6)
    out, _ = causal_linear_attention(lq, lk, v, chunk_size=C, block_size=block)
    assert_close("out", naive_feature_attention(lq, lk, v, causal=True), out, 1e-10)
    assert paths.counts["scanned"] >= 1


def test_late_huge_key_falls_back_to_exact_block(monkeypatch):
    """A key 800 nats above every other, late in a chunk: the earlier rows underflow on the fast path (fp64) and
    their block reruns exactly; the other blocks stay fast."""
    paths = PathCounter(monkeypatch)
    lq, lk, v = _log_features(1, 1, 40, 4, spread=1.0)
    lk[0, 0, 13] += 800.0
    out, _ = causal_linear_attention(lq, lk, v, chunk_size=8, block_size=16)
    assert_close("out", naive_feature_attention(lq, lk, v, causal=True), out, 1e-10)
    assert paths.counts["exact"] == 1 and paths.counts["fast"] == 3


def _sequential_prefix(terms: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """The definition of `_prefix_sums`, one term at a time: `x_c = exp(shifts_{c-1} - shifts_c) x_{c-1} + terms_c`."""
    x, out = torch.zeros_like(terms[:, :, 0]), []
    for c in range(terms.shape[2]):
        x = x * torch.exp(shifts[:, :, max(c - 1, 0)] - shifts[:, :, c])[..., None] + terms[:, :, c]
        out.append(x)
    return torch.stack(out, dim=2)


@pytest.mark.parametrize("n", [1, 31, 32, 33, 1100])
@pytest.mark.parametrize("step", [1.0, 1000.0], ids=["small", "huge"])
def test_prefix_sums_equal_sequential_recurrence(n, step):
    """One triangular product (n <= 32) and the grouped recursion (n > 32), against the sequential scan, with
    shifts at the floor first (no key yet), flat stretches and jumps far beyond fp64's exponent range."""
    g = torch.Generator().manual_seed(42)
    terms = torch.rand(2, 3, n, 4, 5, dtype=torch.float64, generator=g)
    jumps = torch.rand(2, 3, n, 4, dtype=torch.float64, generator=g) * step
    shifts = jumps.masked_fill(torch.rand(jumps.shape, generator=g) < 0.5, 0.0).cumsum(dim=2)
    floor = min(n // 3, 5)
    terms[:, :, :floor], shifts[:, :, :floor] = 0.0, linear._LOG_FLOOR
    assert_close("prefix", _sequential_prefix(terms, shifts), linear._prefix_sums(terms, shifts), 1e-14)


@pytest.mark.parametrize("chunks", [1, 31, 32, 33, 1100])
@pytest.mark.parametrize("path", ["scanned", "exact"])
def test_loop_free_prefix_paths_equal_quadratic(chunks, path, monkeypatch):
    """Huge logits: feature 0 of the keys jumps by 1000 nats after 3 earlier keys (absorbed into the state) and
    grows by 2 nats a token, so the running max spans more than `_SCAN_RANGE` and the fast path takes
    `_scanned_prefix`. Traced, every block takes `_exact_block`, here with a key 800 nats above all the others late
    in a chunk. One block holds all the chunks (1 to 1100)."""
    paths = PathCounter(monkeypatch)
    if path == "exact":
        monkeypatch.setattr(linear, "is_tracing", lambda: True)
    C, prefix = 2, 3
    T = max(C * chunks - 1, 2)
    lq, lk, v = (t.requires_grad_(chunks <= 33) for t in _log_features(1, 1, prefix + T, 3, spread=1.0))
    boost = torch.zeros(prefix + T, 3, dtype=torch.float64)
    boost[prefix:, 0] = 1000.0 + 2.0 * torch.arange(T)
    if path == "exact":
        boost[prefix + (T // 2 | 1)] += 800.0  # second in its chunk
    lk_big, lq_q = lk + boost, lq[:, :, prefix:]
    ref = naive_feature_attention(lq_q, lk_big, v, causal=True)
    out, _ = causal_linear_attention(lq_q, lk_big, v, chunk_size=C, block_size=T + C)
    assert_close("out", ref, out, 1e-10)
    if chunks <= 33:
        grad = torch.randn_like(ref)
        for name, r, o in zip(("dlq", "dlk", "dv"), *(torch.autograd.grad(x, (lq, lk, v), grad) for x in (ref, out))):
            assert_close(name, r, o, 1e-9)
    expected = {"fast": 1, "scanned": 1, "exact": 0} if path == "scanned" else {"fast": 0, "scanned": 0, "exact": 1}
    assert paths.counts == expected


@pytest.mark.parametrize("T,C,block", SHAPES, ids=SHAPE_IDS)
def test_blocked_bidirectional_equals_quadratic(T, C, block):
    lq, lk, v = (t.requires_grad_() for t in _log_features(2, 2, T, 6))
    mask = torch.rand(2, T) > 0.3
    ref = naive_feature_attention(lq, lk, v, mask)
    out = bidirectional_linear_attention(lq, lk, v, mask, block_size=block)
    assert_close("out", ref, out, 1e-10)
    grad = torch.randn_like(ref)
    for name, r, o in zip(
        ("dlq", "dlk", "dv"), torch.autograd.grad(ref, (lq, lk, v), grad), torch.autograd.grad(out, (lq, lk, v), grad)
    ):
        assert_close(name, r, o, 1e-9)


@pytest.mark.parametrize("split", [1, 7, 16, 33, 49])
def test_split_and_resume_across_blocks(split):
    """prefix -> state -> rest equals one pass, with blocks and chunks that straddle the split."""
    lq, lk, v = _log_features(2, 2, 50, 6)
    full, final = causal_linear_attention(lq, lk, v, chunk_size=6, block_size=12)
    first, state = causal_linear_attention(lq[:, :, :split], lk[:, :, :split], v[:, :, :split], None, 6, block_size=12)
    rest, resumed = causal_linear_attention(
        lq[:, :, split:], lk[:, :, split:], v[:, :, split:], None, 6, state=state, block_size=12
    )
    assert_close("out", full, torch.cat([first, rest], dim=2), 1e-12)
    assert_close("kvz", final.kvz * final.shift.exp()[..., None], resumed.kvz * resumed.shift.exp()[..., None], 1e-12)


def test_single_token_steps_equal_full_pass():
    """The dedicated one-token update (`LinearState.step`) equals the chunked pass, padding included."""
    lq, lk, v = _log_features(2, 2, 23, 5)
    mask = torch.ones(2, 23, dtype=torch.bool)
    mask[1, :6] = False
    full, _ = causal_linear_attention(lq, lk, v, mask, chunk_size=4)
    state, steps = None, []
    for t in range(23):
        out, state = causal_linear_attention(
            lq[:, :, t : t + 1], lk[:, :, t : t + 1], v[:, :, t : t + 1], mask[:, t : t + 1], state=state
        )
        steps.append(out)
    steps = torch.cat(steps, dim=2)
    assert_close("row 0", full[0], steps[0], 1e-12)
    assert_close("row 1 real", full[1, :, 6:], steps[1, :, 6:], 1e-12)
    assert torch.equal(steps[1, :, :6], torch.zeros_like(steps[1, :, :6]))


def test_maps_equal_precomputed_features():
    """Block-wise maps give the same result as features computed whole."""
    x = torch.randn(1, 2, 45, 5, dtype=torch.float64)
    w = torch.randn(2, 5, 7, dtype=torch.float64)
    lx = x @ w
    v = torch.randn(1, 2, 45, 5, dtype=torch.float64)
    kwargs = {"q_map": lambda t: t @ w, "k_map": lambda t: t @ w, "feature_dim": 7, "block_size": 8}
    assert_close(
        "causal",
        causal_linear_attention(lx, lx, v, chunk_size=4)[0],
        causal_linear_attention(x, x, v, chunk_size=4, **kwargs)[0],
        1e-12,
    )
    assert_close(
        "bidirectional",
        bidirectional_linear_attention(lx, lx, v),
        bidirectional_linear_attention(x, x, v, **kwargs),
        1e-12,
    )


# ---------------------------------------------------------------------------------------------------------------
# Decoding-state API of the recurrent estimators
# ---------------------------------------------------------------------------------------------------------------

H, D = 2, 8
RECURRENT = {
    "rfa": {"num_features": 16, "chunk_size": 8},
    "kernel-hedgehog": {"feature_map": "hedgehog", "num_features": 8, "chunk_size": 8},
    "kernel-t2r": {"feature_map": "t2r", "num_features": 8, "chunk_size": 8},
    "lara-opt": {"num_landmarks": 6, "chunk_size": 8},
    "lara-bh": {"num_landmarks": 6, "mis": "bh", "chunk_size": 8},
}


def _recurrent(name: str):
    attn = build_attention(name.split("-")[0], num_heads=H, head_dim=D, **RECURRENT[name]).double().eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return attn


def test_only_recurrent_methods_have_state():
    flags = {
        m: build_attention(m, num_heads=H, head_dim=D).supports_recurrent_state
        for m in ("rfa", "kernel", "lara", "eva")
    }
    assert all(flags.values())
    for method in ("softmax", "ra"):
        assert not build_attention(method, num_heads=H, head_dim=D).supports_recurrent_state


@pytest.mark.parametrize("name", list(RECURRENT))
@pytest.mark.parametrize("prompt", [1, 13, 24])
def test_prefill_then_steps_equal_full_forward(name, prompt):
    attn = _recurrent(name)
    q, k, v = qkv(2, H, 31, D)
    with torch.no_grad():
        full = attn(q, k, v, causal=True)
        out, state = attn.prefill(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt])
        outs, sizes = [out], {state.nbytes()}
        for t in range(prompt, 31):
            out, state = attn.step(q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], state)
            outs.append(out)
            sizes.add(state.nbytes())
    assert_close("decode", full, torch.cat(outs, dim=2), 1e-10)
    S = attn.feature_maps(D**-0.5, torch.float64).num_features
    assert sizes == {2 * H * (S * (D + 1) + S) * 8}  # constant: S x (D + 1) + S per (batch, head)


@pytest.mark.parametrize("name", list(RECURRENT))
def test_multi_token_steps_with_left_padding(name):
    """Left-padded prompt, then chunks of 1, 5 and 9 new tokens: real rows equal the full forward."""
    attn = _recurrent(name)
    total, prompt = 30, 15
    q, k, v = qkv(2, H, total, D)
    mask = torch.ones(2, total, dtype=torch.bool)
    mask[0, :4] = False
    with torch.no_grad():
        full = attn(q, k, v, padding_mask=mask, causal=True)
        out, state = attn.prefill(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], padding_mask=mask[:, :prompt])
        outs, start = [out], prompt
        for n in (1, 5, 9):
            sl = slice(start, start + n)
            out, state = attn.step(q[:, :, sl], k[:, :, sl], v[:, :, sl], state, padding_mask=mask[:, sl])
            outs.append(out)
            start += n
    outs = torch.cat(outs, dim=2)
    assert_close("row 0 real", full[0, :, 4:], outs[0, :, 4:], 1e-10)
    assert_close("row 1", full[1], outs[1], 1e-10)


def test_step_leaves_the_input_state_alone_and_reorders():
    attn = _recurrent("rfa")
    q, k, v = qkv(3, H, 10, D)
    with torch.no_grad():
        _, state = attn.prefill(q, k, v)
        kvz, shift = state.kvz.clone(), state.shift.clone()
        attn.step(q[:, :, -1:], k[:, :, -1:], v[:, :, -1:], state)
        assert torch.equal(state.kvz, kvz) and torch.equal(state.shift, shift)
        picked = state.index_select(torch.tensor([2, 0]))
        out, _ = attn.step(q[[2, 0], :, -1:], k[[2, 0], :, -1:], v[[2, 0], :, -1:], picked)
        ref, _ = attn.step(q[:, :, -1:], k[:, :, -1:], v[:, :, -1:], state)
    assert_close("reordered", ref[[2, 0]], out, 1e-12)


def test_fp32_state_and_dtype():
    attn = build_attention("rfa", num_heads=H, head_dim=D, num_features=16).eval()
    q, k, v = (t.to(torch.bfloat16) for t in qkv(1, H, 12, D))
    out, state = attn.prefill(q, k, v)
    assert out.dtype == torch.bfloat16 and state.kvz.dtype == torch.float32 and isinstance(state, LinearState)


def test_step_rejects_cache_shaped_inputs():
    attn = _recurrent("rfa")
    q, k, v = qkv(1, H, 6, D)
    with pytest.raises(ValueError, match="new tokens only"):
        attn.step(q[:, :, -1:], k, v, None)
