"""`benchmarks/bench_official.py` without the official code: the skip path, the table and the result files."""

from __future__ import annotations

import json
import mmap

import torch

from .benchmark_scripts import load_benchmark


def _load():
    return load_benchmark("bench_official")


def test_skips_in_one_line_without_the_official_code(tmp_path, monkeypatch, capsys):
    bench = _load()
    monkeypatch.delenv(bench.ENV_VAR, raising=False)
    assert bench.main(["--out", str(tmp_path)]) == 0
    monkeypatch.setenv(bench.ENV_VAR, str(tmp_path / "nowhere"))
    assert bench.main(["--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(line.startswith("skipped:") for line in lines)
    assert list(tmp_path.iterdir()) == []


def test_table_and_result_files(tmp_path):
    bench = _load()
    rows = [
        {"method": "lara", "causal": False, "N": 4096, "official_ms": 30.0, "ours_ms": 12.0, "speedup": 2.5,
         "speedup_median": 2.25, "max_abs_diff": 3e-8, "same_estimator": True, "err_official": 0.3, "err_ours": 0.3},
        {"method": "eva", "causal": True, "N": 4096, "official_ms": 40.0, "ours_ms": 20.0, "speedup": 2.0,
         "max_abs_diff": 0.4, "same_estimator": False, "err_official": 1.0, "err_ours": 0.2},
    ]  # fmt: skip
    md_path, json_path = bench.write_results(rows, tmp_path, {"threads": 2})
    md = md_path.read_text()
    assert "| lara | 4096 | no | 30.0 | 12.0 | 2.50x | 2.25x | 3.00e-08 |" in md
    assert "| eva | 4096 | yes |" in md and "(other estimator)" in md and "threads=2" in md
    assert json.loads(json_path.read_text())["rows"] == rows
    assert sorted(p.name for p in tmp_path.iterdir()) == ["official.json", "official.md"]


def test_rearrange_stand_in_matches_reshapes():
    bench = _load()
    x = torch.arange(2 * 3 * 12 * 5).reshape(2, 3, 12, 5)
    windows = bench._rearrange(x, "... (g w) d -> ... g w d", w=4)
    assert torch.equal(windows, x.reshape(2, 3, 3, 4, 5))
    assert torch.equal(bench._rearrange(windows, "... g w d ->... (g w) d"), x)
    assert bench._rearrange(torch.arange(4), "j -> 1 j").shape == (1, 4)
    assert bench._rearrange(torch.ones(3, 4, 1), "i j 1 -> i j").shape == (3, 4)


def _touch_fresh_pages(size: int = 64 * 2**20) -> None:
    """Map `size` bytes of new anonymous memory and write one byte per page."""
    buffer = mmap.mmap(-1, size)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        buffer.madvise(mmap.MADV_NOHUGEPAGE)
    for offset in range(0, size, mmap.PAGESIZE):
        buffer[offset] = 1
    buffer.close()


def test_fresh_memory_column():
    """`fresh MB` counts the pages first touched by one call: a new 64 MiB anonymous mapping written page by page
    (small pages asked for, so each page is one fault whatever the allocator or transparent huge pages do)."""
    bench = _load()
    mib = bench.fresh_memory_mb(_touch_fresh_pages)
    assert mib != mib or 48.0 < mib < 80.0  # nan where `resource` is missing
    row = {"method": "lara", "causal": False, "N": 4096, "official_ms": 30.0, "ours_ms": 12.0, "speedup": 2.5,
           "max_abs_diff": 3e-8, "same_estimator": True, "err_official": 0.3, "err_ours": 0.3,
           "fresh_mb_official": 84.0, "fresh_mb_ours": 0.0}  # fmt: skip
    assert bench.format_table([row]).splitlines()[-1].endswith("| 0.300 | 0.300 | 84.0 | 0.0 |")
