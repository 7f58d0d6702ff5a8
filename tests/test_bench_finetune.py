"""The pure helpers of `benchmarks/bench_finetune.py`: the paired statistic, McNemar's exact test, per-passage
correctness in test order, the hyper-parameters of each method and the refusals of bad flags."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from .benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_finetune")


def test_paired_matches_a_hand_computed_example(bench):
    # d = other - reference = [0, -1, -1, 1, 0, 0]: mean -1/6; sum of squared deviations 3/36 + 2 * 25/36 + 49/36
    # = 17/6, sample variance 17/30, standard error sqrt(17/30 / 6) = sqrt(17/180)
    reference = [True, True, True, False, False, True]
    other = [True, False, False, True, False, True]
    out = bench.paired(reference, other)
    assert out["n"] == 6
    assert out["difference_points"] == pytest.approx(-100 / 6)
    assert out["paired_se_points"] == pytest.approx(100 * math.sqrt(17 / 180))
    d = [int(b) - int(a) for a, b in zip(reference, other, strict=True)]
    assert out["paired_se_points"] == pytest.approx(100 * statistics.stdev(d) / math.sqrt(len(d)))
    assert (out["only_reference_right"], out["only_other_right"], out["both_right"]) == (2, 1, 2)
    assert out["mcnemar_p"] == pytest.approx(1.0)  # n = 3, min 1: 2 * (1 + 3) / 8 = 1


def test_paired_of_identical_predictions_has_no_difference_and_no_spread(bench):
    flags = [True, False, True, True]
    out = bench.paired(flags, list(flags))
    assert out["difference_points"] == 0 and out["paired_se_points"] == 0 and out["mcnemar_p"] == 1.0


@pytest.mark.parametrize(
    "only_a, only_b, expected",
    [
        (0, 0, 1.0),
        (0, 5, 2 / 32),  # 2 * C(5, 0) / 2^5
        (9, 1, 2 * 11 / 1024),  # 2 * (C(10, 0) + C(10, 1)) / 2^10
        (3, 10, 2 * (1 + 13 + 78 + 286) / 8192),  # 2 * sum_{i <= 3} C(13, i) / 2^13
        (6, 6, 1.0),  # 2 * 2510 / 4096 > 1, capped
    ],
)
def test_mcnemar_exact_against_hand_computed_tails(bench, only_a, only_b, expected):
    assert bench.mcnemar_exact(only_a, only_b) == pytest.approx(expected)
    assert bench.mcnemar_exact(only_b, only_a) == pytest.approx(expected)


def test_paired_and_mcnemar_refuse_bad_input(bench):
    with pytest.raises(ValueError, match="same length"):
        bench.paired([True, False], [True])
    with pytest.raises(ValueError, match=">= 0"):
        bench.mcnemar_exact(-1, 2)


class _FirstTokenClassifier(torch.nn.Module):
    """Predicts class `input_ids[:, 0] % 4` whatever the padding, like a classifier reading [CLS]."""

    def forward(self, input_ids, attention_mask):
        logits = torch.nn.functional.one_hot(input_ids[:, 0] % 4, 4).float()
        return type("Out", (), {"logits": logits})()


def test_correct_is_in_the_order_of_the_test_list(bench):
    # lengths deliberately out of order, so the length-sorted evaluation has to put answers back in place
    test = [{"input_ids": [first] + [7] * length, "label": label} for first, length, label in
            [(1, 9, 1), (2, 1, 3), (3, 5, 3), (0, 12, 0), (5, 2, 2), (6, 7, 2), (4, 3, 1)]]  # fmt: skip
    expected = [x["input_ids"][0] % 4 == x["label"] for x in test]
    assert bench.correct(_FirstTokenClassifier(), test, pad_id=0, batch_size=3) == expected
    assert bench.bits(expected) == "1011010"


def test_method_hparams_sinks_for_all_then_overrides(bench):
    out = bench.method_hparams(["eva", "kernel"], 4, {"eva": {"num_chunks": 32}})
    assert out["eva"] == {**bench.METHODS["eva"], "sink_tokens": 4, "num_chunks": 32}
    assert out["kernel"] == {**bench.METHODS["kernel"], "sink_tokens": 4}
    assert bench.method_hparams(["kernel"], None, {})["kernel"] == bench.METHODS["kernel"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "eva,softmax"], "unknown method 'softmax'; choose from eva, kernel, lara, rfa"),
        (["--hparam", "kernel.window_size=32"], "names method 'kernel', which is not run"),
        (["--hparam", "eva.window_size=wide"], "`window_size` must be an integer, got 'wide'"),
        (["--hparam", "eva.colour=red"], "Unknown hyper-parameter 'colour' for method `eva`"),
        (["--hparam", "window_size=32"], "`--hparam` takes METHOD.KEY=VALUE"),
        (["--sink_tokens", "-1"], "`--sink_tokens` must be >= 0, got -1"),
        (["--methods", "", "--original", "a.json"], "`--methods` must name at least one method"),
    ],
)
def test_bad_flags_are_one_clear_error(bench, capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        bench.main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_table_shows_the_paired_difference(bench):
    lengths = {"test": {"min": 300, "max": 400, "median": 350.0, "min_share_keys_outside_window": 1 - 64 / 300}}
    args = type("Args", (), {"steps": 30, "batch_size": 8, "lr": 1e-4, "seed": 0})()
    finetune = {"loss_first": 1.4, "loss_last": 0.5, "minutes": 2.0, "cpu_minutes": 1.5}
    reference, other = [True, True, True, False, False, True], [True, False, False, True, False, True]
    rows = [
        {"model": "original (softmax)", "accuracy": 4 / 6, "correct": bench.bits(reference), "finetune": finetune},
        {"model": "eva", "hparams": {"window_size": 64}, "distilled": True, "accuracy": 3 / 6,
         "correct": bench.bits(other), "finetune": finetune, "paired": bench.paired(reference, other),
         "distill": {"1": {"minutes": 1.0, "cpu_minutes": 0.5}, "2": {"minutes": 2.0, "cpu_minutes": 1.5}}},
    ]  # fmt: skip
    lines = bench.table(rows, lengths, args).splitlines()
    assert lines[0].startswith("Test passages: 6, 300-400 tokens")
    se = 100 * math.sqrt(17 / 180)
    assert f"| -16.7 +- {se:.1f} | 2 / 1 | 1 |" in lines[-1]
    assert "| yes (3.0 / 2.0) |" in lines[-1]
    assert f"| 66.7 % +- {100 * math.sqrt(4 / 6 * 2 / 6 / 6):.1f} |" in lines[-2]


def test_original_row_is_read_only_from_the_same_task(bench, tmp_path):
    expected = {"train": 8, "test_labels": "0123", "data": {"low": 256}, "hparams": {"steps": 30, "lr": 1e-4}}
    row = {"model": "original (softmax)", "accuracy": 0.5, "correct": "1010"}
    conditions = {**expected, "hparams": {"steps": 30, "lr": 1e-4, "distill_minutes": 3.0}}
    (tmp_path / "a.json").write_text(json.dumps({"conditions": conditions, "rows": [row]}))
    assert bench.original_row(tmp_path / "a", expected, wait_minutes=0) == {**row, "from": str(tmp_path / "a.json")}
    other = {**conditions, "test_labels": "0122"}
    (tmp_path / "b.json").write_text(json.dumps({"conditions": other, "rows": [row]}))
    with pytest.raises(SystemExit, match="another task or setting: test_labels is '0122', here '0123'"):
        bench.original_row(tmp_path / "b.json", expected, wait_minutes=0)
    with pytest.raises(SystemExit, match="holds no original row after 0 minutes"):
        bench.original_row(tmp_path / "missing.json", expected, wait_minutes=0, poll_seconds=0)
