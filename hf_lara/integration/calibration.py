"""Calibration: measure each converted layer's attention error on sample inputs; keep the worst layers on softmax.

`measure_layer_errors` runs the model once per batch under the `hf_lara_calibrate` attention implementation. Every
self-attention call computes the exact softmax output (the teacher, through Transformers' SDPA) and, in converted
layers, the estimator's output from the *same* queries, keys and values; it accumulates the squared error and hands
the teacher's output on. So each layer is measured on the hidden states of the original model, its own error only:

    error_l = sum_(real tokens) ||estimate_l - softmax_l||^2 / sum_(real tokens) ||softmax_l||^2

`keep_worst_on_softmax` (used by `convert(..., keep_softmax=K, calibration=...)`) removes the estimators of the `K`
layers with the largest error, which then run exact softmax, and records the measurement on the model as
`model.lara_calibration` (a `CalibrationReport`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel

from .attention import ESTIMATOR_ATTR, lara_attention_forward, lara_padding_mask, softmax_fallback
from .registry import get_family

#: Attention implementation used while measuring: teacher output forward, estimator error accumulated.
CALIBRATION_KEY = "hf_lara_calibrate"
#: Attribute holding a layer's `[error, reference]` sums during a measurement.
SINK_ATTR = "_hf_lara_calibration_sink"


@dataclass
class CalibrationReport:
    """Per-layer attention error measured on calibration inputs, and the layers left on softmax because of it.

    Attributes:
        method (`str`): the estimator measured.
        errors (`dict[int, float]`): relative squared error of each measured layer's attention output.
        kept_softmax (`list[int]`): layers whose estimator was removed (the largest errors), worst first.
        num_tokens (`int`): real tokens measured.
    """

    method: str
    errors: dict[int, float]
    kept_softmax: list[int]
    num_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line per layer: its error, and whether it was kept on softmax."""
        lines = [f"{self.method}: attention error per layer on {self.num_tokens} calibration tokens"]
        for layer, error in sorted(self.errors.items()):
            mark = "  -> kept on softmax (largest errors)" if layer in self.kept_softmax else ""
            lines.append(f"  layer {layer:3d}: {error:.4f}{mark}")
        return "\n".join(lines)


def calibration_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """`AttentionInterface` function of `CALIBRATION_KEY`: exact softmax out `(B, Nq, H, D)`; where the module has an
    estimator and a sink, the estimator's squared error against it (real query rows only) is added to the sink."""
    causal = kwargs.pop("is_causal", None)
    causal = bool(getattr(module, "is_causal", False) if causal is None else causal)
    teacher = softmax_fallback(module, query, key, value, attention_mask, causal, scaling, 0.0, **kwargs)[0]
    sink = getattr(module, SINK_ATTR, None)
    if sink is not None and hasattr(module, ESTIMATOR_ATTR):
        student = lara_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, is_causal=causal, **kwargs
        )[0]
        Nq = query.shape[2]
        rows = torch.ones(query.shape[0], Nq, dtype=torch.bool, device=query.device)
        if attention_mask is not None:
            rows = attention_mask[:, -Nq:].bool()
        t, s = teacher[rows].double(), student[rows].double()  # (tokens, H, D)
        sink[0] += (s - t).square().sum().item()
        sink[1] += t.square().sum().item()
    return teacher, None


def register_calibration_attention() -> None:
    """Register `CALIBRATION_KEY` (idempotent); it takes hf_lara's 2-D padding masks."""
    AttentionInterface.register(CALIBRATION_KEY, calibration_attention)
    AttentionMaskInterface.register(CALIBRATION_KEY, lara_padding_mask)


@contextlib.contextmanager
def _measuring(model: PreTrainedModel, modules: Sequence[nn.Module]) -> Iterator[dict[int, list[float]]]:
    sinks = {i: [0.0, 0.0] for i, m in enumerate(modules) if hasattr(m, ESTIMATOR_ATTR)}
    previous, training = model.config._attn_implementation, model.training
    for i, sink in sinks.items():
        setattr(modules[i], SINK_ATTR, sink)
    model.set_attn_implementation(CALIBRATION_KEY)
    model.eval()
    try:
        yield sinks
    finally:
        for module in modules:
            if hasattr(module, SINK_ATTR):
                delattr(module, SINK_ATTR)
        model.set_attn_implementation(previous)
        model.train(training)


def as_batches(model: PreTrainedModel, calibration: Any) -> list[Mapping[str, torch.Tensor]]:
    """Calibration inputs as a list of batches: a batch, a list of batches, or texts (tokenised with the model's
    own tokenizer, found at `model.name_or_path`, 256 tokens at most)."""
    if isinstance(calibration, Mapping):
        return [calibration]
    items = list(calibration) if isinstance(calibration, Iterable) and not isinstance(calibration, str) else None
    if not items:
        raise ValueError(
            "`calibration` must be a batch of model inputs, a non-empty list of batches or a non-empty list of texts, "
            f"got {type(calibration).__name__}."
        )
    if all(isinstance(t, str) for t in items):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"`calibration` texts need the model's tokenizer, which was not found at {model.name_or_path!r}; "
                "pass tokenised batches instead (`tokenizer(texts, padding=True, return_tensors='pt')`)."
            ) from err
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return [
            dict(tokenizer(items[s : s + 16], padding=True, truncation=True, max_length=256, return_tensors="pt"))
            for s in range(0, len(items), 16)
        ]
    if all(isinstance(b, Mapping) for b in items):
        return items
    raise TypeError("`calibration` must hold only texts or only batches (dicts of tensors).")


@torch.no_grad()
def measure_layer_errors(model: PreTrainedModel, calibration: Any) -> tuple[dict[int, float], int]:
    """Each converted layer's relative attention error on `calibration` (see the module docstring).

    Returns:
        `(errors, num_tokens)`: errors by self-attention layer index (converted layers only) and real tokens seen.
    """
    register_calibration_attention()
    modules = get_family(model.config.model_type).attention_modules(model)
    device = next(model.parameters()).device
    tokens = 0
    with _measuring(model, modules) as sinks:
        for batch in as_batches(model, calibration):
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            model(**batch)
            mask = batch.get("attention_mask")
            tokens += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
    return {i: err / max(ref, 1e-300) for i, (err, ref) in sinks.items()}, tokens


def keep_worst_on_softmax(model: PreTrainedModel, keep_softmax: int, calibration: Any) -> CalibrationReport:
    """Measure, then remove the estimators of the `keep_softmax` layers with the largest error (they run exact
    softmax from then on, also after saving and loading: `config.lara_layers` is updated). The measured estimators
    of the other layers are kept as they are. The report is also stored as `model.lara_calibration`."""
    errors, tokens = measure_layer_errors(model, calibration)
    worst = sorted(errors, key=lambda i: errors[i], reverse=True)[:keep_softmax]
    modules = get_family(model.config.model_type).attention_modules(model)
    for i in worst:
        # the module's cache hook stays: without an estimator it binds no state (`cache.bind_state_layer`)
        delattr(modules[i], ESTIMATOR_ATTR)
    model.config.lara_layers = sorted(set(errors) - set(worst))
    model.config.lara_layer_hparams = {
        i: hparams for i, hparams in model.config.lara_layer_hparams.items() if int(i) not in worst
    }
    report = CalibrationReport(method=model.config.lara_method, errors=errors, kept_softmax=worst, num_tokens=tokens)
    model.lara_calibration = report
    return report
