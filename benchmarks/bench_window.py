"""Speed of the window hybrid (`hf_lara/attention/window.py`) against the same estimator without a window (CPU).

One `rfa` layer (64 random features), B=1, H=12, D=64, fp32, no autograd, one thread by default. Forward:
bidirectional and causal, no window / `W=64` / `W=64` + 1 sink token, for each length. Decode: one `step` of the
estimator's recurrent API (`prefill` of the context, then one new token), with and without the window.
Timing: the best of `--reps` calls after one warm-up; prints a Markdown table.

Usage::

    python benchmarks/bench_window.py --lengths 512 4096
"""

from __future__ import annotations

import argparse
import time

import torch

from hf_lara.attention.rfa import RandomFeatureAttention

H, D = 12, 64
SETTINGS = [("no window", 0, 0), ("W=64", 64, 0), ("W=64 + 1 sink", 64, 1)]


def best_ms(fn, reps: int) -> float:
    """The best wall time of `reps` calls after one warm-up, in milliseconds."""
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def forward_row(n: int, causal: bool, reps: int) -> list[float]:
    """Forward ms per setting of `SETTINGS` at length `n`."""
    q, k, v = torch.randn(3, 1, H, n, D).unbind(0)
    row = []
    for _, window, sinks in SETTINGS:
        attn = RandomFeatureAttention(H, D, window_size=window, sink_tokens=sinks).eval()
        row.append(best_ms(lambda a=attn: a(q, k, v, causal=causal), reps))
    return row


def decode_row(n: int, reps: int) -> list[float]:
    """One decoding step (ms) after a context of `n` tokens, per setting of `SETTINGS`."""
    q, k, v = torch.randn(3, 1, H, n + 1, D).unbind(0)
    new = q[:, :, n:], k[:, :, n:], v[:, :, n:]
    row = []
    for _, window, sinks in SETTINGS:
        attn = RandomFeatureAttention(H, D, window_size=window, sink_tokens=sinks).eval()
        _, state = attn.prefill(q[:, :, :n], k[:, :, :n], v[:, :, :n])
        row.append(best_ms(lambda a=attn, s=state: a.step(*new, s), reps * 10))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    names = [name for name, _, _ in SETTINGS]
    print("| pass | N | " + " | ".join(names) + " | W=64 / no window |")
    print("|---|---|" + "---|" * (len(names) + 1))
    with torch.no_grad():
        for n in args.lengths:
            for causal in (False, True):
                row = forward_row(n, causal, args.reps)
                label = "causal forward" if causal else "bidirectional forward"
                cells = " | ".join(f"{ms:.1f} ms" for ms in row)
                print(f"| {label} | {n} | {cells} | {row[1] / row[0]:.2f}x |", flush=True)
            row = decode_row(n, args.reps)
            cells = " | ".join(f"{ms:.3f} ms" for ms in row)
            print(f"| decode step | {n} | {cells} | {row[1] / row[0]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
