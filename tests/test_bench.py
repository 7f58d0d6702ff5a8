"""`hf_lara.bench` and `hf-lara bench`: op-level error and time of the estimators against exact attention."""

from __future__ import annotations

import json

import pytest

from hf_lara.bench import estimator_table, format_table
from hf_lara.cli import main


def test_table_rows():
    rows = estimator_table(["softmax", "rfa", "eva"], [37], heads=2, head_dim=8, repeats=1,
                           hparams={"eva": {"window_size": 37 * 2, "chunk_size": 2}})  # fmt: skip
    assert [(r["method"], r["mode"]) for r in rows] == [
        (m, mode) for mode in ("bidirectional", "causal") for m in ("softmax", "rfa", "eva")
    ]
    by = {(r["method"], r["mode"]): r for r in rows}
    for mode in ("bidirectional", "causal"):
        assert by["softmax", mode]["relative_mse"] < 1e-10  # the reference against itself
        assert by["eva", mode]["relative_mse"] < 1e-8  # a window covering the sequence is exact
        assert by["rfa", mode]["relative_mse"] > 1e-4
    assert all(r["ms"] > 0 and r["speedup"] == pytest.approx(r["softmax_ms"] / r["ms"]) for r in rows)
    table = format_table(rows)
    assert table.count("\n") == len(rows) + 1 and "| rfa | causal | 37 |" in table


def test_bad_mode():
    with pytest.raises(ValueError, match="modes"):
        estimator_table(["rfa"], [8], modes=["sideways"])


def test_cli(tmp_path, capsys):
    argv = ["bench", "--method", "softmax", "--method", "lara", "--lengths", "19,40", "--modes", "causal",
            "--heads", "2", "--head-dim", "8", "--repeats", "1", "--hparam", "lara.num_landmarks=4",
            "--threads", "1", "--json", str(tmp_path / "b.json")]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "H=2, D=8, 1 threads" in out and "| lara | causal | 40 |" in out
    rows = json.loads((tmp_path / "b.json").read_text())
    assert [(r["method"], r["length"]) for r in rows] == [("softmax", 19), ("lara", 19), ("softmax", 40), ("lara", 40)]
    assert main(["bench", "--hparam", "lara.num_landmarks", "--lengths", "8"]) == 2
    assert main(["bench", "--hparam", "nolara=3", "--lengths", "8"]) == 2
