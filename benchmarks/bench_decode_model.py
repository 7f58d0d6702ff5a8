"""Decode-step latency of a converted GPT-2-shaped decoder vs context length: state cache, KV cache, original SDPA.

One generation step = one `model(next_token, cache=cache, use_cache=True)` call (`past_key_values=` before
Transformers 5.24) with the 2-D attention mask over the whole context, as `generate()` makes it. Variants, all with the same random weights:

* `sdpa (KV)`: the original model (`attn_implementation="sdpa"`) over its `DynamicCache`;
* `<method> (KV)`: the converted model over a `DynamicCache` (the estimator re-reads every cached key each step);
* `<method> (state)`: the converted model over a `LaraCache` (constant-size `LinearState` per layer);
* `<method> w<W>[ + <G> sinks] (state)`: the window hybrid (`--window W`, `--sinks G ...`) over a `LaraCache`
  (constant-size `WindowState` per layer); its KV path (the blocked forward over every cached key) is not run.

Model: GPT-2 shapes (768 hidden, 12 heads, 3072 MLP) with 4 layers and a 4096-token vocabulary, so that the fixed
per-token work (MLPs, LM head) does not hide the attention cost; `n_positions` covers the longest context. The
context is built by chunked prefill (`--prefill-chunk` tokens per forward, through the same cache) and extended from
one length to the next, so a 16k context costs one pass over 16k tokens per variant. Each step is timed
`--steps` times after one warm-up step (the context grows by those few tokens); the median is reported. The
variants' steps are interleaved (step `i` of every variant, then step `i + 1`), so that all see the same machine
load; the load average is written with the table. Interleaving has a cost of its own: between two steps of a
state variant the SDPA variant reads its whole KV cache (97 MiB at 4k), which evicts the other models' weights from
the CPU caches, so every variant's step grows somewhat with the context although its state does not (a model
stepped alone takes the same time at 512 and 4k, `results/decode_window_model_r4.md`); compare within a column.
Steps run on `--threads` threads (default 1: a one-token step is latency-bound, and on a shared 2-core machine
every parallel op of a 2-thread step waits for a descheduled worker, ~6 ms each); prefill uses all threads.

Usage::

    python benchmarks/bench_decode_model.py                 # 512 / 2k / 8k / 16k, writes results/decode_model.md
    python benchmarks/bench_decode_model.py --lengths 512 2048 --methods rfa
    python benchmarks/bench_decode_model.py --lengths 512 4096 --no-kv --sinks 0 4 --out results/decode_window.md
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache

import hf_lara
from hf_lara.integration.compat import CACHE_KWARG

RESULTS = Path(__file__).resolve().parent / "results"
HPARAMS = {"rfa": {"num_features": 64}, "kernel": {}, "lara": {"num_landmarks": 64}}


def build_base(max_context: int, layers: int, vocab: int) -> transformers.GPT2LMHeadModel:
    """A random GPT-2-shaped model (768 hidden, 12 heads) with room for `max_context` positions, SDPA attention."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=vocab, n_positions=max_context + 256, n_embd=768, n_layer=layers, n_head=12, bos_token_id=0, eos_token_id=0,
        attn_implementation="sdpa",
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).eval()


def variants(
    base: torch.nn.Module, methods: list[str], window: int = 0, sinks: tuple[int, ...] = (), kv: bool = True
) -> dict[str, tuple[torch.nn.Module, type]]:
    """Name -> (model, cache class): the SDPA original, then each method over a KV cache (`kv`) and over its
    state, then its window hybrids (`window > 0`, one per sink count) over their state."""
    out = {"sdpa (KV)": (base, DynamicCache)}
    for method in methods:
        model = hf_lara.convert(copy.deepcopy(base), method, **HPARAMS.get(method, {}))
        if kv:
            out[f"{method} (KV)"] = (model, DynamicCache)
        out[f"{method} (state)"] = (model, hf_lara.LaraCache)
        for g in sinks if window else ():
            hybrid = hf_lara.convert(
                copy.deepcopy(base), method, window_size=window, sink_tokens=g, **HPARAMS.get(method, {})
            )
            out[f"{method} w{window}" + (f" + {g} sinks" if g else "") + " (state)"] = (hybrid, hf_lara.LaraCache)
    return out


def new_cache(model: torch.nn.Module, cache_class: type):
    return cache_class(model) if cache_class is hf_lara.LaraCache else DynamicCache(config=model.config)


@torch.no_grad()
def extend(model: torch.nn.Module, cache, length: int, chunk: int, vocab: int) -> None:
    """Prefill `cache` with random tokens until it holds `length` tokens, `chunk` tokens per forward."""
    g = torch.Generator().manual_seed(length)
    while (seen := cache.get_seq_length()) < length:
        n = min(chunk, length - seen)
        ids = torch.randint(vocab, (1, n), generator=g)
        model(input_ids=ids, attention_mask=torch.ones(1, seen + n, dtype=torch.long), **{CACHE_KWARG: cache})


@torch.no_grad()
def one_step(model: torch.nn.Module, cache, token: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Wall time of one decoding step of `token` `(1, 1)` and the next (greedy) token."""
    mask = torch.ones(1, cache.get_seq_length() + 1, dtype=torch.long)
    start = time.perf_counter()
    logits = model(input_ids=token, attention_mask=mask, use_cache=True, **{CACHE_KWARG: cache}).logits
    return time.perf_counter() - start, logits[:, -1:].argmax(-1)


def step_seconds(runs: dict[str, tuple[torch.nn.Module, object]], steps: int, threads: int) -> dict[str, float]:
    """Median wall time per variant of one decoding step (after one warm-up step) at its cache's current
    context, the variants interleaved step by step."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    tokens = {name: torch.zeros(1, 1, dtype=torch.long) for name in runs}
    prefill_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    for i in range(steps + 1):
        for name, (model, cache) in runs.items():
            elapsed, tokens[name] = one_step(model, cache, tokens[name])
            if i:
                times[name].append(elapsed)
    torch.set_num_threads(prefill_threads)
    return {name: statistics.median(t) for name, t in times.items()}


def cache_bytes(cache) -> int:
    if isinstance(cache, hf_lara.LaraCache):
        return cache.nbytes()
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers if layer.is_initialized)


def run(lengths: list[int], models: dict[str, tuple[torch.nn.Module, type]], steps: int, chunk: int, vocab: int,
        threads: int) -> dict:  # fmt: skip
    """`{variant: {length: (seconds per step, cache bytes)}}`; lengths in increasing order, one cache per variant."""
    runs = {name: (model, new_cache(model, cache_class)) for name, (model, cache_class) in models.items()}
    results: dict[str, dict[int, tuple[float, int]]] = {name: {} for name in runs}
    for length in sorted(lengths):
        for name, (model, cache) in runs.items():
            start = time.perf_counter()
            extend(model, cache, length, chunk, vocab)
            print(f"{name:>28} prefill to N={length}: {time.perf_counter() - start:6.1f} s", flush=True)
        print(f"load average before the steps at N={length}: {load()}", flush=True)
        for name, seconds in step_seconds(runs, steps, threads).items():
            results[name][length] = (seconds, cache_bytes(runs[name][1]))
            print(f"{name:>28} N={length:>6}: step {1e3 * seconds:8.2f} ms", flush=True)
    return results


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def label(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def markdown(results: dict, lengths: list[int], header: str) -> str:
    """Step time (ms) per variant and length, the ratio to the shortest context, and the cache size at the longest."""
    lengths = sorted(lengths)
    first, last = lengths[0], lengths[-1]
    cols = [f"N = {label(n)}" for n in lengths] + [f"{label(last)} / {label(first)}", f"cache at {label(last)}"]
    lines = [header, "", "| variant | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in results.items():
        times = [f"{1e3 * row[n][0]:.2f}" for n in lengths]
        ratio = row[last][0] / row[first][0]
        lines.append(f"| {name} | " + " | ".join(times) + f" | {ratio:.2f}x | {row[last][1] / 2**20:.1f} MiB |")
    hybrids = [name for name in results if " w" in name]
    if hybrids:
        cols = [f"N = {label(n)}" for n in lengths]
        lines += ["", "Window hybrid step / the same method's step without window (same run, interleaved):", ""]
        lines += ["| variant | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for name in hybrids:
            plain = results[name.split(" w")[0] + " (state)"]
            ratios = [f"{results[name][n][0] / plain[n][0]:.2f}x" for n in lengths]
            lines.append(f"| {name} | " + " | ".join(ratios) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192, 16384])
    parser.add_argument("--methods", nargs="+", default=["rfa", "kernel", "lara"])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--prefill-chunk", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1, help="threads of the timed steps (prefill uses all)")
    parser.add_argument("--window", type=int, default=0, help="also the window hybrid with this W (0: none)")
    parser.add_argument("--sinks", type=int, nargs="+", default=[0], help="sink tokens of the window variants")
    parser.add_argument("--no-kv", action="store_true", help="skip the estimators' KV-cache variants")
    parser.add_argument("--out", type=Path, default=RESULTS / "decode_model.md")
    args = parser.parse_args()
    base = build_base(max(args.lengths), args.layers, args.vocab)
    models = variants(base, args.methods, args.window, tuple(args.sinks), not args.no_kv)
    start_load = load()
    results = run(args.lengths, models, args.steps, args.prefill_chunk, args.vocab, args.threads)
    header = (
        f"Decode step (ms, median of {args.steps}) of a GPT-2-shaped decoder ({args.layers} layers, 768 hidden, "
        f"12 heads, vocab {args.vocab}, random weights), B=1, fp32, CPU (steps on {args.threads} thread(s), "
        f"prefill on {torch.get_num_threads()}), "
        f"torch {torch.__version__}, transformers {transformers.__version__}. Context built by chunked prefill "
        f"({args.prefill_chunk} tokens per forward). Methods: "
        + ", ".join(f"{m} {HPARAMS.get(m) or '(defaults)'}" for m in args.methods)
        + f". Variants' steps interleaved; load average (1/5/15 min) {start_load} at start, {load()} at end."
    )
    table = markdown(results, args.lengths, header)
    print("\n" + table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
