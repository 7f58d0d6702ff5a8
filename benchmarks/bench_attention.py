"""Speed and memory of the hf_lara estimators against `torch.nn.functional.scaled_dot_product_attention` (CPU).

Sections (each can be turned off):

1. **sweep**: methods x lengths x {bidirectional, causal} x {forward, forward+backward}; seconds per call of one
   attention layer (B=1, H=12, D=64, fp32) and peak memory. SDPA runs in the same process, side by side.
2. **decode**: one generation step of one layer vs context length: the recurrent state step (`rfa`, `kernel`,
   causal `lara`), `eva` (forward with one query over the KV cache) and SDPA over a KV cache (append included).
3. **e2e**: a GPT-2-small-shaped model (12 layers, 768 hidden, 12 heads, random weights) forward, SDPA vs
   `hf_lara.convert(model, method=...)`.
4. **compile** (`--compile`, off by default): one layer's forward, eager vs `torch.compile(fullgraph=True)`.

Timing: best of `reps` calls after one warm-up (one call, no warm-up, when a call takes more than `--slow` s).
Memory: the peak of live torch tensor bytes during one call, from `torch.profiler(profile_memory=True)`
(allocations attributed to the ops that make them, frees in time order), minus nothing: inputs made before the
call are not counted, so it is the extra memory the call needs; scratch that an op allocates and frees inside
itself (e.g. SDPA's per-thread buffers) is not seen. Reported as bytes per token.

Usage::

    python benchmarks/bench_attention.py --quick
    python benchmarks/bench_attention.py --lengths 2048 16384 --methods rfa kernel --no-e2e
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from hf_lara.attention import build_attention

B, H, D = 1, 12, 64
LINEAR_METHODS = ("rfa", "kernel", "lara", "eva")
HPARAMS: dict[str, dict] = {
    "rfa": {"num_features": 64},
    "kernel": {},  # hedgehog, num_features = head_dim -> S = 128
    "lara": {"num_landmarks": 64},
    "eva": {"window_size": 64, "num_chunks": 64},
}
FULL_LENGTHS = [512, 1024, 2048, 4096, 8192, 16384, 32768]
QUICK_LENGTHS = [512, 2048, 8192, 16384]
RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------------------------------
# measurement helpers
# ---------------------------------------------------------------------------------------------------------------


def best_time(fn: Callable[[], object], reps: int, slow: float) -> float:
    """Best wall time (s) of `reps` calls after one warm-up; a single call when the first one exceeds `slow` s."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    if first > slow:
        return first
    best = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of live torch tensor bytes allocated during `fn()` (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    changes = []
    for event in prof.events():
        delta = event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        if delta:
            changes.append((event.time_range.start, delta))
    live = peak = 0
    for _, delta in sorted(changes):
        live += delta
        peak = max(peak, live)
    return peak


def inputs(N: int, grad: bool, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, N, D, generator=gen).requires_grad_(grad) for _ in range(3))


def attention_call(method: str, causal: bool, backward: bool, N: int) -> Callable[[], object]:
    """A closure running one attention call (and its backward) on fresh inputs of length `N`."""
    q, k, v = inputs(N, backward)
    if method == "sdpa":

        def attend() -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    else:
        module = build_attention(method, num_heads=H, head_dim=D, **HPARAMS[method]).eval()

        def attend() -> torch.Tensor:
            return module(q, k, v, causal=causal)

    if not backward:

        def forward() -> None:
            with torch.no_grad():
                attend()

        return forward
    grad = torch.randn(B, H, N, D)

    def forward_backward() -> None:
        attend().backward(grad)
        for t in (q, k, v):
            t.grad = None

    return forward_backward


def compiled_vs_eager(args: argparse.Namespace) -> list[dict]:
    """Forward of one layer, eager vs `torch.compile(module, fullgraph=True)` (inductor), same inputs.

    Compilation (and one warm-up call) happens before timing; `compile_seconds` reports it. Under tracing the causal
    kernel path takes its exact per-chunk loop (no data-dependent fallback), so causal graphs grow with N / chunk.
    """
    rows = []
    for method in args.compile_methods:
        for causal in args.modes:  # booleans after parse_args
            for N in args.compile_lengths:
                rows.append(_compile_case(method, causal, N, args))
                print(f"  compile {'causal' if causal else 'bidir'} N={N:6d} {method}: {rows[-1]}", flush=True)
    return rows


def _compile_case(method: str, causal: bool, N: int, args: argparse.Namespace) -> dict:
    q, k, v = inputs(N, grad=False)
    module = build_attention(method, num_heads=H, head_dim=D, **HPARAMS[method]).eval()
    torch._dynamo.reset()
    fast = torch.compile(module, fullgraph=True)
    row = {"method": method, "causal": causal, "N": N}
    with torch.no_grad():
        start = time.perf_counter()
        fast(q, k, v, causal=causal)
        row["compile_seconds"] = time.perf_counter() - start
        row["eager_seconds"] = best_time(lambda: module(q, k, v, causal=causal), args.reps, args.slow)
        row["compiled_seconds"] = best_time(lambda: fast(q, k, v, causal=causal), args.reps, args.slow)
        row["max_abs_diff"] = (module(q, k, v, causal=causal) - fast(q, k, v, causal=causal)).abs().max().item()
    return row


def compile_lines(rows: list[dict]) -> list[str]:
    lines = ["### eager vs torch.compile (inductor, fullgraph=True), forward, ms per call", ""]
    lines += ["| method | mode | N | eager | compiled | speed-up | compile s | max abs diff |", "|---" * 8 + "|"]
    for r in rows:
        eager, comp = r["eager_seconds"], r["compiled_seconds"]
        lines.append(
            f"| {r['method']} | {'causal' if r['causal'] else 'bidirectional'} | {r['N']} | {eager * 1e3:.1f} | "
            f"{comp * 1e3:.1f} | {eager / comp:.2f}x | {r['compile_seconds']:.0f} | {r['max_abs_diff']:.1e} |"
        )
    return lines + [""]


def is_quadratic(method: str, causal: bool) -> bool:
    return method == "sdpa" or (method == "eva" and causal)


# ---------------------------------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------------------------------


def sweep(args: argparse.Namespace) -> list[dict]:
    rows = []
    for causal in args.modes:
        for backward in args.passes:
            skipped: dict[str, float] = {}
            for N in args.lengths:
                for method in ["sdpa", *args.methods]:
                    row = {"method": method, "causal": causal, "backward": backward, "N": N}
                    estimate = skipped.get(method)
                    if estimate is not None:
                        growth = (N / skipped[method + ":N"]) ** (2 if is_quadratic(method, causal) else 1)
                        row["skipped"] = f"estimated {estimate * growth:.0f} s > --max-seconds"
                        rows.append(row)
                        continue
                    fn = attention_call(method, causal, backward, N)
                    row["seconds"] = best_time(fn, args.reps, args.slow)
                    if args.memory:
                        row["peak_bytes"] = peak_bytes(fn)
                        row["bytes_per_token"] = row["peak_bytes"] / N
                    rows.append(row)
                    growth = 4.0 if is_quadratic(method, causal) else 2.0
                    if row["seconds"] * growth > args.max_seconds:
                        skipped[method], skipped[method + ":N"] = row["seconds"], N
                    print(_sweep_line(row), flush=True)
                    del fn
    return rows


def _sweep_line(row: dict) -> str:
    mode = "causal" if row["causal"] else "bidir"
    passes = "fwd+bwd" if row["backward"] else "fwd"
    mem = f"  {row['bytes_per_token'] / 1024:8.1f} KiB/token" if "bytes_per_token" in row else ""
    return f"  {mode:6s} {passes:7s} N={row['N']:6d} {row['method']:7s} {row['seconds'] * 1e3:10.1f} ms{mem}"


def decode(args: argparse.Namespace) -> list[dict]:
    rows = []
    with torch.no_grad():
        for L in args.decode_lengths:
            q, k, v = inputs(L + 1, False, seed=1)
            new = (q[:, :, -1:], k[:, :, -1:], v[:, :, -1:])
            cache_k, cache_v = k[:, :, :L].contiguous(), v[:, :, :L].contiguous()

            cases = {"sdpa (KV cache)": _sdpa_step(new, cache_k, cache_v)}
            for method in args.methods:
                module = build_attention(method, num_heads=H, head_dim=D, **HPARAMS[method]).eval()
                if module.supports_recurrent_state:
                    _, state = module.prefill(q[:, :, :L], k[:, :, :L], v[:, :, :L])
                    cases[f"{method} (state)"] = _state_step(module, new, state)
                else:
                    cases[f"{method} (KV cache)"] = _cache_step(module, new, cache_k, cache_v)
            for name, fn in cases.items():
                seconds = _median_time(fn, args.decode_reps)
                rows.append({"method": name, "context": L, "seconds": seconds})
                print(f"  decode L={L:6d} {name:18s} {seconds * 1e3:8.3f} ms", flush=True)
    return rows


def _sdpa_step(new, cache_k, cache_v) -> Callable[[], object]:
    """SDPA for one query over the cache with the new key appended (what a dynamic KV cache does)."""

    def step() -> None:
        keys, values = torch.cat([cache_k, new[1]], 2), torch.cat([cache_v, new[2]], 2)
        F.scaled_dot_product_attention(new[0], keys, values)

    return step


def _state_step(module, new, state) -> Callable[[], object]:
    return lambda: module.step(*new, state)


def _cache_step(module, new, cache_k, cache_v) -> Callable[[], object]:
    def step() -> None:
        module(new[0], torch.cat([cache_k, new[1]], 2), torch.cat([cache_v, new[2]], 2), causal=True)

    return step


def _median_time(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def end_to_end(args: argparse.Namespace) -> list[dict]:
    from transformers import GPT2Config

    rows = []
    for N in args.e2e_lengths:
        config = GPT2Config(n_layer=12, n_embd=768, n_head=12, n_positions=N, vocab_size=8192)
        ids = torch.randint(0, config.vocab_size, (1, N), generator=torch.Generator().manual_seed(0))
        for method in ["sdpa", *args.e2e_methods]:
            row = {"method": method, "N": N, **_e2e_case(config, ids, method, args)}
            rows.append(row)
            shown = f"{row['seconds']:.2f} s" if "seconds" in row else row["error"]
            print(f"  e2e N={N:6d} {method:7s} {shown}", flush=True)
    return rows


def _e2e_case(config, ids: torch.Tensor, method: str, args: argparse.Namespace) -> dict:
    """Seconds of one forward of a fresh random GPT-2 (SDPA, or converted to `method` by `hf_lara.convert`)."""
    from transformers import GPT2LMHeadModel

    import hf_lara

    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    model.set_attn_implementation("sdpa")
    try:
        if method != "sdpa":
            hf_lara.convert(model, method=method, **HPARAMS[method])
        with torch.no_grad():
            return {"seconds": best_time(lambda: model(ids), args.e2e_reps, args.slow)}
    except Exception as err:  # the integration is owned elsewhere: report it, do not crash the run
        return {"error": f"{type(err).__name__}: {err}"}


# ---------------------------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------------------------


def sweep_tables(rows: list[dict], methods: list[str]) -> list[str]:
    lines = []
    for causal in (False, True):
        for backward in (False, True):
            part = [r for r in rows if r["causal"] == causal and r["backward"] == backward]
            if not part:
                continue
            title = f"{'causal' if causal else 'bidirectional'}, {'forward+backward' if backward else 'forward'}"
            lines += [f"### {title}: ms per call (speed-up vs SDPA)", ""]
            lines += _table(part, methods, _time_cell)
            if any("bytes_per_token" in r for r in part):
                lines += [f"### {title}: peak extra memory, KiB per token", ""]
                lines += _table(part, methods, _memory_cell)
    return lines


def _table(rows: list[dict], methods: list[str], cell: Callable[[dict | None, dict | None], str]) -> list[str]:
    names = ["sdpa", *methods]
    lines = ["| N | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for N in sorted({r["N"] for r in rows}):
        by_method = {r["method"]: r for r in rows if r["N"] == N}
        cells = [cell(by_method.get(m), by_method.get("sdpa")) for m in names]
        lines.append(f"| {N} | " + " | ".join(cells) + " |")
    return lines + [""]


def _time_cell(row: dict | None, sdpa: dict | None) -> str:
    if row is None:
        return "-"
    if "seconds" not in row:
        return "skipped"
    text = f"{row['seconds'] * 1e3:.1f}"
    if row["method"] != "sdpa" and sdpa and "seconds" in sdpa:
        text += f" ({sdpa['seconds'] / row['seconds']:.1f}x)"
    return text


def _memory_cell(row: dict | None, sdpa: dict | None) -> str:
    if row is None or "bytes_per_token" not in row:
        return "-" if row is None else "skipped"
    return f"{row['bytes_per_token'] / 1024:.1f}"


def scaling_lines(rows: list[dict], methods: list[str], low: int = 2048, high: int = 16384) -> list[str]:
    lines = [f"### time ratio N={high} / N={low} (linear: 8; target <= 9.2)", ""]
    lines += ["| mode | " + " | ".join(["sdpa", *methods]) + " |", "|---" * (len(methods) + 2) + "|"]
    for causal in (False, True):
        for backward in (False, True):
            cells = []
            for m in ["sdpa", *methods]:
                pick = {
                    r["N"]: r.get("seconds")
                    for r in rows
                    if r["method"] == m and r["causal"] == causal and r["backward"] == backward
                }
                cells.append(f"{pick[high] / pick[low]:.1f}" if pick.get(low) and pick.get(high) else "-")
            mode = f"{'causal' if causal else 'bidir'} {'fwd+bwd' if backward else 'fwd'}"
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return lines + [""]


def decode_lines(rows: list[dict]) -> list[str]:
    names = list(dict.fromkeys(r["method"] for r in rows))
    contexts = sorted({r["context"] for r in rows})
    lines = ["### decode: ms per generated token, one layer (12 heads), vs context length", ""]
    lines += ["| context | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for L in contexts:
        by_name = {r["method"]: r["seconds"] for r in rows if r["context"] == L}
        lines.append(f"| {L} | " + " | ".join(f"{by_name[n] * 1e3:.3f}" for n in names) + " |")
    first, last = contexts[0], contexts[-1]
    ratio = []
    for n in names:
        t = {r["context"]: r["seconds"] for r in rows if r["method"] == n}
        ratio.append(f"{t[last] / t[first]:.2f}")
    lines.append(f"| ratio {last}/{first} | " + " | ".join(ratio) + " |")
    return lines + [""]


def e2e_lines(rows: list[dict]) -> list[str]:
    names = list(dict.fromkeys(r["method"] for r in rows))
    lines = ["### end to end: GPT-2-small shape (12 x 768, 12 heads), random weights, forward, s (speed-up)", ""]
    lines += ["| N | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for N in sorted({r["N"] for r in rows}):
        by_name = {r["method"]: r for r in rows if r["N"] == N}
        base = by_name.get("sdpa", {}).get("seconds")
        cells = []
        for n in names:
            r = by_name[n]
            if "seconds" not in r:
                cells.append(r.get("error", "-"))
                continue
            cells.append(f"{r['seconds']:.2f}" + (f" ({base / r['seconds']:.2f}x)" if base and n != "sdpa" else ""))
        lines.append(f"| {N} | " + " | ".join(cells) + " |")
    return lines + [""]


def plot(rows: list[dict], methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for method in ["sdpa", *methods]:
        for causal, style in ((False, "-"), (True, "--")):
            part = sorted(
                (r["N"], r)
                for r in rows
                if r["method"] == method and r["causal"] == causal and not r["backward"] and "seconds" in r
            )
            if not part:
                continue
            label = f"{method} {'causal' if causal else 'bidir'}"
            ns = [n for n, _ in part]
            axes[0].plot(ns, [r["seconds"] for _, r in part], style, marker="o", label=label)
            if all("peak_bytes" in r for _, r in part):
                axes[1].plot(ns, [max(r["peak_bytes"], 1) / 2**20 for _, r in part], style, marker="o", label=label)
    for ax, ylabel in zip(axes, ("seconds per forward call", "peak extra memory (MiB)"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"one attention layer, B={B}, H={H}, D={D}, fp32, CPU {torch.get_num_threads()} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", help="sweep lengths (default 512 ... 32768)")
    parser.add_argument("--methods", nargs="+", default=list(LINEAR_METHODS), choices=LINEAR_METHODS)
    parser.add_argument("--modes", nargs="+", default=["bidirectional", "causal"], choices=["bidirectional", "causal"])
    parser.add_argument("--passes", nargs="+", default=["forward", "backward"], choices=["forward", "backward"])
    parser.add_argument("--quick", action="store_true", help="fewer lengths and repetitions")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--slow", type=float, default=2.0, help="calls slower than this (s) are timed once")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=40.0,
        help="skip longer lengths of a method once its next call is predicted above this (s)",
    )
    parser.add_argument("--no-memory", dest="memory", action="store_false")
    parser.add_argument("--no-sweep", dest="run_sweep", action="store_false")
    parser.add_argument("--no-decode", dest="run_decode", action="store_false")
    parser.add_argument("--no-e2e", dest="run_e2e", action="store_false")
    parser.add_argument("--decode-lengths", type=int, nargs="+", default=[512, 2048, 8192, 16384])
    parser.add_argument("--decode-reps", type=int, default=50)
    parser.add_argument("--e2e-lengths", type=int, nargs="+")
    parser.add_argument("--e2e-methods", nargs="+", default=["rfa", "kernel"], choices=LINEAR_METHODS)
    parser.add_argument("--e2e-reps", type=int, default=1)
    parser.add_argument("--compile", dest="run_compile", action="store_true", help="eager vs torch.compile section")
    parser.add_argument("--compile-methods", nargs="+", default=["rfa"], choices=LINEAR_METHODS)
    parser.add_argument("--compile-lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--tag", default="", help="suffix of the result files")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.lengths = args.lengths or (QUICK_LENGTHS if args.quick else FULL_LENGTHS)
    args.e2e_lengths = args.e2e_lengths or ([2048, 8192] if args.quick else [2048, 8192, 16384])
    if args.quick:
        args.reps, args.decode_reps = min(args.reps, 2), min(args.decode_reps, 20)
    args.modes = [m == "causal" for m in args.modes]
    args.passes = [p == "backward" for p in args.passes]
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.time()
    report = {
        "setup": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "B": B,
            "H": H,
            "D": D,
            "dtype": "float32",
            "hparams": HPARAMS,
            "load_average_at_start": os.getloadavg(),
            "memory": "peak live torch tensor bytes during one call (torch.profiler, profile_memory=True)",
        }
    }
    if args.run_sweep:
        report["sweep"] = sweep(args)
    if args.run_decode:
        report["decode"] = decode(args)
    if args.run_e2e:
        report["e2e"] = end_to_end(args)
    if args.run_compile:
        report["compile"] = compiled_vs_eager(args)
    report["setup"]["load_average_at_end"] = os.getloadavg()
    report["setup"]["wall_seconds"] = time.time() - started
    write(report, args)
    return report


def write(report: dict, args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    tag = f"_{args.tag}" if args.tag else ""
    setup = report["setup"]
    lines = [
        f"# hf_lara attention benchmark{(' (' + args.tag + ')') if args.tag else ''}",
        "",
        f"torch {setup['torch']}, {setup['threads']} threads on {setup['cpus']} CPUs, fp32, B={B}, H={H}, D={D}; "
        f"load average {setup['load_average_at_start'][0]:.1f} at start, {setup['load_average_at_end'][0]:.1f} at end "
        "(shared machine: absolute times are noisy, ratios come from side-by-side runs). Memory: "
        f"{setup['memory']}.",
        "",
        f"Hyper-parameters: {json.dumps(HPARAMS)}",
        "",
    ]
    if "sweep" in report:
        lines += sweep_tables(report["sweep"], args.methods) + scaling_lines(report["sweep"], args.methods)
        plot(report["sweep"], args.methods, args.out / f"attention{tag}.png")
    if "decode" in report:
        lines += decode_lines(report["decode"])
    if "e2e" in report:
        lines += e2e_lines(report["e2e"])
    if "compile" in report:
        lines += compile_lines(report["compile"])
    (args.out / f"attention{tag}.json").write_text(json.dumps(report, indent=1))
    (args.out / f"attention{tag}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
