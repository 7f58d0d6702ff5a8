"""The evaluate modules bundled in `hf_lara/metrics/` load offline and agree with reference computations."""

from __future__ import annotations

import math

import evaluate
import numpy as np
import pytest

from hf_lara import metrics

RNG = np.random.default_rng(42)


def test_available_and_paths():
    assert metrics.available() == ["accuracy", "attention_fidelity", "f1", "perplexity"]
    for name in metrics.available():
        assert metrics.metric_path(name).endswith(f"{name}/{name}.py")
    with pytest.raises(ValueError, match="hf_lara bundles no metric named 'bleu'; bundled metrics: accuracy"):
        metrics.metric_path("bleu")


def test_load_through_evaluate_directly():
    module = evaluate.load(metrics.metric_path("accuracy"))
    assert module.compute(predictions=[1, 0, 1, 1], references=[1, 1, 1, 0]) == {"accuracy": 0.5}


def test_accuracy():
    accuracy = metrics.load("accuracy")
    assert accuracy.compute(predictions=[0, 1, 2, 0], references=[0, 1, 1, 1]) == {"accuracy": 0.5}
    assert accuracy.compute(predictions=[0, 1], references=[0, 0], normalize=False) == {"accuracy": 1}
    weighted = accuracy.compute(predictions=[0, 1], references=[0, 0], sample_weight=[3.0, 1.0])
    assert weighted == {"accuracy": 0.75}


@pytest.mark.parametrize("average", ["binary", "micro", "macro", "weighted", None])
def test_f1_matches_scikit_learn(average):
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    num_classes = 2 if average == "binary" else 4
    references, predictions = RNG.integers(0, num_classes, 50), RNG.integers(0, num_classes, 50)
    expected = sklearn_metrics.f1_score(references, predictions, average=average)
    got = metrics.load("f1").compute(predictions=predictions, references=references, average=average)["f1"]
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_f1_binary_refuses_many_classes():
    with pytest.raises(ValueError, match="`average='binary'` needs two classes"):
        metrics.load("f1").compute(predictions=[0, 1, 2], references=[0, 1, 2])


def test_perplexity_pools_tokens():
    perplexity = metrics.load("perplexity")
    perplexity.add_batch(nll=[2.0, 1.0], num_tokens=[2, 1])
    perplexity.add_batch(nll=[3.0], num_tokens=[3])
    result = perplexity.compute()
    assert result["loss"] == 1.0 and math.isclose(result["perplexity"], math.e)


def test_attention_fidelity():
    references = RNG.normal(size=(40, 8))
    noise = RNG.normal(size=(40, 8))
    layer = np.repeat([0, 1], 20)
    predictions = references + np.where(layer[:, None] == 0, 0.01, 0.5) * noise
    fidelity = metrics.load("attention_fidelity")
    fidelity.add_batch(predictions=predictions[:25], references=references[:25], layer=layer[:25])
    fidelity.add_batch(predictions=predictions[25:], references=references[25:], layer=layer[25:])
    result = fidelity.compute()
    assert result["layers"] == [0, 1]
    for i in (0, 1):
        p, r = predictions[layer == i], references[layer == i]
        error = np.sqrt(((p - r) ** 2).sum() / (r**2).sum())
        cosine = ((p * r).sum(-1) / np.linalg.norm(p, axis=-1) / np.linalg.norm(r, axis=-1)).mean()
        np.testing.assert_allclose(result["per_layer_relative_error"][i], error, rtol=1e-5)
        np.testing.assert_allclose(result["per_layer_cosine"][i], cosine, rtol=1e-5)
    assert result["per_layer_relative_error"][0] < 0.05 < result["per_layer_relative_error"][1]
    exact = metrics.load("attention_fidelity").compute(predictions=references, references=references, layer=layer)
    assert exact["relative_error"] == 0.0 and math.isclose(exact["cosine"], 1.0, rel_tol=1e-6)


def test_bundled_with_the_package():
    """setup.cfg ships the module files (they are data, not packages)."""
    from configparser import ConfigParser
    from pathlib import Path

    config = ConfigParser()
    config.read(Path(__file__).parents[2] / "setup.cfg")
    assert "metrics/*/*.py" in config["options.package_data"]["hf_lara"]
