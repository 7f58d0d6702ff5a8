"""The window hybrid (`attention/window.py`): exact local softmax + estimator under one normaliser, for `rfa`,
`kernel` and `lara`, against the quadratic twin `naive_windowed_feature_attention` and exact softmax."""

from __future__ import annotations

import math

import pytest
import torch

from hf_lara.attention import build_attention
from hf_lara.attention.linear import LinearState
from hf_lara.attention.naive import naive_softmax_attention, naive_windowed_feature_attention, window_mask
from hf_lara.attention.random_features import positive_random_log_features
from hf_lara.attention.window import WindowMaps, WindowState, windowed_attention

from .utils import assert_close, build_small, qkv

H, D = 2, 8
METHODS = ["rfa", "kernel", "lara"]
MODES = [pytest.param(False, id="bidirectional"), pytest.param(True, id="causal")]


def _mask(B: int, N: int) -> torch.Tensor:
    """Row 0 left-padded by 13, row 1 right-padded by 21, row 2 full."""
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[0, :13] = False
    mask[1, N - 21 :] = False
    return mask


def _complete_features(attn, q, k, scale, causal):
    """Complete log-features `(lq, lk)` for the naive twin, from each method's definition."""
    if attn.method == "rfa":
        # independent of the module's code: log xi(x, w) for the stored features, -log S on the query side
        omega = attn.projection.to(q.dtype)
        lq = positive_random_log_features(q * scale**0.5, omega) - math.log(attn.num_features)
        return lq, positive_random_log_features(k * scale**0.5, omega)
    if attn.method == "kernel":
        lk = attn.feature_map(k * scale**0.5)
        return attn.feature_map(q * scale**0.5) + attn.window_log_factor.to(q.dtype)[:, None, None], lk
    maps = attn.window_maps(scale, q.dtype) if causal else attn.bidirectional_window_maps(q, k, scale)
    return maps.query(q), maps.key(k)


def _perturb(attn):
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return attn


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("causal", MODES)
@pytest.mark.parametrize("window, sinks", [(1, 0), (5, 0), (16, 0), (23, 0), (1, 2), (5, 1), (23, 3)])
def test_matches_naive_twin_outputs_and_gradients(method, causal, window, sinks):
    """fp64, several 16-token blocks (near and far), window shorter and longer than a block: outputs and
    gradients of q, k, v and of every parameter equal the quadratic twin's."""
    attn = _perturb(build_small(method, H, D, window_size=window, sink_tokens=sinks).double().eval())
    q, k, v = (t.requires_grad_() for t in qkv(2, H, 83, D))
    scale = 0.4
    out = attn(q, k, v, causal=causal, scale=scale)
    ref = naive_windowed_feature_attention(
        q, k, v, *_complete_features(attn, q, k, scale, causal), window, causal=causal, scale=scale, sinks=sinks
    )
    assert_close("out", ref, out, 1e-12)
    grad = torch.randn_like(out)
    inputs = [q, k, v, *attn.parameters()]
    got = torch.autograd.grad(out, inputs, grad, allow_unused=True)
    want = torch.autograd.grad(ref, inputs, grad, allow_unused=True)
    for name, a, b in zip(["q", "k", "v", *(n for n, _ in attn.named_parameters())], want, got, strict=True):
        if a is None:
            assert b is None or b.abs().max() == 0, name
        else:
            assert_close(f"grad {name}", a, b, 1e-10)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("causal", MODES)
@pytest.mark.parametrize("sinks", [0, 2])
def test_inference_path_matches_naive_twin(method, causal, sinks):
    """Without autograd the blocked path fills its logit buffers in place: still the quadratic twin's output."""
    attn = _perturb(build_small(method, H, D, window_size=5, sink_tokens=sinks).double().eval())
    q, k, v = qkv(3, H, 71, D)
    mask = _mask(3, 71)
    with torch.no_grad():
        out = attn(q, k, v, padding_mask=mask, causal=causal)
    for row in range(3):
        real = mask[row]
        qr, kr, vr = (t[row : row + 1, :, real] for t in (q, k, v))
        lq, lk = _complete_features(attn, qr, kr, D**-0.5, causal)
        ref = naive_windowed_feature_attention(qr, kr, vr, lq, lk, 5, causal=causal, sinks=sinks)
        assert_close(f"row {row}", ref[0], out[row][:, real], 1e-12)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("causal", MODES)
@pytest.mark.parametrize("sinks", [0, 2])
def test_matches_naive_twin_with_padding(method, causal, sinks):
    """Left- and right-padded rows: the bidirectional window and the sinks stay inside the real tokens."""
    attn = _perturb(build_small(method, H, D, window_size=6, sink_tokens=sinks).double().eval())
    q, k, v = qkv(3, H, 71, D)
    mask = _mask(3, 71)
    out = attn(q, k, v, padding_mask=mask, causal=causal)
    for row in range(3):
        real = mask[row]
        qr, kr, vr = (t[row : row + 1, :, real] for t in (q, k, v))
        scale = D**-0.5
        ref = naive_windowed_feature_attention(
            qr, kr, vr, *_complete_features(attn, qr, kr, scale, causal), 6, causal=causal, sinks=sinks
        )
        assert_close(f"row {row}", ref[0], out[row][:, real], 1e-12)


@pytest.mark.parametrize("causal", MODES)
@pytest.mark.parametrize("window, block_size", [(23, 1), (23, 5), (23, 8), (23, 11), (23, 12), (6, 4), (5, 16)])
@pytest.mark.parametrize("sinks", [0, 2])
def test_any_block_size_matches_naive_twin(causal, window, block_size, sinks):
    """Blocks shorter than the window (spans of several blocks each side, narrow and edge-clamped spans), N = 71
    not a multiple of the block, left- and right-padded rows, sinks: the quadratic twin's outputs, with and without
    autograd, and its gradients."""
    attn = _perturb(build_small("rfa", H, D, window_size=window, sink_tokens=sinks).double().eval())
    q, k, v = (t.requires_grad_() for t in qkv(3, H, 71, D))
    mask = _mask(3, 71)
    maps = attn.window_maps(D**-0.5, q.dtype)

    def run():
        return windowed_attention(q, k, v, mask, causal, D**-0.5, window, maps, block_size=block_size, sinks=sinks)

    out = run()
    with torch.no_grad():
        fast = run()
    grad = torch.randn_like(out) * mask[:, None, :, None]
    got = torch.autograd.grad(out, [q, k, v], grad)
    refs = []
    for row in range(3):
        real = mask[row]
        qr, kr, vr = (t[row : row + 1, :, real] for t in (q, k, v))
        lq, lk = _complete_features(attn, qr, kr, D**-0.5, causal)
        refs.append(naive_windowed_feature_attention(qr, kr, vr, lq, lk, window, causal=causal, sinks=sinks))
        assert_close(f"row {row}", refs[-1][0], out[row][:, real], 1e-12)
        assert_close(f"row {row} no autograd", refs[-1][0], fast[row][:, real], 1e-12)
    ref_loss = sum((r[0] * grad[row][:, mask[row]]).sum() for row, r in enumerate(refs))
    want = torch.autograd.grad(ref_loss, [q, k, v])
    for name, a, b in zip("qkv", want, got, strict=True):
        assert_close(f"grad {name}", a, b, 1e-10)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("causal", MODES)
def test_exact_when_the_window_covers_the_sequence(method, causal):
    """W >= N: every key is in the window, so the hybrid is softmax attention (also with padding)."""
    q, k, v = qkv(3, H, 45, D)
    mask = _mask(3, 45)
    for window, sinks in ((45, 0), (64, 2), (200, 0)):
        attn = _perturb(build_small(method, H, D, window_size=window, sink_tokens=sinks).double().eval())
        out = attn(q, k, v, padding_mask=mask, causal=causal)
        ref = naive_softmax_attention(q, k, v, key_mask=mask, causal=causal)
        assert_close(f"W={window}", ref * mask[:, None, :, None], out * mask[:, None, :, None], 1e-12)


def test_window_masks_are_the_documented_tables():
    causal = window_mask(None, 4, 4, True, 2, torch.device("cpu"))[0, 0].int()
    assert causal.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    bidir = window_mask(None, 5, 5, False, 3, torch.device("cpu"))[0, 0].int()
    assert bidir.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [0, 0, 1, 1, 1]]


def test_rfa_window_shares_the_softmax_scale():
    """The random-feature part is on the scale of exp(s q.k): among kernel parts multiplied by 1/2, 1 and 2, the
    hybrid's error to softmax is smallest at 1 (with 2048 features the Monte-Carlo noise is well below the gap)."""
    torch.manual_seed(0)
    q, k, v = qkv(2, H, 60, 16, std=0.6)
    ref = naive_softmax_attention(q, k, v)
    torch.manual_seed(1)
    attn = build_attention("rfa", num_heads=H, head_dim=16, num_features=2048, window_size=8).double().eval()
    maps = attn.window_maps(0.25, torch.float64)
    errors = {}
    for factor in (0.5, 1.0, 2.0):
        shifted = WindowMaps(lambda x, f=factor: maps.query(x) + math.log(f), maps.key, maps.num_features)
        out = windowed_attention(q, k, v, None, False, 0.25, 8, shifted)
        errors[factor] = ((out - ref).norm() / ref.norm()).item()
    print(f"rfa window hybrid relative error vs softmax, kernel part x0.5/x1/x2: {errors}")
    assert errors[1.0] < 0.9 * min(errors[0.5], errors[2.0]), errors


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sinks, prompt", [(0, 30), (2, 30), (3, 2)], ids=["no-sink", "sinks", "sinks-after-prompt"])
def test_decoding_equals_the_full_causal_forward(method, sinks, prompt):
    """prefill + steps of 1..20 tokens (some longer than W) on a left-padded batch equal the full forward, sinks
    included (also when they arrive after the prompt); the state stays constant in size and the caller's state is
    never modified."""
    window = 5
    attn = _perturb(build_small(method, H, D, window_size=window, sink_tokens=sinks).double().eval())
    q, k, v = qkv(2, H, 80, D)
    mask = torch.ones(2, 80, dtype=torch.bool)
    mask[0, :9] = False
    full = attn(q, k, v, padding_mask=mask, causal=True)
    out, state = attn.prefill(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt], padding_mask=mask[:, :prompt])
    outs, t, sizes = [out], prompt, set()
    for n in (1, 1, 3, 20, 1, 7, 1, 1, 15):
        before = state.clone()
        o, new = attn.step(
            q[:, :, t : t + n], k[:, :, t : t + n], v[:, :, t : t + n], state, padding_mask=mask[:, t : t + n]
        )
        assert all(torch.equal(a, b) for a, b in zip(before._tensors(), state._tensors()))
        outs.append(o)
        state, t = new, t + n
        if state.keys.shape[2] == window - 1:  # the buffer is full: the size may not change any more
            sizes.add(state.nbytes())
    assert isinstance(state, WindowState) and state.keys.shape[2] == window - 1
    assert state.sink_count.tolist() == [sinks, sinks]
    assert len(sizes) == 1
    assert_close("decode", full[:, :, :t], torch.cat(outs, dim=2), 1e-12)


def _naive_causal(attn, q, k, v, mask, window, sinks):
    """The quadratic twin of the causal window hybrid on a left-padded batch, `(B, H, N, D)`, padded queries 0."""
    out = torch.zeros_like(q)
    for row in range(q.shape[0]):
        real = mask[row]
        qr, kr, vr = (t[row : row + 1, :, real] for t in (q, k, v))
        lq, lk = _complete_features(attn, qr, kr, D**-0.5, True)
        out[row][:, real] = naive_windowed_feature_attention(qr, kr, vr, lq, lk, window, causal=True, sinks=sinks)[0]
    return out


def _decode(attn, q, k, v, mask, state, t, sizes):
    """Steps of `sizes` tokens from position `t`; the outputs, the final state and the states along the way."""
    outs, states = [], [state]
    for n in sizes:
        before = state.clone()
        out, state = attn.step(
            q[:, :, t : t + n], k[:, :, t : t + n], v[:, :, t : t + n], state, padding_mask=mask[:, t : t + n]
        )
        assert all(torch.equal(a, b) for a, b in zip(before._tensors(), states[-1]._tensors())), "input modified"
        outs.append(out)
        states.append(state)
        t += n
    return outs, state, states


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sinks", [0, 2])
def test_inference_decoding_appends_in_place_and_matches_the_naive_twin(method, sinks):
    """No autograd (as in `generate`): successive one-token steps append to one shared buffer in place, its rows
    wrap around (copied into a new buffer) several times, and prompt + steps equal the quadratic twin on a
    left-padded batch (padding still in the window after the prompt); size constant, no input state modified."""
    window = 5
    attn = _perturb(build_small(method, H, D, window_size=window, sink_tokens=sinks).double().eval())
    q, k, v = qkv(2, H, 60, D)
    mask = torch.ones(2, 60, dtype=torch.bool)
    mask[0, :9] = False
    with torch.no_grad():
        out, state = attn.prefill(q[:, :, :8], k[:, :, :8], v[:, :, :8], padding_mask=mask[:, :8])
        sizes = [1] * 12 + [3, 2] + [1] * 20 + [7] + [1] * 8
        outs, state, states = _decode(attn, q, k, v, mask, state, 8, sizes)
        ref = _naive_causal(attn, q, k, v, mask, window, sinks)
    assert_close("decode", ref[:, :, : 8 + sum(sizes)], torch.cat([out, *outs], dim=2), 1e-12)
    shared = sum(a.tail is b.tail for a, b in zip(states[1:], states[2:]))
    assert shared >= len(sizes) - 2 * 6, shared  # in place but for one copy per W + 1 steps and the longer steps
    full = [s.nbytes() for s in states[1:] if s.keys.shape[2] == window - 1]
    assert len(set(full)) == 1 and full[0] == states[-1].nbytes()
    assert state.tail.capacity == 2 * window and state.sink_count.tolist() == [sinks, sinks]


@pytest.mark.parametrize("method", ["rfa", "lara"])
def test_two_steps_from_one_state_do_not_see_each_other(method):
    """Branching (beam candidates, speculative tries): two different next tokens from one state, each then
    decoded further, equal their own quadratic twins; the first branch's buffer is not overwritten by the second."""
    window, sinks = 4, 1
    attn = _perturb(build_small(method, H, D, window_size=window, sink_tokens=sinks).double().eval())
    q, k, v = qkv(1, H, 30, D)
    mask = torch.ones(1, 30, dtype=torch.bool)
    other = tuple(t.clone() for t in (q, k, v))
    for t in other:
        t[:, :, 20:] = torch.randn_like(t[:, :, 20:])
    with torch.no_grad():
        _, state = attn.prefill(q[:, :, :20], k[:, :, :20], v[:, :, :20])
        outs_a, state_a, _ = _decode(attn, q, k, v, mask, state, 20, [1])
        outs_b, state_b, _ = _decode(attn, *other, mask, state, 20, [1] * 10)
        more_a, _, _ = _decode(attn, q, k, v, mask, state_a, 21, [1] * 9)
        for (qq, kk, vv), outs in (((q, k, v), outs_a + more_a), (other, outs_b)):
            ref = _naive_causal(attn, qq, kk, vv, mask, window, sinks)
            assert_close("branch", ref[:, :, 20:], torch.cat(outs, dim=2), 1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_reordered_and_moved_states_keep_decoding(method):
    """Mid-decoding (the window at an offset inside its buffer): `index_select` for beams (rows swapped and one
    repeated) and `to(dtype)` give states that decode on as the quadratic twin of the reordered batch; `to` with
    nothing to change returns the state itself, so decoding keeps appending in place."""
    window, sinks = 5, 2
    attn = _perturb(build_small(method, H, D, window_size=window, sink_tokens=sinks).double().eval())
    q, k, v = qkv(2, H, 40, D)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, :3] = False
    with torch.no_grad():
        _, state = attn.prefill(q[:, :, :12], k[:, :, :12], v[:, :, :12], padding_mask=mask[:, :12])
        _, state, _ = _decode(attn, q, k, v, mask, state, 12, [1] * 7)
        assert state.start > 0 and state.to(torch.float64) is state and state.to("cpu") is state
        index = torch.tensor([1, 0, 1])
        picked = state.index_select(index)
        assert picked.batch_size == 3 and picked.start == 0 and torch.equal(picked.keys[0], state.keys[1])
        qr, kr, vr, mr = (t[index] for t in (q, k, v, mask))
        outs, _, _ = _decode(attn, qr, kr, vr, mr, picked, 19, [1] * 8 + [3])
        ref = _naive_causal(attn, qr, kr, vr, mr, window, sinks)
        assert_close("reordered", ref[:, :, 19:30], torch.cat(outs, dim=2), 1e-12)
        single = state.to(torch.float32)
        assert single.keys.dtype == torch.float32 and single.mask.dtype == torch.bool and single.sinks_full
        out32, _ = attn.float().step(q[:, :, 19:20].float(), k[:, :, 19:20].float(), v[:, :, 19:20].float(), single)
        assert_close("fp32", ref[[1, 0], :, 19:20].float(), out32, 1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_state_interface_for_the_cache(method):
    """index_select (beams), to(device/dtype) and the type check on a state from another estimator."""
    attn = build_small(method, H, D, window_size=3).double().eval()
    q, k, v = qkv(3, H, 10, D)
    _, state = attn.prefill(q, k, v)
    picked = state.index_select(torch.tensor([2, 0]))
    assert picked.keys.shape[0] == 2 and torch.equal(picked.values[0], state.values[2])
    assert state.batch_size == 3 and state.device == q.device
    moved = state.to("cpu")
    assert moved.mask.dtype == torch.bool and moved.nbytes() == state.nbytes()
    assert state.to(torch.float32).keys.dtype == torch.float32 and state.to(torch.float32).mask.dtype == torch.bool
    plain = build_small(method, H, D).double().eval()
    _, linear_state = plain.prefill(q, k, v)
    assert isinstance(linear_state.to("cpu"), LinearState) and linear_state.batch_size == 3
    with pytest.raises(TypeError, match="WindowState"):
        attn.step(q[:, :, :1], k[:, :, :1], v[:, :, :1], linear_state)
    with pytest.raises(TypeError, match="LinearState"):
        plain.step(q[:, :, :1], k[:, :, :1], v[:, :, :1], state)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", MODES)
def test_low_precision_large_norms_stay_finite_and_convex(dtype, causal):
    """Norms x30 in fp16/bf16 on several blocks: finite, and inside the range of the values."""
    for method in METHODS:
        attn = build_small(method, H, 16, window_size=7).eval()
        q, k, v = qkv(2, H, 90, 16, dtype=torch.float32)
        q, k, v = (q * 30).to(dtype), (k * 30).to(dtype), v.to(dtype)
        with torch.no_grad():
            out = attn(q, k, v, causal=causal).float()
        assert torch.isfinite(out).all(), method
        slack = 4 * torch.finfo(dtype).eps * v.float().abs().max()
        assert (out >= v.float().amin(2, keepdim=True) - slack).all(), method
        assert (out <= v.float().amax(2, keepdim=True) + slack).all(), method


def test_blocked_path_never_builds_an_n_by_n_tensor(monkeypatch):
    """Every tensor built by the blocked path has fewer than N^2 / 4 elements per (batch, head) at N = 1024."""
    N = 1024
    attn = build_small("rfa", 1, D, window_size=8).double().eval()
    q, k, v = qkv(1, 1, N, D)
    largest = []
    real_group = __import__("hf_lara.attention.window", fromlist=["_group"])._group

    def spy(layout, qs, lq, near, masks, far, sink):
        largest.extend(t.numel() for t in (*near, *masks, qs))
        largest.append(qs.shape[2] * qs.shape[3] * layout.M)  # the weights of the group
        return real_group(layout, qs, lq, near, masks, far, sink)

    monkeypatch.setattr("hf_lara.attention.window._group", spy)
    for causal in (False, True):
        windowed_attention(q, k, v, None, causal, D**-0.5, 8, attn.window_maps(D**-0.5, q.dtype))
    assert max(largest) < N * N / 4


@pytest.mark.parametrize("method", ["rfa", "kernel", "lara"])
def test_window_size_zero_is_todays_estimator(method):
    """`window_size=0` (the default) is the plain estimator: same state dict keys and the same outputs."""
    torch.manual_seed(3)
    plain = build_small(method, H, D).double().eval()
    torch.manual_seed(3)
    zero = build_small(method, H, D, window_size=0).double().eval()
    assert plain.state_dict().keys() == zero.state_dict().keys()
    q, k, v = qkv(2, H, 30, D)
    for causal in (False, True):
        assert torch.equal(plain(q, k, v, causal=causal), zero(q, k, v, causal=causal))


@pytest.mark.parametrize("method", METHODS)
def test_bad_window_size_raises(method):
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="window_size"):
            build_small(method, H, D, window_size=bad)
        with pytest.raises(ValueError, match="sink_tokens"):
            build_small(method, H, D, window_size=4, sink_tokens=bad)
    with pytest.raises(ValueError, match="needs a window"):
        build_small(method, H, D, sink_tokens=1)
