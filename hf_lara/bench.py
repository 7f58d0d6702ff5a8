"""Op-level benchmark: error against exact attention and wall time of each estimator, methods x lengths x modes.

Inputs come from `hf_lara.attention.synthetic.clustered_qkv` (peaked, local attention like a trained model's), so
errors are not flattered by near-uniform attention. The reference is the `softmax` estimator, i.e. PyTorch's SDPA.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch

from .attention import build_attention
from .attention.synthetic import clustered_qkv
from .fidelity import relative_mse

MODES = ("bidirectional", "causal")


def time_call(fn: Callable[[], torch.Tensor], repeats: int = 2, warmup: bool = True) -> tuple[torch.Tensor, float]:
    """The output of `fn` and the best wall time of `repeats` calls, in seconds (after one untimed call)."""
    out = fn() if warmup else None
    best = float("inf")
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


def estimator_table(
    methods: Sequence[str],
    lengths: Sequence[int],
    *,
    heads: int = 12,
    head_dim: int = 64,
    repeats: int = 2,
    modes: Sequence[str] = MODES,
    hparams: Mapping[str, Mapping[str, Any]] | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Error against exact softmax and time of every estimator, one row per (length, mode, method).

    Args:
        methods (`Sequence[str]`): estimators to run.
        lengths (`Sequence[int]`): sequence lengths `N` (batch 1).
        heads, head_dim (`int`): `H` and `D` of the inputs.
        repeats (`int`, *optional*, defaults to 2): timed calls per measurement (the best counts), after a warm-up.
        modes (`Sequence[str]`, *optional*): `bidirectional` and/or `causal`.
        hparams (`dict`, *optional*): method -> hyper-parameters (defaults otherwise).
        progress (`bool`, *optional*): show a progress bar.

    Returns:
        Rows with `method`, `mode`, `length`, `relative_mse`, `ms`, `softmax_ms` and `speedup` (softmax time over
        the method's time).
    """
    bad = sorted(set(modes) - set(MODES))
    if bad:
        raise ValueError(f"`modes` must be among {', '.join(MODES)}, got {', '.join(bad)}.")
    hparams = hparams or {}
    steps = [(n, mode) for n in lengths for mode in modes]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(steps) * len(methods), desc="bench", leave=False)
    rows = []
    with torch.no_grad():
        for length, mode in steps:
            causal = mode == "causal"
            generator = torch.Generator().manual_seed(length)
            q, k, v = clustered_qkv(1, heads, length, head_dim, generator=generator)
            reference = build_attention("softmax", num_heads=heads, head_dim=head_dim)
            ref, ref_time = time_call(partial(reference, q, k, v, causal=causal), repeats)
            for method in methods:
                torch.manual_seed(0)
                attn = build_attention(method, num_heads=heads, head_dim=head_dim, **hparams.get(method, {})).eval()
                out, seconds = time_call(partial(attn, q, k, v, causal=causal), repeats)
                rows.append(
                    {
                        "method": method,
                        "mode": mode,
                        "length": length,
                        "relative_mse": relative_mse(out, ref),
                        "ms": 1000 * seconds,
                        "softmax_ms": 1000 * ref_time,
                        "speedup": ref_time / seconds,
                    }
                )
                if bar is not None:
                    bar.update()
    if bar is not None:
        bar.close()
    return rows


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of `estimator_table` rows."""
    lines = ["| method | mode | N | rel. MSE vs softmax | ms | speed-up vs softmax |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['mode']} | {r['length']} | {r['relative_mse']:.2e} | {r['ms']:.1f} | "
            f"{r['speedup']:.2f}x |"
        )
    return "\n".join(lines)
