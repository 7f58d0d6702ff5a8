"""F1: the harmonic mean of precision and recall (hf_lara's offline copy of the usual metric)."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
F1 = 2 * precision * recall / (precision + recall), with precision = TP / (TP + FP) and recall = TP / (TP + FN).
For several classes, `average` chooses how per-class scores combine: `binary` scores `pos_label` only, `micro` pools the
counts of all classes, `macro` averages the per-class F1, `weighted` averages them weighted by each class's support,
and `None` returns the per-class scores. A class with no predicted and no true example scores 0.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels.
    references (`list` of `int`): reference labels.
    labels (`list` of `int`, *optional*): the classes to score; defaults to every label seen, sorted.
    pos_label (`int`, *optional*, defaults to 1): the positive class for `average="binary"`.
    average (`str` or `None`, *optional*, defaults to `"binary"`): `binary`, `micro`, `macro`, `weighted` or None.
    sample_weight (`list` of `float`, *optional*): one weight per example.

Returns:
    f1 (`float`, or `list` of `float` when `average=None`): in [0, 1].

Examples:
    >>> f1 = evaluate.load("path/to/f1.py")
    >>> f1.compute(predictions=[0, 1, 1, 0], references=[0, 1, 0, 0])
    {'f1': 0.6666666666666666}
    >>> f1.compute(predictions=[0, 2, 1, 0], references=[0, 1, 2, 0], average="macro")
    {'f1': 0.3333333333333333}
"""

_CITATION = ""

AVERAGES = ("binary", "micro", "macro", "weighted", None)


def per_class_counts(predictions, references, labels, weights):
    """True positives, predicted positives and actual positives of each class in `labels`."""
    tp, predicted, actual = (np.zeros(len(labels)) for _ in range(3))
    for i, label in enumerate(labels):
        is_pred, is_true = predictions == label, references == label
        tp[i] = weights[is_pred & is_true].sum()
        predicted[i] = weights[is_pred].sum()
        actual[i] = weights[is_true].sum()
    return tp, predicted, actual


def f1_from_counts(tp, predicted, actual):
    """2 TP / (predicted + actual), which equals 2 P R / (P + R); 0 where both counts are 0."""
    denominator = predicted + actual
    return np.divide(2 * tp, denominator, out=np.zeros_like(tp, dtype=np.float64), where=denominator > 0)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, labels=None, pos_label=1, average="binary", sample_weight=None):
        if average not in AVERAGES:
            raise ValueError(f"`average` must be one of {AVERAGES}, got {average!r}.")
        predictions, references = np.asarray(predictions), np.asarray(references)
        weights = np.ones(len(predictions)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        if average == "binary":
            seen = set(np.unique(np.concatenate([predictions, references])).tolist())
            if len(seen - {0, 1, pos_label}) > 0:
                raise ValueError(
                    f"`average='binary'` needs two classes, got labels {sorted(seen)}; pass `average='macro'`, "
                    "'micro' or 'weighted' for several classes."
                )
            labels = [pos_label]
        elif labels is None:
            labels = np.unique(np.concatenate([predictions, references])).tolist()
        tp, predicted, actual = per_class_counts(predictions, references, labels, weights)
        if average == "micro":
            return {"f1": float(f1_from_counts(tp.sum(keepdims=True), predicted.sum(), actual.sum())[0])}
        scores = f1_from_counts(tp, predicted, actual)
        if average is None:
            return {"f1": scores.tolist()}
        if average == "weighted":
            return {"f1": float((scores * actual).sum() / actual.sum()) if actual.sum() > 0 else 0.0}
        return {"f1": float(scores.mean())}
