"""`benchmarks/plot_fidelity_summary.py`: every row of the README's fidelity figure is in a shipped report, and a
report without it is refused by name."""

from __future__ import annotations

import json

import pytest

from .benchmark_scripts import load_benchmark


def test_every_row_is_in_its_report(tmp_path):
    plot = load_benchmark("plot_fidelity_summary")
    for regime, rows in plot.ROWS.items():
        for _, report, method in rows:
            row = plot.load_row(plot.RESULTS, report, method, regime)
            assert len(plot.series(row, "cosine")) == 3 and all(0 < c <= 1 for c in plot.series(row, "top1"))
    plot.main(["--output", str(tmp_path / "summary.png")])
    assert (tmp_path / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_missing_row_is_named(tmp_path):
    plot = load_benchmark("plot_fidelity_summary")
    (tmp_path / "report.json").write_text(json.dumps({"rows": [{"method": "eva", "regime": "long"}]}))
    with pytest.raises(ValueError, match="report.json holds 0 rows of rfa on long texts, expected one"):
        plot.load_row(tmp_path, "report.json", "rfa", "long")
