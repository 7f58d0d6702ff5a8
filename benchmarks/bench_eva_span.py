"""Causal EVA with one exact window per query (`local_windows=1`) against two (`local_windows=2`, the default), side
by side in one process, against SDPA: the forward (no grad) at long N and one decoding step at a few context lengths.

Calls of every variant are interleaved (round `r` runs each variant once, in turn), so machine load hits them alike;
each call is timed by wall clock and by process CPU time (`time.process_time`), and the best of the rounds is kept.
`--baseline-rev REV` adds the `eva.py` of a git revision (its `EVAAttention`, loaded without registering it) as a
variant, to compare against the code before a change.

Usage::

    python benchmarks/bench_eva_span.py --threads 1 --lengths 16384 --decode-lengths 512 16384 --baseline-rev main
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from hf_lara.attention import build_attention

B, H, D = 1, 12, 64
RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def baseline_class(rev: str) -> type:
    """`EVAAttention` from `hf_lara/attention/eva.py` at git revision `rev`, as an unregistered class."""
    source = subprocess.run(
        ["git", "show", f"{rev}:hf_lara/attention/eva.py"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    source = source.replace('@register_estimator("eva")\n', "")
    module = types.ModuleType("hf_lara.attention._eva_baseline")
    module.__package__ = "hf_lara.attention"
    sys.modules[module.__name__] = module
    exec(compile(source, f"{rev}:eva.py", "exec"), module.__dict__)
    return module.EVAAttention


def variants(args: argparse.Namespace) -> dict[str, torch.nn.Module | None]:
    """Name -> module (None: SDPA)."""
    out: dict[str, torch.nn.Module | None] = {}
    if args.baseline_rev:
        out[f"eva {args.baseline_rev}"] = baseline_class(args.baseline_rev)(H, D).eval()
    for K in args.local_windows:
        out[f"eva K={K}"] = build_attention("eva", num_heads=H, head_dim=D, local_windows=K).eval()
    return out


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved(cases: dict[str, Callable[[], object]], rounds: int) -> dict[str, dict[str, float]]:
    """Best wall and CPU seconds of each case over `rounds` interleaved rounds, after one warm-up call each."""
    for fn in cases.values():
        fn()
    best = {name: {"wall": float("inf"), "cpu": float("inf")} for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            wall, cpu = timed(fn)
            best[name]["wall"] = min(best[name]["wall"], wall)
            best[name]["cpu"] = min(best[name]["cpu"], cpu)
    return best


def forward_cases(N: int, modules: dict[str, torch.nn.Module | None]) -> dict[str, Callable[[], object]]:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D, generator=gen) for _ in range(3))
    cases: dict[str, Callable[[], object]] = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
    for name, module in modules.items():
        cases[name] = lambda module=module: module(q, k, v, causal=True)
    return cases


def decode_cases(L: int, modules: dict[str, torch.nn.Module | None]) -> dict[str, Callable[[], object]]:
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, L + 1, D, generator=gen) for _ in range(3))
    new = (q[:, :, -1:], k[:, :, -1:], v[:, :, -1:])
    cache_k, cache_v = k[:, :, :L].contiguous(), v[:, :, :L].contiguous()

    def sdpa() -> None:
        F.scaled_dot_product_attention(new[0], torch.cat([cache_k, new[1]], 2), torch.cat([cache_v, new[2]], 2))

    cases: dict[str, Callable[[], object]] = {"sdpa (KV cache)": sdpa}
    for name, module in modules.items():
        _, state = module.prefill(q[:, :, :L], k[:, :, :L], v[:, :, :L])
        cases[name] = lambda module=module, state=state: module.step(*new, state)
    return cases


def table(title: str, key: str, results: dict[int, dict[str, dict[str, float]]]) -> list[str]:
    names = list(next(iter(results.values())))
    sdpa = names[0]
    lines = [f"### {title}", "", f"| {key} | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for size, row in results.items():
        cells = []
        for name in names:
            cell = f"{row[name]['wall'] * 1e3:.1f} / {row[name]['cpu'] * 1e3:.1f}"
            if name != sdpa:
                cell += f" ({row[sdpa]['cpu'] / row[name]['cpu']:.2f}x)"
            cells.append(cell)
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="*", default=[16384], help="forward lengths N")
    parser.add_argument("--decode-lengths", type=int, nargs="*", default=[512, 16384], help="decoding contexts")
    parser.add_argument("--local-windows", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--baseline-rev", default="", help="also time `EVAAttention` of this git revision")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the forward")
    parser.add_argument("--decode-rounds", type=int, default=30)
    parser.add_argument("--tag", default="evaslide")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    modules = variants(args)
    load = [os.getloadavg()[0]]
    forward, decode = {}, {}
    with torch.no_grad():
        for N in args.lengths:
            forward[N] = interleaved(forward_cases(N, modules), args.rounds)
            print(N, json.dumps(forward[N]), flush=True)
        for L in args.decode_lengths:
            decode[L] = interleaved(decode_cases(L, modules), args.decode_rounds)
            print(L, json.dumps(decode[L]), flush=True)
    load.append(os.getloadavg()[0])
    report = {
        "torch": torch.__version__,
        "platform": platform.platform(),
        "threads": args.threads,
        "shape": {"B": B, "H": H, "D": D, "dtype": "float32"},
        "hparams": "eva defaults (window_size=64, chunk_size=16)",
        "load_average": load,
        "forward": forward,
        "decode": decode,
    }
    lines = [
        "# causal EVA: exact span of one window vs two (`local_windows`)",
        "",
        f"torch {torch.__version__}, {args.threads} thread(s), fp32, B={B} H={H} D={D}, eva defaults (window 64, "
        f"chunk 16); load average {load[0]:.1f} at start, {load[1]:.1f} at end. Cells: best wall ms / best CPU ms "
        "(process time) over interleaved rounds, and the CPU-time speed-up vs SDPA.",
        "",
    ]
    if forward:
        lines += table(f"causal forward, no grad (best of {args.rounds})", "N", forward) + [""]
    if decode:
        lines += table(f"one decoding step, one layer (best of {args.decode_rounds})", "context", decode) + [""]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"attention_{args.tag}.json").write_text(json.dumps(report, indent=1))
    (args.out / f"attention_{args.tag}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
