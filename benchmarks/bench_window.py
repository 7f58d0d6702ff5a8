"""Speed of the window hybrid (`hf_lara/attention/window.py`) against the same estimator without a window (CPU).

One `rfa` layer (64 random features), B=1, H=12, D=64, fp32, no autograd, one thread by default. Forward:
bidirectional and causal, no window / `W=64` / `W=64` + 1 sink token, for each length. Decode: one `step` of the
estimator's recurrent API (`prefill` of the context, then one new token), with and without the window.
Timing: the best of `--reps` calls after one warm-up; prints a Markdown table.

`--baseline PACKAGE` also times the windowed settings with another copy of `hf_lara` importable as `PACKAGE`
(e.g. an older commit exported and renamed `hf_lara_main`), interleaved call by call with this one, so that
both columns see the same machine load.

Usage::

    python benchmarks/bench_window.py --lengths 512 4096
    PYTHONPATH=/tmp/ab python benchmarks/bench_window.py --baseline hf_lara_main
"""

from __future__ import annotations

import argparse
import importlib
import time
from collections.abc import Callable

import torch

from hf_lara.attention.rfa import RandomFeatureAttention

H, D = 12, 64
SETTINGS = [("no window", 0, 0), ("W=64", 64, 0), ("W=64 + 1 sink", 64, 1)]


def best_ms(fns: list[Callable[[], object]], reps: int) -> list[float]:
    """The best wall time of `reps` calls of each of `fns` (interleaved, after one warm-up), in milliseconds."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return [b * 1e3 for b in best]


def _modules(classes: list[type], window: int, sinks: int) -> list[torch.nn.Module]:
    """One module per class (the baseline's only for windowed settings), same random features."""
    out = []
    for cls in classes[: 1 if not window else None]:
        torch.manual_seed(0)
        out.append(cls(H, D, window_size=window, sink_tokens=sinks).eval())
    return out


def forward_row(n: int, causal: bool, reps: int, classes: list[type]) -> list[list[float]]:
    """Forward ms per setting of `SETTINGS` at length `n` (one entry per class for windowed settings)."""
    q, k, v = torch.randn(3, 1, H, n, D).unbind(0)
    row = []
    for _, window, sinks in SETTINGS:
        fns = [lambda a=a: a(q, k, v, causal=causal) for a in _modules(classes, window, sinks)]
        row.append(best_ms(fns, reps))
    return row


def decode_row(n: int, reps: int, classes: list[type]) -> list[list[float]]:
    """One decoding step (ms) after a context of `n` tokens, per setting of `SETTINGS`."""
    q, k, v = torch.randn(3, 1, H, n + 1, D).unbind(0)
    new = q[:, :, n:], k[:, :, n:], v[:, :, n:]
    row = []
    for _, window, sinks in SETTINGS:
        fns = []
        for attn in _modules(classes, window, sinks):
            _, state = attn.prefill(q[:, :, :n], k[:, :, :n], v[:, :, :n])
            fns.append(lambda a=attn, s=state: a.step(*new, s))
        row.append(best_ms(fns, reps * 10))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--baseline", help="package name of another hf_lara copy to time alongside")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    classes = [RandomFeatureAttention]
    if args.baseline:
        classes.append(importlib.import_module(f"{args.baseline}.attention.rfa").RandomFeatureAttention)
    names = [SETTINGS[0][0]]
    for name, _, _ in SETTINGS[1:]:
        names += [f"{name} (baseline)", name] if args.baseline else [name]
    ratio = ["W=64 / no window (baseline)", "W=64 / no window"] if args.baseline else ["W=64 / no window"]
    print("| pass | N | " + " | ".join(names + ratio) + " |")
    print("|---|---|" + "---|" * (len(names) + len(ratio)))
    with torch.no_grad():
        for n in args.lengths:
            for label, fmt in (("bidirectional forward", ".1f"), ("causal forward", ".1f"), ("decode step", ".3f")):
                if label == "decode step":
                    row = decode_row(n, args.reps, classes)
                else:
                    row = forward_row(n, label == "causal forward", args.reps, classes)
                cells = [row[0][0]] + [ms for setting in row[1:] for ms in reversed(setting)]
                ratios = [ms / row[0][0] for ms in reversed(row[1])]
                text = " | ".join(f"{ms:{fmt}} ms" for ms in cells) + " | " + " | ".join(f"{r:.2f}x" for r in ratios)
                print(f"| {label} | {n} | {text} |", flush=True)


if __name__ == "__main__":
    main()
