"""The `hf-lara` command line."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence

import torch

from .attention import available_methods, build_attention
from .attention.synthetic import clustered_qkv


class UsageError(Exception):
    """Bad command-line input: reported as one line, exit code 2."""


def _parse_lengths(text: str) -> list[int]:
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--lengths must be comma-separated integers, got {text!r}") from None
    if not lengths or min(lengths) < 1:
        raise UsageError(f"--lengths must be positive integers, got {text!r}")
    return lengths


def _time_call(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[torch.Tensor, float]:
    """Warm up once, then return the output and the best wall time of `repeats` calls, in seconds."""
    out = fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return out, best


def relative_mse(out: torch.Tensor, ref: torch.Tensor) -> float:
    """`mean((out - ref)^2) / mean(ref^2)`."""
    return ((out.double() - ref.double()).square().mean() / ref.double().square().mean()).item()


def estimator_table(
    methods: Sequence[str], lengths: Sequence[int], heads: int = 12, head_dim: int = 64, repeats: int = 2
) -> list[dict]:
    """Error against exact softmax and time of every estimator on inputs with peaked, local attention."""
    rows = []
    for length in lengths:
        generator = torch.Generator().manual_seed(length)
        q, k, v = clustered_qkv(1, heads, length, head_dim, generator=generator)
        for causal in (False, True):
            reference = build_attention("softmax", num_heads=heads, head_dim=head_dim)
            ref, ref_time = _time_call(lambda: reference(q, k, v, causal=causal), repeats)
            for method in methods:
                torch.manual_seed(0)
                attn = build_attention(method, num_heads=heads, head_dim=head_dim).eval()
                out, seconds = _time_call(lambda: attn(q, k, v, causal=causal), repeats)
                rows.append({
                    "method": method, "mode": "causal" if causal else "bidirectional", "length": length,
                    "relative_mse": relative_mse(out, ref), "ms": 1000 * seconds, "speedup": ref_time / seconds,
                })
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| method | mode | N | rel. MSE vs softmax | ms | speed-up vs softmax |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['mode']} | {r['length']} | {r['relative_mse']:.2e} | {r['ms']:.1f} | "
            f"{r['speedup']:.2f}x |"
        )
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    methods = args.method or available_methods()
    unknown = sorted(set(methods) - set(available_methods()))
    if unknown:
        raise UsageError(f"unknown method(s) {', '.join(unknown)}; valid: {', '.join(available_methods())}")
    torch.set_num_threads(args.threads) if args.threads else None
    print(f"Estimators on peaked synthetic attention (B=1, H=12, D=64, default hyper-parameters, "
          f"{torch.get_num_threads()} threads)\n")
    print(format_table(estimator_table(methods, _parse_lengths(args.lengths))))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-lara", description="Linear randomized attention for Transformers.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run every estimator against exact softmax and print error and speed")
    demo.add_argument("--method", action="append", help="method to include (repeatable; default: all)")
    demo.add_argument("--lengths", default="512,2048,4096", help="comma-separated sequence lengths")
    demo.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, ValueError) as err:
        print(f"hf-lara {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
