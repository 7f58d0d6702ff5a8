"""Block size of the bidirectional linear paths: time per call against `THREAD_BLOCK_ELEMENTS` (elements of one
`(B, H, block, S)` temporary per intra-op thread, `hf_lara/attention/linear.py`).

One layer, B=1, H=12, D=64, fp32, no autograd, default hyper-parameters. Every (method, N) row times each block
size in turn, `--rounds` times interleaved, best of `--reps` calls each (one warm-up call first). On a shared machine
run it with nothing else on the CPUs: every op of a multi-threaded call waits for its slowest thread.

Usage::

    python benchmarks/bench_blocks.py --threads 2 --methods rfa kernel lara --lengths 4096 16384
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_attention import best_time  # noqa: E402

import hf_lara.attention.linear as linear  # noqa: E402
from hf_lara.attention import build_attention  # noqa: E402

B, H, D = 1, 12, 64
RESULTS = Path(__file__).resolve().parent / "results"


def sweep(method: str, N: int, exponents: list[int], rounds: int, reps: int) -> dict[int, float]:
    """Best ms per call of `method` at length `N` for `THREAD_BLOCK_ELEMENTS = 2 ** e`, `e` in `exponents`."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=gen) for _ in range(3))
    module = build_attention(method, num_heads=H, head_dim=D).eval()
    default = linear.THREAD_BLOCK_ELEMENTS
    best = dict.fromkeys(exponents, float("inf"))
    try:
        with torch.inference_mode():
            for _ in range(rounds):
                for e in exponents:
                    linear.THREAD_BLOCK_ELEMENTS = 1 << e
                    best[e] = min(best[e], best_time(lambda: module(q, k, v), reps, math.inf) * 1e3)
    finally:
        linear.THREAD_BLOCK_ELEMENTS = default
    return best


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["rfa", "kernel", "lara"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--exponents", type=int, nargs="+", default=[18, 19, 20, 21])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    lines = [
        f"torch {torch.__version__}, {args.threads} thread(s), fp32, B={B} H={H} D={D}, no grad; best of {args.reps} "
        f"calls x {args.rounds} interleaved rounds; 1-min load average {load:.1f} at start. Default: 2^"
        f"{linear.THREAD_BLOCK_ELEMENTS.bit_length() - 1}.",
        "",
        "| method | N | " + " | ".join(f"2^{e} per thread" for e in args.exponents) + " |",
        "|---|---" + "|---" * len(args.exponents) + "|",
    ]
    for method in args.methods:
        for N in args.lengths:
            best = sweep(method, N, args.exponents, args.rounds, args.reps)
            lines.append(f"| {method} | {N} | " + " | ".join(f"{best[e]:.1f} ms" for e in args.exponents) + " |")
            print(lines[-1], flush=True)
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return lines


if __name__ == "__main__":
    main()
