"""Attention fidelity: how closely a converted model's attention outputs match exact softmax attention, per layer."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Compares vectors produced by an estimator (`predictions`) with the exact softmax vectors (`references`), typically
the attention output of one token in one layer, and groups the comparison by `layer`. For each layer, and over all
rows together, it reports

- the relative error sqrt(sum ||p - r||^2 / sum ||r||^2), 0 for a perfect match, 1 for predicting zeros;
- the mean cosine similarity between each prediction and its reference.

Feed it, for instance, the per-token attention outputs of a converted layer and of exact softmax computed on the same
queries, keys and values (so errors do not compound across layers), or the mean-pooled final hidden states of the
converted and the original model (one row per sequence) for the end-to-end embedding cosine.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): one estimated vector per row.
    references (`list` of `list` of `float`): the exact vector of each row, same length as its prediction.
    layer (`list` of `int`): the group (layer index) of each row; pass zeros for a single group.

Returns:
    relative_error (`float`): over all rows.
    cosine (`float`): mean over all rows.
    layers (`list` of `int`): the layer indices seen, sorted.
    per_layer_relative_error (`list` of `float`): one value per entry of `layers`.
    per_layer_cosine (`list` of `float`): one value per entry of `layers`.

Examples:
    >>> fidelity = evaluate.load("path/to/attention_fidelity.py")
    >>> fidelity.compute(predictions=[[1.0, 0.0], [0.0, 2.0]], references=[[1.0, 0.0], [0.0, 1.0]], layer=[0, 1])
    {'relative_error': 0.7071067811865476, 'cosine': 1.0, 'layers': [0, 1], 'per_layer_relative_error': [0.0, 1.0], 'per_layer_cosine': [1.0, 1.0]}
"""

_CITATION = ""


def as_matrix(rows) -> np.ndarray:
    """Rows (a 2-D array, or a sequence of 1-D arrays of one length) as a float64 matrix."""
    if isinstance(rows, np.ndarray) and rows.dtype != object:
        return rows.astype(np.float64).reshape(len(rows), -1)
    return np.stack([np.asarray(row, dtype=np.float64) for row in rows]) if len(rows) else np.zeros((0, 0))


def fidelity(predictions: np.ndarray, references: np.ndarray) -> tuple[float, float]:
    """(relative error, mean cosine) of matching rows."""
    error = np.sqrt(((predictions - references) ** 2).sum() / max((references**2).sum(), 1e-30))
    norms = np.linalg.norm(predictions, axis=-1) * np.linalg.norm(references, axis=-1)
    cosine = (predictions * references).sum(-1) / np.maximum(norms, 1e-30)
    return float(error), float(cosine.mean())


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class AttentionFidelity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Sequence(datasets.Value("float32")),
                    "layer": datasets.Value("int32"),
                }
            ),
        )

    def _compute(self, predictions, references, layer):
        predictions, references, layer = as_matrix(predictions), as_matrix(references), np.asarray(layer)
        if predictions.shape != references.shape:
            raise ValueError(
                f"Each prediction needs a reference of the same length; got shapes {predictions.shape} and "
                f"{references.shape}."
            )
        if len(predictions) == 0:
            raise ValueError("Attention fidelity of zero rows is undefined; add predictions first.")
        layers = sorted(int(i) for i in np.unique(layer))
        per_layer = [fidelity(predictions[layer == i], references[layer == i]) for i in layers]
        error, cosine = fidelity(predictions, references)
        return {
            "relative_error": error,
            "cosine": cosine,
            "layers": layers,
            "per_layer_relative_error": [e for e, _ in per_layer],
            "per_layer_cosine": [c for _, c in per_layer],
        }
