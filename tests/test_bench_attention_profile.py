"""`benchmarks/bench_attention_profile.py`: the near keys are the window hybrid's exact keys, and the far-mass
statistics are those of distributions whose answer is known."""

from __future__ import annotations

import math

import pytest
import torch

from .benchmark_scripts import load_benchmark


def naive_near(mask: list[bool], window: int, sinks: int) -> list[set[int]]:
    """Per query position: the `window` real positions nearest it (a window clamped inside the real tokens) plus the
    first and last `sinks` real tokens, written out position by position."""
    real = [j for j, ok in enumerate(mask) if ok]
    first, last = real[0], real[-1]
    sink_set = set(real[:sinks]) | set(real[-sinks:]) if sinks else set()
    near = []
    for i in range(len(mask)):
        lo = min(max(i - (window - 1) // 2, first), max(last - window + 1, first))
        near.append({j for j in range(lo, lo + window) if j in real} | sink_set)
    return near


@pytest.mark.parametrize("window,sinks", [(4, 0), (4, 1), (5, 2), (16, 1)])
def test_near_mask_is_the_window_and_the_sinks(window, sinks):
    bench = load_benchmark("bench_attention_profile")
    rows = [[True] * 12, [False] * 3 + [True] * 9, [True] * 7 + [False] * 5]
    mask = torch.tensor(rows)
    near = bench.near_mask(mask, window, sinks)
    for b, row in enumerate(rows):
        expected = naive_near(row, window, sinks)
        for i in range(len(row)):
            assert set(torch.nonzero(near[b, i]).flatten().tolist()) == expected[i], (b, i)


def test_profile_of_known_distributions():
    bench = load_benchmark("bench_attention_profile")
    N = 40
    near = torch.zeros(1, N, N, dtype=torch.bool)
    near[..., :10] = True  # keys 0-9 near every query
    probs = torch.zeros(1, 2, N, N)
    probs[0, 0, :, :10] = 0.7 / 10  # head 0: 0.3 spread evenly over 30 far keys
    probs[0, 0, :, 10:] = 0.3 / 30
    probs[0, 1, :, :10] = 0.5 / 10  # head 1: 0.5 on one far key
    probs[0, 1, :, 25] = 0.5
    query_real = torch.ones(1, N, dtype=torch.bool)
    query_real[0, -4:] = False  # padded queries do not count
    profile = bench.layer_profile(probs, near, query_real, top=8)
    assert profile["far_mass"] == pytest.approx((0.3 + 0.5) / 2)
    assert profile["far_keys"] == pytest.approx((30 + 1) / 2)
    assert profile["top_share"] == pytest.approx((8 / 30 + 1) / 2)
    assert math.isfinite(profile["far_keys"])
