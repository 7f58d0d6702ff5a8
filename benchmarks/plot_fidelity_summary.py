"""The README's fidelity figure: embedding cosine and top-1 nearest-neighbour agreement of the README's table rows,
fresh -> after stage 1 -> after stage 2, read from the `bench_fidelity.py` JSON reports in `results/`.

    python benchmarks/plot_fidelity_summary.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
STAGES = ("fresh", "stage1", "stage2")
#: regime -> (label, report, method): one `bench_fidelity.py` row each, the rows of the README's fidelity table
ROWS = {
    "long": [
        ("eva, 128 chunks, layer 5: 256", "fidelity_round11_eva_l5.json", "eva"),
        ("eva, 128 chunks", "fidelity_round9_c128.json", "eva"),
        ("rfa, 64 learned features", "fidelity_round9_rfa.json", "rfa"),
        ("kernel (hedgehog)", "fidelity_round10_kernel.json", "kernel"),
        ("eva, layer 5 on softmax (hybrid)", "fidelity_round10_eva_keep1.json", "eva"),
        ("kernel, layer 5 on softmax (hybrid)", "fidelity_round10_kernel_keep1.json", "kernel"),
    ],
    "short": [
        ("eva, 8 chunks", "fidelity_round9_short.json", "eva"),
        ("rfa, 64 learned features", "fidelity_round8_short.json", "rfa"),
        ("kernel (hedgehog)", "fidelity_round8_short.json", "kernel"),
        ("eva, layer 5 on softmax (hybrid)", "fidelity_round10_eva_short_keep1.json", "eva"),
        ("kernel, layer 5 on softmax (hybrid)", "fidelity_round10_kernel_short_keep1.json", "kernel"),
    ],
}
COLORS = {"eva": "tab:blue", "rfa": "tab:green", "kernel": "tab:red"}
TITLES = {"long": "documents of 295-510 tokens, window 64", "short": "sentences of 24-62 tokens, window 16"}
#: the targets of the README: (cosine, top-1)
TARGETS = {"long": (0.98, 0.80), "short": (0.99, 0.90)}


def load_row(results: Path, report: str, method: str, regime: str) -> dict:
    """The row of `method` and `regime` in a `bench_fidelity.py` report; an error naming what is missing."""
    rows = json.loads((results / report).read_text())["rows"]
    found = [r for r in rows if r["method"] == method and r["regime"] == regime]
    if len(found) != 1:
        raise ValueError(f"{report} holds {len(found)} rows of {method} on {regime} texts, expected one.")
    return found[0]


def series(row: dict, metric: str) -> list[float]:
    """`metric` at each stage of `row`."""
    return [row[stage][metric] for stage in STAGES]


def plot(results: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5), dpi=100, sharex=True)
    for column, (regime, rows) in enumerate(ROWS.items()):
        for label, report, method in rows:
            row = load_row(results, report, method, regime)
            style = "--" if "hybrid" in label else "-." if label == "eva, 128 chunks" else "-"
            for line, metric in enumerate(("cosine", "top1")):
                ax = axes[line, column]
                ax.plot(STAGES, series(row, metric), style, color=COLORS[method], marker="o", label=label)
        for line, (name, target) in enumerate(zip(("embedding cosine", "top-1 NN agreement"), TARGETS[regime])):
            ax = axes[line, column]
            ax.axhline(target, color="grey", ls=":", lw=1)
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
        axes[0, column].set_title(f"all-MiniLM-L6-v2, {TITLES[regime]}")
        axes[1, column].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--output", default=str(RESULTS / "fidelity_summary.png"))
    args = parser.parse_args(argv)
    plot(Path(args.results), Path(args.output))
    print(f"-> {args.output}")


if __name__ == "__main__":
    main()
