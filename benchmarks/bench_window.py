"""Speed of the window hybrid (`hf_lara/attention/window.py`) against the same estimator without a window (CPU).

One layer (`rfa` with 64 random features by default; `--methods rfa kernel lara`), B=1, H=12, D=64, fp32, no
autograd, one thread by default. Settings: no window / `W=64` / `W=64` + 4 sink tokens.

* forward (`--passes forward`): bidirectional and causal, one call over `N` tokens;
* decode (`--passes decode`): one `step` of the estimator's recurrent API after `prefill` of `N` tokens, chained
  as in generation (each step continues from the state the previous step returned; the context grows by one
  token per step, a few hundred at most on top of `N`).

Timing: the best of `--reps` calls (decode: `10 x --reps` steps) after one warm-up, the settings interleaved call
by call so that every column of a row sees the same machine load; prints a Markdown table with the load average.

`--baseline PACKAGE` also times the windowed settings with another copy of `hf_lara` importable as `PACKAGE`
(e.g. an older commit exported and renamed `hf_lara_main`), interleaved with this one.

Usage::

    python benchmarks/bench_window.py --lengths 512 4096
    python benchmarks/bench_window.py --passes decode --methods rfa kernel lara --reps 30
    PYTHONPATH=/tmp/ab python benchmarks/bench_window.py --baseline hf_lara_main
"""

from __future__ import annotations

import argparse
import importlib
import os
import time
from collections.abc import Callable

import torch

import hf_lara.attention

H, D = 12, 64
SETTINGS = [("no window", 0, 0), ("W=64", 64, 0), ("W=64 + 4 sinks", 64, 4)]
HPARAMS = {"rfa": {"num_features": 64}, "kernel": {}, "lara": {"num_landmarks": 64}}


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


def _modules(builders: list[Callable], method: str) -> list[tuple[int, torch.nn.Module]]:
    """`(setting index, module)` per setting of `SETTINGS` and builder (the baseline's only for windowed settings),
    same random features."""
    out = []
    for i, (_, window, sinks) in enumerate(SETTINGS):
        for build in builders[: 1 if not window else None]:
            torch.manual_seed(0)
            hparams = {**HPARAMS[method], "window_size": window, "sink_tokens": sinks}
            out.append((i, build(method, num_heads=H, head_dim=D, **hparams).eval()))
    return out


def _grouped(modules: list[tuple[int, torch.nn.Module]], times: list[float]) -> list[list[float]]:
    """Times per setting: `[[new], [new, baseline], ...]`."""
    row: list[list[float]] = [[] for _ in SETTINGS]
    for (i, _), ms in zip(modules, times, strict=True):
        row[i].append(ms)
    return row


def forward_row(method: str, n: int, causal: bool, reps: int, builders: list[Callable]) -> list[list[float]]:
    """Forward ms per setting at length `n`."""
    q, k, v = torch.randn(3, 1, H, n, D).unbind(0)
    modules = _modules(builders, method)
    fns = [lambda a=a: a(q, k, v, causal=causal) for _, a in modules]
    return _grouped(modules, best_ms(fns, reps))


def _chained_step(attn: torch.nn.Module, state, new: tuple[torch.Tensor, ...]) -> Callable[[], None]:
    """A call that runs one step from the state the previous call returned."""
    box = [state]

    def step() -> None:
        box[0] = attn.step(*new, box[0])[1]

    return step


def decode_row(method: str, n: int, reps: int, builders: list[Callable]) -> list[list[float]]:
    """One decoding step (ms) after a context of `n` tokens, per setting, chained as in generation."""
    q, k, v = torch.randn(3, 1, H, n + 1, D).unbind(0)
    new = q[:, :, n:], k[:, :, n:], v[:, :, n:]
    modules = _modules(builders, method)
    fns = []
    for _, attn in modules:
        _, state = attn.prefill(q[:, :, :n], k[:, :, :n], v[:, :, :n])
        fns.append(_chained_step(attn, state, new))
    return _grouped(modules, best_ms(fns, reps * 10))


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 4096])
    parser.add_argument("--methods", nargs="+", default=["rfa"], choices=sorted(HPARAMS))
    parser.add_argument("--passes", nargs="+", default=["forward", "decode"], choices=["forward", "decode"])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--baseline", help="package name of another hf_lara copy to time alongside")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    builders = [hf_lara.attention.build_attention]
    if args.baseline:
        builders.append(importlib.import_module(f"{args.baseline}.attention").build_attention)
    names = [SETTINGS[0][0]]
    for name, _, _ in SETTINGS[1:]:
        names += [name, f"{name} (baseline)"] if args.baseline else [name]
    ratio = [f"{name} / no window" for name, _, _ in SETTINGS[1:]]
    if args.baseline:
        ratio += [f"{name} / no window (baseline)" for name, _, _ in SETTINGS[1:]]
    print(f"threads {args.threads}, load average at start {load()} (1/5/15 min)\n")
    print("| method | pass | N | " + " | ".join(names + ratio) + " |")
    print("|---|---|---|" + "---|" * (len(names) + len(ratio)))
    labels = [("bidirectional forward", ".1f"), ("causal forward", ".1f")] if "forward" in args.passes else []
    labels += [("decode step", ".3f")] if "decode" in args.passes else []
    with torch.no_grad():
        for method in args.methods:
            for n in args.lengths:
                for label, fmt in labels:
                    if label == "decode step":
                        row = decode_row(method, n, args.reps, builders)
                    else:
                        row = forward_row(method, n, label == "causal forward", args.reps, builders)
                    cells = [ms for setting in row for ms in setting]
                    ratios = [setting[0] / row[0][0] for setting in row[1:]]
                    ratios += [setting[1] / row[0][0] for setting in row[1:] if len(setting) > 1]
                    text = " | ".join(f"{ms:{fmt}} ms" for ms in cells) + " | "
                    text += " | ".join(f"{r:.2f}x" for r in ratios)
                    print(f"| {method} | {label} | {n} | {text} |", flush=True)
    print(f"\nload average at end {load()}")


if __name__ == "__main__":
    main()
