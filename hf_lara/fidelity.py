"""Fidelity report: how far a converted model is from its teacher, the same weights with exact softmax.

Three forward passes per batch, all without gradients and in eval mode:

1. the teacher (`sdpa`), recording each self-attention module's input hidden states and output;
2. the converted model on its own, for the model-level metrics and the end-to-end attention error;
3. the converted model with every self-attention module fed the *teacher's* input (a forward pre-hook swaps it),
   so that each layer's error is the estimator's own error, not the drift accumulated in earlier layers.

Attention outputs are what the family's self-attention module returns (`(B, N, hidden)`: before the output
projection for BERT-like models, after it for GPT-2 and Llama). Errors are summed over real tokens only
(`attention_mask == 1`):

    relative MSE = sum_tokens ||out - ref||^2 / sum_tokens ||ref||^2

Model-level metrics, over real tokens:

- `hidden_cosine`: mean cosine between the last hidden states, token by token;
- `embedding_cosine` (encoders): mean cosine between mean-pooled last hidden states (sentence embeddings); for a
  sentence-transformers model (`sentence_fidelity`), between its own `encode` outputs (its pooling, normalisation);
- `logits_kl` (models with logits): mean `KL(teacher || converted)` of the softmax over the logits, in nats;
- `perplexity`, `teacher_perplexity`, `perplexity_ratio` (decoders): next-token perplexity of the inputs.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .integration import ATTENTION_KEY
from .integration.registry import get_family
from .integration.sentence_transformers import transformer_model
from .io import atomic_save, atomic_write_text

#: Attention implementation of the teacher.
TEACHER_IMPLEMENTATION = "sdpa"


def relative_mse(out: torch.Tensor, ref: torch.Tensor) -> float:
    """`sum((out - ref)^2) / sum(ref^2)`, in float64."""
    return ((out.double() - ref.double()).square().sum() / ref.double().square().sum()).item()


@dataclass
class FidelityReport:
    """Attention and output fidelity of a converted model against its teacher (JSON-serialisable).

    Attributes:
        method (`str`): the estimator (`config.lara_method`).
        hparams (`dict`): its hyper-parameters (`config.lara_hparams`).
        converted_layers (`list[int]`): self-attention layers running the estimator; the others are exact.
        attention_error (`list[float]`): relative MSE of each self-attention layer's output, every layer fed the
            teacher's input; exactly 0 for layers left on softmax.
        attention_error_end_to_end (`list[float]`): the same with the converted model running on its own, so
            errors of earlier layers accumulate.
        metrics (`dict[str, float]`): model-level metrics (see the module docstring).
        num_sequences (`int`): sequences measured.
        num_tokens (`int`): real tokens measured.
    """

    method: str
    hparams: dict[str, Any]
    converted_layers: list[int]
    attention_error: list[float]
    attention_error_end_to_end: list[float]
    metrics: dict[str, float] = field(default_factory=dict)
    num_sequences: int = 0
    num_tokens: int = 0

    @property
    def mean_attention_error(self) -> float:
        """Mean `attention_error` over the converted layers (0 when none is converted)."""
        errors = [self.attention_error[i] for i in self.converted_layers]
        return sum(errors) / len(errors) if errors else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean_attention_error": self.mean_attention_error}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FidelityReport:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_json(self, path: str | Path | None = None) -> str:
        """The report as JSON text; also written to `path` when given."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            atomic_write_text(path, text + "\n")
        return text

    @classmethod
    def from_json(cls, path: str | Path) -> FidelityReport:
        return cls.from_dict(json.loads(Path(path).read_text()))


class _AttentionRecorder:
    """Forward hooks on the self-attention modules: record inputs and outputs, optionally feed given inputs."""

    def __init__(self, modules: Sequence[nn.Module], feed: Sequence[torch.Tensor] | None = None):
        self.modules, self.feed = list(modules), feed
        self.inputs: list[torch.Tensor | None] = [None] * len(self.modules)
        self.outputs: list[torch.Tensor | None] = [None] * len(self.modules)

    def _pre_hook(self, index: int):
        def hook(module, args, kwargs):
            # families call their attention with the hidden states first, positionally or by name
            positional = len(args) > 0
            self.inputs[index] = args[0] if positional else kwargs["hidden_states"]
            if self.feed is None:
                return None
            if positional:
                return (self.feed[index], *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": self.feed[index]}

        return hook

    def _hook(self, index: int):
        def hook(module, args, kwargs, output):
            self.outputs[index] = output[0] if isinstance(output, tuple) else output

        return hook

    @contextlib.contextmanager
    def attached(self) -> Iterator[_AttentionRecorder]:
        handles = []
        try:
            for i, module in enumerate(self.modules):
                handles.append(module.register_forward_pre_hook(self._pre_hook(i), with_kwargs=True))
                handles.append(module.register_forward_hook(self._hook(i), with_kwargs=True))
            yield self
        finally:
            for handle in handles:
                handle.remove()


@contextlib.contextmanager
def _evaluation(model: nn.Module, implementation: str | None = None) -> Iterator[None]:
    """Eval mode (and optionally another attention implementation) for the duration, restored afterwards."""
    training, previous = model.training, model.config._attn_implementation
    model.eval()
    if implementation is not None and implementation != previous:
        model.set_attn_implementation(implementation)
    try:
        with torch.no_grad():
            yield
    finally:
        if implementation is not None and implementation != previous:
            model.set_attn_implementation(previous)
        model.train(training)


def _final_hidden(outputs) -> torch.Tensor:
    hidden = getattr(outputs, "last_hidden_state", None)
    return hidden if hidden is not None else outputs.hidden_states[-1]


def _run(model: nn.Module, batch: Mapping[str, torch.Tensor], recorder: _AttentionRecorder):
    with recorder.attached():
        return model(**batch, output_hidden_states=True)


class _Totals:
    """Running sums over batches."""

    def __init__(self, num_layers: int):
        self.err = [0.0] * num_layers
        self.err_e2e = [0.0] * num_layers
        self.ref = [0.0] * num_layers
        self.sums: dict[str, float] = {}
        self.sequences = self.tokens = 0

    def add(self, name: str, value: float) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + value


def _token_mask(batch: Mapping[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """`(B, N)` bool mask of real tokens for a `(B, N, ...)` tensor."""
    mask = batch.get("attention_mask")
    if mask is not None and tuple(mask.shape) == tuple(like.shape[:2]):
        return mask.bool()
    return torch.ones(like.shape[:2], dtype=torch.bool, device=like.device)


def _accumulate_layers(totals: _Totals, batch, ref, forced, alone) -> None:
    for i, (r, f, a) in enumerate(zip(ref, forced, alone, strict=True)):
        mask = _token_mask(batch, r)
        r, f, a = r[mask].double(), f[mask].double(), a[mask].double()
        totals.ref[i] += r.square().sum().item()
        totals.err[i] += (f - r).square().sum().item()
        totals.err_e2e[i] += (a - r).square().sum().item()


def _accumulate_outputs(totals: _Totals, batch, teacher_out, student_out, causal: bool) -> None:
    h_t, h_s = _final_hidden(teacher_out).double(), _final_hidden(student_out).double()
    mask = _token_mask(batch, h_t)
    totals.sequences += h_t.shape[0]
    totals.tokens += int(mask.sum())
    totals.add("hidden_cosine", nn.functional.cosine_similarity(h_s[mask], h_t[mask], dim=-1).sum().item())
    if not causal:
        weights = mask[..., None].double()
        pooled_t = (h_t * weights).sum(1) / weights.sum(1).clamp_min(1)
        pooled_s = (h_s * weights).sum(1) / weights.sum(1).clamp_min(1)
        totals.add("embedding_cosine", nn.functional.cosine_similarity(pooled_s, pooled_t, dim=-1).sum().item())
    logits_t, logits_s = getattr(teacher_out, "logits", None), getattr(student_out, "logits", None)
    if logits_t is None:
        return
    logp_t, logp_s = logits_t.double().log_softmax(-1), logits_s.double().log_softmax(-1)
    kl = (logp_t.exp() * (logp_t - logp_s)).sum(-1)  # (B, N) per token or (B,) per sequence
    if kl.dim() == 2 and tuple(kl.shape) == tuple(mask.shape):
        totals.add("logits_kl", kl[mask].sum().item())
        totals.add("logits_count", int(mask.sum()))
    else:
        totals.add("logits_kl", kl.sum().item())
        totals.add("logits_count", kl.numel())
    if causal and "input_ids" in batch and logits_t.dim() == 3:
        targets = batch["input_ids"][:, 1:]
        target_mask = mask[:, 1:]
        for name, logp in (("nll_teacher", logp_t), ("nll", logp_s)):
            nll = -logp[:, :-1].gather(-1, targets[..., None])[..., 0]
            totals.add(name, nll[target_mask].sum().item())
        totals.add("nll_count", int(target_mask.sum()))


def _metrics(totals: _Totals) -> dict[str, float]:
    sums, metrics = totals.sums, {}
    if totals.tokens:
        metrics["hidden_cosine"] = sums["hidden_cosine"] / totals.tokens
    if "embedding_cosine" in sums:
        metrics["embedding_cosine"] = sums["embedding_cosine"] / totals.sequences
    if sums.get("logits_count"):
        metrics["logits_kl"] = sums["logits_kl"] / sums["logits_count"]
    if sums.get("nll_count"):
        metrics["perplexity"] = math.exp(sums["nll"] / sums["nll_count"])
        metrics["teacher_perplexity"] = math.exp(sums["nll_teacher"] / sums["nll_count"])
        metrics["perplexity_ratio"] = metrics["perplexity"] / metrics["teacher_perplexity"]
    return metrics


def attention_fidelity(
    model: nn.Module,
    batches: Mapping[str, torch.Tensor] | Iterable[Mapping[str, torch.Tensor]],
    *,
    teacher: nn.Module | None = None,
    progress: bool = False,
) -> FidelityReport:
    """Measure a converted model against its teacher, layer by layer and at the output.

    Args:
        model (`PreTrainedModel`): a converted model (`hf_lara.convert` or loaded from a converted checkpoint).
        batches (`dict` or iterable of `dict`): model inputs, e.g. tokenizer outputs with `input_ids` `(B, N)` and
            `attention_mask` `(B, N)`, or `pixel_values`; one batch or several.
        teacher (`PreTrainedModel`, *optional*): the reference model. By default `model` itself with exact
            attention (`model.set_attn_implementation("sdpa")`, switched back afterwards).
        progress (`bool`, *optional*, defaults to `False`): show a progress bar over the batches.

    Returns:
        A `FidelityReport`.

    >>> report = attention_fidelity(hf_lara.convert(model, "lara"), tokenizer(texts, padding=True, return_tensors="pt"))
    >>> report.attention_error, report.metrics["embedding_cosine"]
    """
    config = model.config
    if getattr(config, "lara_method", None) is None:
        raise ValueError(
            f"`model` must be a converted model (with a `lara_method` in its config), got a `{type(model).__name__}`. "
            "Convert it first with `hf_lara.convert(model, method=...)`."
        )
    family = get_family(config.model_type)
    modules = family.attention_modules(model)
    teacher_modules = family.attention_modules(teacher) if teacher is not None else modules
    if len(teacher_modules) != len(modules):
        raise ValueError(
            f"`teacher` has {len(teacher_modules)} self-attention layers and `model` {len(modules)}; they must match."
        )
    causal = any(getattr(m, "is_causal", False) for m in modules)
    batches = [batches] if isinstance(batches, Mapping) else list(batches)
    if not batches:
        raise ValueError("`batches` is empty: pass at least one batch of inputs.")
    totals = _Totals(len(modules))
    device = next(model.parameters()).device
    iterator = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc=f"fidelity {config.lara_method}", leave=False)
    for batch in iterator:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        taught = _AttentionRecorder(teacher_modules)
        if teacher is None:
            with _evaluation(model, TEACHER_IMPLEMENTATION):
                teacher_out = _run(model, batch, taught)
        else:
            with _evaluation(teacher):
                teacher_out = _run(teacher, batch, taught)
        alone, forced = _AttentionRecorder(modules), _AttentionRecorder(modules, feed=taught.inputs)
        with _evaluation(model, ATTENTION_KEY if teacher is None else None):
            student_out = _run(model, batch, alone)
            _run(model, batch, forced)
        _accumulate_layers(totals, batch, taught.outputs, forced.outputs, alone.outputs)
        _accumulate_outputs(totals, batch, teacher_out, student_out, causal)
    converted = sorted(model.lara_estimators()) if hasattr(model, "lara_estimators") else []
    return FidelityReport(
        method=config.lara_method,
        hparams=dict(config.lara_hparams),
        converted_layers=converted,
        attention_error=[e / max(r, 1e-300) for e, r in zip(totals.err, totals.ref, strict=True)],
        attention_error_end_to_end=[e / max(r, 1e-300) for e, r in zip(totals.err_e2e, totals.ref, strict=True)],
        metrics=_metrics(totals),
        num_sequences=totals.sequences,
        num_tokens=totals.tokens,
    )


def sentence_embedding_cosine(st_model: nn.Module, texts: Sequence[str], *, batch_size: int = 32) -> float:
    """Mean cosine between the sentence embeddings of a converted `SentenceTransformer` and of its teacher.

    Both go through `st_model.encode`, i.e. the model's own pooling and normalisation modules; the teacher is the
    same model with exact attention (`sdpa`), switched back afterwards.
    """
    inner = transformer_model(st_model)
    embeddings = []
    for implementation in (TEACHER_IMPLEMENTATION, ATTENTION_KEY):
        with _evaluation(inner, implementation):
            embeddings.append(st_model.encode(list(texts), batch_size=batch_size, convert_to_tensor=True))
    reference, converted = (e.double().cpu() for e in embeddings)
    return nn.functional.cosine_similarity(converted, reference, dim=-1).mean().item()


def sentence_fidelity(
    st_model: nn.Module, texts: Sequence[str], *, batch_size: int = 16, max_length: int | None = None, progress=False
) -> FidelityReport:
    """`attention_fidelity` of a converted `SentenceTransformer`, with `embedding_cosine` from its own pipeline.

    Layer errors are measured on the Transformer module (inputs tokenised by `st_model.tokenizer`, truncated to
    `max_length`, at most `st_model.max_seq_length`); `embedding_cosine` comes from `sentence_embedding_cosine`,
    so it uses the model's pooling (mean, CLS, ...) and normalisation rather than a mean over tokens.
    """
    saved_length = st_model.max_seq_length
    max_length = min(max_length or saved_length, saved_length)
    batches = encode_texts(st_model.tokenizer, texts, batch_size=batch_size, max_length=max_length)
    report = attention_fidelity(transformer_model(st_model), batches, progress=progress)
    st_model.max_seq_length = max_length
    try:
        report.metrics["embedding_cosine"] = sentence_embedding_cosine(st_model, texts, batch_size=batch_size)
    finally:
        st_model.max_seq_length = saved_length
    return report


def encode_texts(
    tokenizer, texts: Sequence[str], *, batch_size: int = 16, max_length: int = 256
) -> list[dict[str, torch.Tensor]]:
    """Tokenised batches (right padding, truncated to `max_length`) of `texts`, for `attention_fidelity`."""
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError("`texts` holds no non-empty text.")
    if tokenizer.pad_token is None:
        # decoder tokenizers often lack a pad token; padding positions are masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    batches = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        batches.append({k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc})
    return batches


def plot_attention_error(
    reports: Mapping[str, FidelityReport], path: str | Path, *, title: str | None = None, end_to_end: bool = False
) -> Path:
    """Draw the per-layer attention error of several reports (one line per label) to a PNG file.

    Layers with exactly zero error (exact methods, layers left on softmax) cannot be drawn on the log scale and are
    left out; a method exact everywhere is named in the legend as `(exact)`.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4.2), dpi=120)
    markers = "osD^v<>ph*"
    for i, (label, report) in enumerate(reports.items()):
        errors = report.attention_error_end_to_end if end_to_end else report.attention_error
        points = [(layer, e) for layer, e in enumerate(errors) if e > 0]
        if not points:
            ax.plot([], [], label=f"{label} (exact)")
            continue
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker=markers[i % len(markers)], label=label)
    ax.set_yscale("log")
    ax.set_xlabel("self-attention layer")
    ax.set_ylabel("relative MSE vs softmax" + (" (end to end)" if end_to_end else ""))
    ax.set_title(title or "Attention-output error per layer")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    path = atomic_save(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path
