"""Evaluate metric modules shipped inside hf_lara, so that recipes and tests load them without the Hub.

`evaluate.load("accuracy")` fetches its module from the Hub; a local module file loads offline. Each folder here holds
one such module (`<name>/<name>.py`): `accuracy`, `f1`, `perplexity` and hf_lara's own `attention_fidelity`.

>>> from hf_lara import metrics
>>> metrics.available()
['accuracy', 'attention_fidelity', 'f1', 'perplexity']
>>> metrics.load("accuracy").compute(predictions=[0, 1, 1], references=[0, 1, 0])
{'accuracy': 0.6666666666666666}
>>> import evaluate
>>> f1 = evaluate.load(metrics.metric_path("f1"))  # the same module through `evaluate` directly
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: Folder holding one sub-folder per bundled metric module.
METRICS_DIR = Path(__file__).resolve().parent

__all__ = ["METRICS_DIR", "available", "load", "metric_path"]


def available() -> list[str]:
    """Names of the bundled metric modules, sorted."""
    return sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())


def metric_path(name: str) -> str:
    """Path of the bundled module `name`, for `evaluate.load(path)`.

    Args:
        name (`str`): one of `available()`.

    Returns:
        `str`: the path of `<name>/<name>.py`.
    """
    names = available()
    if name not in names:
        raise ValueError(
            f"hf_lara bundles no metric named {name!r}; bundled metrics: {', '.join(names)}. Other metrics need "
            "`evaluate.load(name)` with Hub access, or a local module file."
        )
    return str(METRICS_DIR / name / f"{name}.py")


def load(name: str, **kwargs: Any):
    """`evaluate.load` of a bundled module, offline.

    Args:
        name (`str`): one of `available()`.
        **kwargs: passed to `evaluate.load` (`config_name`, `experiment_id`, ...). `keep_in_memory` defaults to True:
            recipes gather predictions on every process with `accelerator.gather_for_metrics` and compute there,
            so no cache file needs sharing between processes.

    Returns:
        `evaluate.EvaluationModule`: the loaded metric.
    """
    import evaluate

    kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(metric_path(name), **kwargs)
