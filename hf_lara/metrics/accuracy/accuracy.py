"""Accuracy: the fraction of predictions equal to their reference (hf_lara's offline copy of the usual metric)."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Accuracy is the share of examples whose predicted label equals the reference label:
accuracy = (number of correct predictions) / (number of predictions). With `sample_weight` each example counts with
its weight; with `normalize=False` the (weighted) count of correct predictions is returned instead of the share.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels.
    references (`list` of `int`): reference labels.
    normalize (`bool`, *optional*, defaults to `True`): return the share (True) or the count (False) of correct
        predictions.
    sample_weight (`list` of `float`, *optional*): one weight per example.

Returns:
    accuracy (`float` or `int`): in [0, 1] with `normalize=True`, else the (weighted) count of correct predictions.

Examples:
    >>> accuracy = evaluate.load("path/to/accuracy.py")
    >>> accuracy.compute(predictions=[0, 1, 2, 0], references=[0, 1, 1, 1])
    {'accuracy': 0.5}
    >>> accuracy.compute(predictions=[0, 1], references=[0, 0], normalize=False)
    {'accuracy': 1}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        predictions, references = np.asarray(predictions), np.asarray(references)
        correct = (predictions == references).astype(np.float64)
        weights = np.ones_like(correct) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        if weights.shape != correct.shape:
            raise ValueError(f"`sample_weight` needs one weight per example ({correct.size}), got {weights.size}.")
        total = float((correct * weights).sum())
        if not normalize:
            return {"accuracy": int(total) if sample_weight is None else total}
        if weights.sum() == 0:
            raise ValueError("Accuracy of zero examples (or zero total weight) is undefined.")
        return {"accuracy": total / float(weights.sum())}
