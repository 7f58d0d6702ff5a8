"""Perplexity of a language model from its summed token losses (no model is run by the metric itself)."""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Perplexity = exp(total negative log-likelihood / number of predicted tokens), the exponentiated mean token loss.
The metric takes, per example (a sequence or a block of tokens), the summed natural-log negative log-likelihood of
its predicted tokens and how many tokens were predicted, so sequences of any length pool exactly. It is the
aggregation step only: compute the losses with the model, e.g. `CrossEntropyLoss(reduction="sum")` over shifted labels.
"""

_KWARGS_DESCRIPTION = """
Args:
    nll (`list` of `float`): summed negative log-likelihood (natural log) of each example's predicted tokens.
    num_tokens (`list` of `int`): number of predicted tokens of each example.

Returns:
    perplexity (`float`): exp(sum(nll) / sum(num_tokens)).
    loss (`float`): sum(nll) / sum(num_tokens), the mean token loss.

Examples:
    >>> perplexity = evaluate.load("path/to/perplexity.py")
    >>> perplexity.compute(nll=[2.0, 4.0], num_tokens=[2, 4])
    {'perplexity': 2.718281828459045, 'loss': 1.0}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"nll": datasets.Value("float64"), "num_tokens": datasets.Value("int64")}),
        )

    def _compute(self, nll, num_tokens):
        total_tokens = int(np.sum(num_tokens))
        if total_tokens <= 0:
            raise ValueError("Perplexity needs at least one predicted token; `num_tokens` sums to 0.")
        loss = float(np.sum(np.asarray(nll, dtype=np.float64))) / total_tokens
        return {"perplexity": float(np.exp(loss)), "loss": loss}
