"""`benchmarks/bench_hybrid.py`: each configuration converts the layers it names, with their own budgets."""

from __future__ import annotations

import json

from .benchmark_scripts import load_benchmark


def test_configurations_convert_what_they_name():
    bench = load_benchmark("bench_hybrid")
    configs = bench.parse_configs(bench.DEFAULT_CONFIGS)
    assert list(configs) == ["sdpa", *(item.partition("=")[0] for item in bench.DEFAULT_CONFIGS)]
    assert not hasattr(bench.build(configs["sdpa"], 64), "lara_estimators")
    for kwargs in filter(None, configs.values()):
        model = bench.build(kwargs, 64)
        converted = kwargs.get("layers", list(range(6)))
        assert sorted(model.lara_estimators()) == converted
        assert model.config.lara_layer_hparams == kwargs.get("layer_hparams", {})
        for layer, estimator in model.lara_estimators().items():
            expected = {**kwargs, **kwargs.get("layer_hparams", {}).get(str(layer), {})}
            assert estimator.window_size == expected["window_size"]
            assert getattr(estimator, "num_chunks", None) == expected.get("num_chunks")
            if expected["method"] == "kernel":
                assert estimator.num_features == expected.get("num_features", 32)


def test_table_gives_the_speed_up_over_sdpa():
    bench = load_benchmark("bench_hybrid")
    rows = [{"config": c, "N": n, "seconds": s} for c, n, s in [("sdpa", 8, 2.0), ("x", 8, 0.5)]]
    assert bench.table(rows, ["sdpa", "x"], [8])[-1] == "| x | 0.500 (4.00x) |"
    assert json.loads(bench.DEFAULT_CONFIGS[0].partition("=")[2])["method"] == "eva"
