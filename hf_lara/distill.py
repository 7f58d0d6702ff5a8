"""Two-stage distillation of a converted model towards its teacher, the same weights with exact softmax.

**Stage 1, attention transfer** (`attention_transfer`). Every converted layer is trained on its own: one forward
pass of the teacher (exact softmax everywhere, under the `hf_lara_distill` attention implementation) captures each
converted layer's queries, keys, values and softmax output (`capture_attention_inputs`); the estimators then train on
these tensors alone for `DistillConfig.stage1_reuse` steps (`captured_transfer_loss`), with no forward or backward pass
through the rest of the model, so every layer sees the hidden states of the original model and errors never compound
during training. The loss per layer is the relative squared error of the attention output plus, optionally,
Hedgehog's cross-entropy between the softmax rows and the estimator's implied rows (Zhang et al., arXiv 2402.04347,
eq. 4). Only the estimators' own parameters train (kernel feature maps, EVA's adaptive chunk projections, LARA's
adaptive maps, ...): the teacher's weights are untouched.

**Stage 2, end to end** (`end_to_end`). The converted model runs on its own and learns to reproduce the teacher's
outputs: for encoders the pooled embedding (cosine; pooled by the caller's `pooler`, e.g. a sentence-transformers
model's own Pooling/Normalize modules) plus the final hidden states (relative squared error), for decoders the
next-token distribution (`KL(teacher || student)` of the logits), plus the hidden states after every intermediate layer
(`layer_weight`, intermediate-layer distillation: a local signal per layer at no extra cost). LoRA adapters (through
`peft`) and the estimator parameters train; the adapters are merged into the weights at the end
(`merge_and_unload`), so the result is a plain converted model. The student's forward runs under bfloat16 autocast
where the hardware computes it natively (`mixed_precision`), which halves a step's time on CPUs with AMX.
`DistillConfig(full_finetune=True)` trains every weight instead.

Both stages stop at a time budget (`DistillConfig.max_minutes`, shared between the stages) or a step count, whichever
comes first; the learning rate follows a warm-up + cosine schedule over that budget. Inputs are batched by length
(`length_batches`): train on texts as long as the intended use, as fidelity on long inputs does not follow from
training on short ones.

The pieces are public, so a training loop of one's own (`recipes/distill_attention.py`, under Accelerate) computes
the same losses: stage 1 runs the forward pass inside `attention_losses(model)` and reduces it with `transfer_loss`;
stage 2 wraps the model with `add_lora`, takes the targets from `model_outputs` inside `as_teacher(model)` and
compares with `output_loss`. `estimator_parameters` lists what stage 1 trains.

>>> model = hf_lara.convert(AutoModel.from_pretrained(path), "eva", window_size=64)
>>> result = distill(model, tokenizer, train_texts, DistillConfig(max_minutes=10))
>>> result.stages["attention_transfer"]["loss_last"], result.stages["end_to_end"]["loss_last"]
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface

from .integration import ESTIMATOR_ATTR, compat, lara_attention_forward, lara_padding_mask
from .integration.attention import repeat_kv

#: Attention implementation used by stage 1: teacher output forward, student loss recorded.
DISTILL_KEY = "hf_lara_distill"
#: Attribute a stage-1 forward reads on each attention module: the `LayerLosses` sink of its layer.
SINK_ATTR = "_hf_lara_distill_sink"
#: Attribute a forward pass under `DISTILL_KEY` reads on each attention module: the `LayerCapture` of its layer.
CAPTURE_ATTR = "_hf_lara_distill_capture"
#: Attention implementation of the teacher.
TEACHER_IMPLEMENTATION = "sdpa"
#: Sequence length of the synthetic probe that finds which estimator parameters take part in the forward.
PROBE_LENGTH = 256
STAGES = (1, 2)
MIXED_PRECISION = ("auto", "bf16", "no")

Pooler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Batch = dict[str, torch.Tensor]


@dataclass
class DistillConfig:
    """Settings of `distill`.

    Args:
        stages (`tuple[int, ...]`, *optional*, defaults to `(1, 2)`): 1 = attention transfer, 2 = end to end.
        max_minutes (`float`, *optional*, defaults to 10): wall-clock budget of both stages together.
        stage1_share (`float`, *optional*, defaults to 0.3): share of the budget given to stage 1 when both run.
        max_steps (`int`, *optional*): at most this many optimizer steps per stage (default: the budget decides).
        max_length (`int`, *optional*, defaults to 512): truncate training texts to this many tokens.
        batch_tokens (`int`, *optional*, defaults to 1024): padded tokens per batch (batches are formed by length).
        stage1_lr (`float`, *optional*, defaults to 1e-2): peak learning rate of the estimator parameters, stage 1.
        stage2_lr (`float`, *optional*, defaults to 2e-3): peak learning rate of the LoRA adapters in stage 2; with
            `full_finetune` use about 5e-5.
        stage2_estimator_lr (`float`, *optional*, defaults to 3e-3): peak learning rate of the estimator parameters
            in stage 2.
        warmup (`float`, *optional*, defaults to 0.05): share of each stage spent warming the learning rate up.
        rows_weight (`float`, *optional*, defaults to 0.0): weight of Hedgehog's row cross-entropy in stage 1
            (costs `N / D` extra estimator calls per layer; the output error is always in the loss).
        stage1_reuse (`int`, *optional*, defaults to 4): stage-1 optimizer steps taken on the queries, keys and
            values captured from one teacher forward pass (see `capture_attention_inputs`).
        hidden_weight (`float`, *optional*, defaults to 0.1): weight of the final hidden states' relative error next
            to the pooled-embedding cosine loss (encoders, stage 2).
        layer_weight (`float`, *optional*, defaults to 1.0): weight of the intermediate layers' hidden-state error
            (mean over layers of the relative squared error over real tokens) added to the stage-2 loss.
        transfer_weight (`float`, *optional*, defaults to 0.0): weight of the stage-1 attention-transfer loss, on
            the student's own queries, keys and values, added to the stage-2 loss (`student_attention_losses`): keeps
            the estimators close to softmax while the adapters train (one more estimator call and a softmax per
            layer and step).
        lora_rank (`int`, *optional*, defaults to 16): LoRA rank `r`; `lora_alpha = 2 r`.
        full_finetune (`bool`, *optional*, defaults to `False`): stage 2 trains every weight instead of LoRA adapters.
        mixed_precision (`str`, *optional*, defaults to `"auto"`): `"bf16"` runs the stage-2 student forward under
            bfloat16 autocast (weights, optimizer state and the teacher's targets stay fp32), `"no"` keeps fp32,
            `"auto"` picks bf16 where the hardware computes it natively (a CUDA device with bf16 support, or a CPU
            with AVX512-BF16/AMX) and fp32 elsewhere.
        seed (`int`, *optional*, defaults to 0): batch order and LoRA initialisation.
        progress (`bool`, *optional*, defaults to `True`): show a tqdm progress bar per stage.
    """

    stages: tuple[int, ...] = STAGES
    max_minutes: float = 10.0
    stage1_share: float = 0.3
    max_steps: int | None = None
    max_length: int = 512
    batch_tokens: int = 1024
    stage1_lr: float = 1e-2
    stage2_lr: float = 2e-3
    stage2_estimator_lr: float = 3e-3
    warmup: float = 0.05
    rows_weight: float = 0.0
    stage1_reuse: int = 4
    hidden_weight: float = 0.1
    layer_weight: float = 1.0
    transfer_weight: float = 0.0
    lora_rank: int = 16
    full_finetune: bool = False
    mixed_precision: str = "auto"
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        self.stages = tuple(sorted(set(int(s) for s in self.stages)))
        if not self.stages or any(s not in STAGES for s in self.stages):
            raise ValueError(f"`stages` must be a non-empty subset of {STAGES}, got {self.stages}.")
        if not self.max_minutes > 0:
            raise ValueError(f"`max_minutes` must be > 0, got {self.max_minutes}.")
        if not 0 < self.stage1_share < 1:
            raise ValueError(f"`stage1_share` must be in (0, 1), got {self.stage1_share}.")
        for name in ("max_length", "batch_tokens", "lora_rank", "stage1_reuse"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}.")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"`max_steps` must be >= 1 or None, got {self.max_steps}.")
        for name in ("stage1_lr", "stage2_lr", "stage2_estimator_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"`{name}` must be > 0, got {getattr(self, name)}.")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"`mixed_precision` must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}.")
        for name in ("rows_weight", "hidden_weight", "layer_weight", "transfer_weight", "warmup"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}.")

    def stage_seconds(self) -> dict[int, float]:
        """Wall-clock seconds given to each selected stage."""
        total = self.max_minutes * 60
        if len(self.stages) == 1:
            return {self.stages[0]: total}
        return {1: total * self.stage1_share, 2: total * (1 - self.stage1_share)}


@dataclass
class DistillResult:
    """What `distill` did: per stage `steps`, `minutes`, `loss_first`, `loss_last`, `trainable_parameters`."""

    stages: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def minutes(self) -> float:
        return sum(s["minutes"] for s in self.stages.values())

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "minutes": self.minutes}


# ------------------------------------------------------------------------------------------------ data
def length_batches(
    tokenizer, texts: Sequence[str], *, max_length: int = 512, batch_tokens: int = 2048, seed: int = 0
) -> list[Batch]:
    """Tokenise `texts` and group them by length: batches of similar lengths, at most `batch_tokens` padded tokens
    (at least one text), in a seeded random order.

    Returns:
        A list of dicts with `input_ids` and `attention_mask` `(B, N)` (and `token_type_ids` when the tokenizer makes
        them), right padded.
    """
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("`texts` holds no non-empty text to train on.")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoded = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    groups, current = [], []
    for i in order:
        longest = len(encoded[i])  # sorted: the newest text is the longest of its group
        if current and longest * (len(current) + 1) > batch_tokens:
            groups.append(current)
            current = []
        current.append(i)
    groups.append(current)
    random.Random(seed).shuffle(groups)
    batches = []
    for group in groups:
        enc = tokenizer(
            [texts[i] for i in group], truncation=True, max_length=max_length, padding=True, return_tensors="pt"
        )
        batches.append({k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc})
    return batches


def _cycle(batches: Sequence[Batch]) -> Iterator[tuple[int, Batch]]:
    while True:
        yield from enumerate(batches)


# ------------------------------------------------------------------------------------------------ stage 1
def softmax_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    padding_mask: torch.Tensor | None,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention in fp32, the teacher of stage 1 (quadratic: used for training only).

    Args:
        query (`torch.Tensor` of shape `(B, H, Nq, D)`), key, value (`(B, H, Nk, D)`): queries are the last `Nq`
            positions of the keys.
        padding_mask (`torch.BoolTensor` of shape `(B, Nk)`, *optional*): True = real key.

    Returns:
        output `(B, H, Nq, D)` and attention probabilities `(B, H, Nq, Nk)`.
    """
    Nq, Nk = query.shape[2], key.shape[2]
    allowed = torch.ones(Nq, Nk, dtype=torch.bool, device=query.device)
    if causal:
        allowed = allowed.tril(diagonal=Nk - Nq)
    allowed = allowed[None, None]
    if padding_mask is not None:
        allowed = allowed & padding_mask[:, None, None, :].bool()
    with torch.autocast(device_type=query.device.type, enabled=False):
        scores = query.float() @ key.float().transpose(-1, -2) * scale  # (B, H, Nq, Nk)
        # a finite fill keeps rows without any allowed key (padded queries) finite; the losses mask them out
        probs = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min).softmax(dim=-1)
        return probs @ value.float(), probs


def implied_rows(estimator: nn.Module, query, key, padding_mask, causal: bool, scale: float) -> torch.Tensor:
    """The estimator's attention rows `(B, H, Nq, Nk)`: its output for one-hot values, `D` keys at a time.

    Every estimator is linear in the values (each output row is a weighted sum of value rows), so the values `e_j`
    give column `j` of its attention matrix. Estimators run in eval mode here (deterministic), so all slices agree.
    """
    B, H, Nk, D = key.shape
    eye = torch.eye(Nk, device=key.device, dtype=key.dtype)
    eye = nn.functional.pad(eye, (0, -Nk % D))  # (Nk, ceil(Nk / D) * D)
    columns = [
        estimator(
            query, key, eye[:, s : s + D].expand(B, H, Nk, D), padding_mask=padding_mask, causal=causal, scale=scale
        )
        for s in range(0, eye.shape[1], D)
    ]
    return torch.cat(columns, dim=-1)[..., :Nk]


def row_cross_entropy(probs: torch.Tensor, estimate: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Hedgehog's loss (arXiv 2402.04347, eq. 4): mean over heads and real query rows of `-sum_j p_ij log a_ij`.

    Args:
        probs, estimate (`torch.Tensor` of shape `(B, H, Nq, Nk)`): softmax and estimated rows.
        rows (`torch.Tensor` of shape `(B, Nq)`): 1 for real query rows.
    """
    cross_entropy = -(probs * estimate.float().clamp_min(1e-6).log()).sum(-1)  # (B, H, Nq)
    mask = rows[:, None, :].to(cross_entropy.dtype)
    return (cross_entropy * mask).sum() / (mask.sum() * cross_entropy.shape[1]).clamp_min(1)


class LayerLosses:
    """Sink of one layer's attention-transfer losses, attached to its attention module during a forward pass.

    `forward_student=False` (stage 1): the layer hands the teacher's softmax output on. `True` (the stage-2
    regulariser): it hands the estimator's output on, and the loss compares a second estimator call on detached
    queries, keys and values with softmax on them, so that it trains the estimator parameters only.
    """

    def __init__(self, rows_weight: float, forward_student: bool = False) -> None:
        self.rows_weight = rows_weight
        self.forward_student = forward_student
        self.losses: list[torch.Tensor] = []


def distillation_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """`AttentionInterface` function of `DISTILL_KEY`: returns the teacher's output `(B, Nq, H, D)` (the student's in
    layers whose sink has `forward_student`); in layers with a `LayerCapture` records the call
    (`CapturedAttention`); in converted layers with a sink also records the student's loss against the teacher
    (relative squared error over real query rows)."""
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", False) if causal is None else causal)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    num_heads = query.shape[1]
    sink, estimator = getattr(module, SINK_ATTR, None), getattr(module, ESTIMATOR_ATTR, None)
    forward = None
    if sink is not None and estimator is not None and sink.forward_student:
        forward = lara_attention_forward(module, query, key, value, attention_mask, scaling=scale, **kwargs)[0]
        query, key, value = query.detach(), key.detach(), value.detach()
    key_h, value_h = repeat_kv(key, num_heads), repeat_kv(value, num_heads)
    # layers left on softmax hand this on with its gradient (stage 2 trains their adapters)
    teacher, probs = softmax_reference(query, key_h, value_h, attention_mask, causal, scale)
    _record(module, query, key, value, attention_mask, scale, causal, teacher, probs)
    if sink is not None and estimator is not None:
        student = lara_attention_forward(module, query, key, value, attention_mask, scaling=scale, **kwargs)[0]
        student = student.transpose(1, 2).float()  # (B, H, Nq, D)
        B, Nq = query.shape[0], query.shape[2]
        rows = torch.ones(B, Nq, device=query.device) if attention_mask is None else attention_mask[:, -Nq:].float()
        weights = rows[:, None, :, None]
        loss = ((student - teacher).square() * weights).sum() / (teacher.square() * weights).sum().clamp_min(1e-12)
        if sink.rows_weight > 0:
            estimate = implied_rows(estimator, query, key_h, attention_mask, causal, scale)
            loss = loss + sink.rows_weight * row_cross_entropy(probs, estimate, rows)
        sink.losses.append(loss)
    if forward is not None:
        return forward, None
    return teacher.to(query.dtype).transpose(1, 2).contiguous(), None


@dataclass
class CapturedAttention:
    """One attention call of the teacher, kept for stage 1: the estimator's inputs and the exact output.

    Shapes: `query` `(B, H, Nq, D)`, `key`/`value` `(B, H_kv, Nk, D)`, `padding_mask` `(B, Nk)` or None, `teacher`
    `(B, H, Nq, D)` fp32, `probs` `(B, H, Nq, Nk)` (only when the row cross-entropy is trained).
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    padding_mask: torch.Tensor | None
    scale: float
    causal: bool
    teacher: torch.Tensor
    probs: torch.Tensor | None


class LayerCapture:
    """Collects the `CapturedAttention` of one layer during a forward pass under `DISTILL_KEY`."""

    def __init__(self, keep_probs: bool) -> None:
        self.keep_probs = keep_probs
        self.calls: list[CapturedAttention] = []


def _record(module, query, key, value, attention_mask, scale, causal, teacher, probs) -> None:
    capture = getattr(module, CAPTURE_ATTR, None)
    if capture is not None:
        capture.calls.append(
            CapturedAttention(
                query.detach(),
                key.detach(),
                value.detach(),
                attention_mask,
                scale,
                causal,
                teacher.detach(),
                probs.detach() if capture.keep_probs else None,
            )
        )


def captured_transfer_loss(module: nn.Module, call: CapturedAttention, rows_weight: float = 0.0) -> torch.Tensor:
    """Stage-1 loss of one layer on a captured call: the relative squared error of the estimator's output against
    softmax over real query rows, plus `rows_weight` times Hedgehog's row cross-entropy (arXiv 2402.04347, eq. 4).

    The estimator runs through `lara_attention_forward`, exactly as in the converted model's forward pass.
    """
    student = lara_attention_forward(
        module, call.query, call.key, call.value, call.padding_mask, scaling=call.scale, is_causal=call.causal
    )[0]
    student = student.transpose(1, 2).float()  # (B, H, Nq, D)
    B, Nq = call.query.shape[0], call.query.shape[2]
    mask = call.padding_mask
    rows = torch.ones(B, Nq, device=student.device) if mask is None else mask[:, -Nq:].float()
    weights = rows[:, None, :, None]
    teacher = call.teacher
    loss = ((student - teacher).square() * weights).sum() / (teacher.square() * weights).sum().clamp_min(1e-12)
    if rows_weight > 0 and call.probs is not None:
        estimator = getattr(module, ESTIMATOR_ATTR)
        key_h = repeat_kv(call.key, call.query.shape[1])
        estimate = implied_rows(estimator, call.query, key_h, mask, call.causal, call.scale)
        loss = loss + rows_weight * row_cross_entropy(call.probs, estimate, rows)
    return loss


def register_distillation_attention() -> None:
    """Register `DISTILL_KEY` (idempotent); its masks are hf_lara's 2-D padding masks."""
    AttentionInterface.register(DISTILL_KEY, distillation_attention)
    AttentionMaskInterface.register(DISTILL_KEY, lara_padding_mask)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of a converted model (a `peft` wrapper is looked through)."""
    from .integration.registry import get_family

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return get_family(base.config.model_type).attention_modules(base)


@contextlib.contextmanager
def _implementation(model: nn.Module, implementation: str) -> Iterator[None]:
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    previous = model.config._attn_implementation
    model.set_attn_implementation(implementation)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@contextlib.contextmanager
def _sinks(model: nn.Module, rows_weight: float, forward_student: bool = False) -> Iterator[dict[int, LayerLosses]]:
    """Attach a `LayerLosses` to every converted attention module for the duration."""
    sinks = {}
    for i, module in enumerate(attention_modules(model)):
        if hasattr(module, ESTIMATOR_ATTR):
            sinks[i] = LayerLosses(rows_weight, forward_student)
            setattr(module, SINK_ATTR, sinks[i])
    try:
        yield sinks
    finally:
        for module in attention_modules(model):
            if hasattr(module, SINK_ATTR):
                delattr(module, SINK_ATTR)


@contextlib.contextmanager
def _captures(model: nn.Module, keep_probs: bool) -> Iterator[dict[int, LayerCapture]]:
    """Attach a `LayerCapture` to every converted attention module for the duration."""
    captures = {}
    for i, module in enumerate(attention_modules(model)):
        if hasattr(module, ESTIMATOR_ATTR):
            captures[i] = LayerCapture(keep_probs)
            setattr(module, CAPTURE_ATTR, captures[i])
    try:
        yield captures
    finally:
        for module in attention_modules(model):
            if hasattr(module, CAPTURE_ATTR):
                delattr(module, CAPTURE_ATTR)


def capture_attention_inputs(
    model: nn.Module, batch: Batch, keep_probs: bool = False
) -> list[tuple[nn.Module, CapturedAttention]]:
    """One forward pass of the teacher (the converted model under `DISTILL_KEY`, i.e. exact softmax everywhere, no
    gradient) that keeps every converted layer's queries, keys, values and softmax output.

    Stage 1 then trains each estimator on these tensors alone: no forward or backward pass through the rest of the
    model per step, and every layer sees the teacher's hidden states.

    Returns:
        `(attention module, CapturedAttention)` pairs, in layer order.
    """
    register_distillation_attention()
    modules = attention_modules(model)
    with torch.no_grad(), _implementation(model, DISTILL_KEY), _captures(model, keep_probs) as captures:
        model(**batch)
    return [(modules[i], call) for i, capture in sorted(captures.items()) for call in capture.calls]


@contextlib.contextmanager
def attention_losses(model: nn.Module, rows_weight: float = 0.0) -> Iterator[dict[int, LayerLosses]]:
    """Forward passes inside record every converted layer's stage-1 loss against its teacher's softmax.

    For the duration the model runs under `DISTILL_KEY`: each converted layer records its loss in the `LayerLosses`
    yielded for its index and hands the teacher's output on. A `peft` model's adapters are disabled, so the
    estimators learn from the original projections. Reduce the recorded losses with `transfer_loss`.

    >>> with attention_losses(model) as sinks:
    ...     model(**batch)
    >>> transfer_loss(model, sinks).backward()

    Args:
        model (`PreTrainedModel`): a converted model (a `peft` wrapper is looked through); not a DDP wrapper, whose
            forward may still be called inside.
        rows_weight (`float`, *optional*, defaults to 0.0): weight of Hedgehog's row cross-entropy.

    Yields:
        `dict[int, LayerLosses]`: the sink of each converted layer, keyed by layer index.
    """
    register_distillation_attention()
    adapters = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with adapters, _implementation(model, DISTILL_KEY), _sinks(model, rows_weight) as sinks:
        yield sinks


@contextlib.contextmanager
def student_attention_losses(model: nn.Module, rows_weight: float = 0.0) -> Iterator[dict[int, LayerLosses]]:
    """Forward passes inside run the converted model as usual (estimators, adapters enabled) and record every
    converted layer's attention-transfer loss on its own queries, keys and values: the stage-2 regulariser
    (`DistillConfig.transfer_weight`). The loss reaches the estimator parameters only (its inputs are detached);
    the softmax it compares with is quadratic, so this is for training.

    Yields:
        `dict[int, LayerLosses]`: the sink of each converted layer, keyed by layer index (reduce with `recorded_loss`).
    """
    register_distillation_attention()
    with _implementation(model, DISTILL_KEY), _sinks(model, rows_weight, forward_student=True) as sinks:
        yield sinks


def recorded_loss(sinks: dict[int, LayerLosses]) -> torch.Tensor:
    """The mean of the per-layer losses recorded in `sinks` (by `attention_losses` or `student_attention_losses`)."""
    losses = [loss for sink in sinks.values() for loss in sink.losses]
    if not losses:
        raise ValueError(
            "No converted layer recorded a loss: run the forward pass inside `attention_losses(model)` (stage 1) or "
            "`student_attention_losses(model)` (stage 2)."
        )
    return torch.stack(losses).mean()


def transfer_loss(model: nn.Module, sinks: dict[int, LayerLosses]) -> torch.Tensor:
    """Stage-1 loss: `recorded_loss(sinks)` plus the estimators' auxiliary losses (e.g. the kernel feature maps'
    `ortho_penalty`)."""
    return _with_auxiliary_losses(model, recorded_loss(sinks))


def _with_auxiliary_losses(model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
    """`loss` plus the estimators' auxiliary losses (e.g. the kernel feature maps' `ortho_penalty`)."""
    for module in attention_modules(model):
        estimator = getattr(module, ESTIMATOR_ATTR, None)
        auxiliary = estimator.auxiliary_loss() if estimator is not None else None
        if auxiliary is not None:
            loss = loss + auxiliary
    return loss


def estimator_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The estimator parameters that take part in the model's attention (others stay frozen).

    A synthetic probe runs every estimator once in its layer's mode (causal or not), in eval mode as at inference,
    and keeps the parameters that receive a gradient (LARA's causal proposals in an encoder, say, do not).
    """
    found = []
    for module in attention_modules(model):
        estimator = getattr(module, ESTIMATOR_ATTR, None)
        if estimator is None:
            continue
        parameters = list(estimator.parameters())
        if not parameters:
            continue
        previous = [p.requires_grad for p in parameters]
        for p in parameters:
            p.requires_grad_(True)
            p.grad = None
        q, k, v = torch.randn(3, 1, estimator.num_heads, PROBE_LENGTH, estimator.head_dim, device=parameters[0].device)
        with torch.enable_grad():
            out = estimator(q, k, v, causal=bool(getattr(module, "is_causal", False)))
            if out.requires_grad:
                out.square().sum().backward()
        for p, before in zip(parameters, previous, strict=True):
            if p.grad is not None:
                found.append(p)
            p.grad = None
            p.requires_grad_(before)
    return found


def _schedule(progress: float, warmup: float) -> float:
    """Learning-rate factor at `progress` in [0, 1] of a stage: linear warm-up, then cosine decay to 10 %."""
    if progress < warmup:
        return (progress + 1e-3) / (warmup + 1e-3)
    tail = (progress - warmup) / max(1 - warmup, 1e-6)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(tail, 1.0)))


class _Clock:
    """Budget of one stage: wall-clock seconds and optionally steps; `progress` in [0, 1] drives the schedule."""

    def __init__(self, seconds: float, max_steps: int | None, desc: str, show: bool) -> None:
        self.seconds, self.max_steps, self.start, self.steps = seconds, max_steps, time.monotonic(), 0
        self.bar = None
        if show:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=max_steps, desc=desc, unit="step", leave=False)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def progress(self) -> float:
        by_time = self.elapsed() / self.seconds
        return min(1.0, max(by_time, self.steps / self.max_steps if self.max_steps else 0.0))

    def done(self) -> bool:
        return self.elapsed() >= self.seconds or (self.max_steps is not None and self.steps >= self.max_steps)

    def tick(self, loss: float) -> None:
        self.steps += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", minutes=f"{self.elapsed() / 60:.1f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _train_loop(groups: list[dict], batches, clock: _Clock, warmup: float, step_loss) -> dict[str, Any]:
    """AdamW over parameter `groups` (`{"params": [...], "lr": peak}`) until `clock` says done; `step_loss(index,
    batch)` returns the loss tensor."""
    groups = [{**g, "peak_lr": g["lr"]} for g in groups if g["params"]]
    parameters = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    losses = []
    cpu_start = time.process_time()
    try:
        for index, batch in _cycle(batches):
            if clock.done():
                break
            for group in optimizer.param_groups:
                group["lr"] = group["peak_lr"] * _schedule(clock.progress(), warmup)
            loss = step_loss(index, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            losses.append(loss.item())
            clock.tick(losses[-1])
    finally:
        clock.close()
    return {
        "steps": len(losses),
        "minutes": clock.elapsed() / 60,
        "cpu_minutes": (time.process_time() - cpu_start) / 60,
        "loss_first": losses[0] if losses else None,
        "loss_last": sum(losses[-5:]) / len(losses[-5:]) if losses else None,
        "losses": losses,
    }


def _check_converted(model: nn.Module) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "lara_method", None) is None:
        raise ValueError(
            f"`model` must be a converted model (with a `lara_method` in its config), got `{type(base).__name__}`. "
            "Convert it first with `hf_lara.convert(model, method=...)`."
        )


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


def attention_transfer(
    model: nn.Module, batches: Sequence[Batch], config: DistillConfig | None = None, seconds: float | None = None
) -> dict[str, Any]:
    """Stage 1: train the estimator parameters of every converted layer to reproduce its softmax attention.

    Args:
        model (`PreTrainedModel`): a converted model, trained in place (fp32 recommended).
        batches (`list[dict]`): model inputs, e.g. from `length_batches`.
        config (`DistillConfig`, *optional*): `stage1_lr`, `rows_weight`, `max_steps`, `warmup`, `progress`.
        seconds (`float`, *optional*): wall-clock budget (default: `config.max_minutes`).

    Returns:
        `dict` with `steps`, `minutes`, `loss_first`, `loss_last` (mean over layers of the per-layer loss, averaged
        over the last 5 steps), `losses` and `trainable_parameters`.
    """
    config = config or DistillConfig(stages=(1,))
    _check_converted(model)
    parameters = estimator_parameters(model)
    if not parameters:
        raise ValueError(
            f"Nothing to train in stage 1: the `{model.config.lara_method}` estimators have no parameters that take "
            "part in the attention. Use `kernel`, `eva` (adaptive) or `lara` with `adaptive=true`, or run stage 2 only."
        )
    register_distillation_attention()
    device = parameters[0].device
    training = model.training
    model.eval()  # no dropout: the teacher is deterministic, estimators trained as they run at inference
    model.requires_grad_(False)
    for p in parameters:
        p.requires_grad_(True)

    reuse = config.stage1_reuse
    captured: dict[int, list[tuple[nn.Module, CapturedAttention]]] = {}

    def step_loss(index: int, batch: Batch) -> torch.Tensor:
        # a teacher pass every `reuse` steps; the estimators then train on the captured tensors only
        if index // reuse not in captured:
            captured.clear()
            captured[index // reuse] = capture_attention_inputs(
                model, _to_device(batch, device), keep_probs=config.rows_weight > 0
            )
        calls = captured[index // reuse]
        losses = [captured_transfer_loss(module, call, config.rows_weight) for module, call in calls]
        return _with_auxiliary_losses(model, torch.stack(losses).mean())

    clock = _Clock(seconds or config.max_minutes * 60, config.max_steps, "attention transfer", config.progress)
    try:
        repeated = [batch for batch in batches for _ in range(reuse)]
        stats = _train_loop(
            [{"params": parameters, "lr": config.stage1_lr}], repeated, clock, config.warmup, step_loss
        )
    finally:
        model.requires_grad_(False)
        model.train(training)
    stats["trainable_parameters"] = sum(p.numel() for p in parameters)
    return stats


# ------------------------------------------------------------------------------------------------ stage 2
def mean_pooler(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of `hidden` `(B, N, C)` over real tokens (`attention_mask` `(B, N)`) -> `(B, C)`."""
    weights = attention_mask[..., None].to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)


def sentence_transformers_pooler(st_model) -> Pooler:
    """A `Pooler` running the modules after the Transformer of a `SentenceTransformer` (Pooling, Dense, Normalize)."""
    modules = list(st_model)[1:]

    def pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        features = {"token_embeddings": hidden, "attention_mask": attention_mask}
        for module in modules:
            features = module(features)
        return features["sentence_embedding"]

    return pool


def is_causal(model: nn.Module) -> bool:
    """Whether the converted model's attention is causal (a decoder: stage 2 matches logits, not embeddings)."""
    return any(getattr(m, "is_causal", False) for m in attention_modules(model))


def model_outputs(model: nn.Module, batch: Batch, causal: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Final hidden states `(B, N, C)` and logits (models with an LM head, else None)."""
    return _outputs_and_layers(model, batch, causal)[:2]


def _outputs_and_layers(
    model: nn.Module, batch: Batch, causal: bool
) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, ...]]:
    """Final hidden states `(B, N, C)`, logits (models with an LM head, else None) and the hidden states after each
    layer but the last (`output_hidden_states[1:-1]`)."""
    out = model(**batch, output_hidden_states=True)
    hidden = getattr(out, "last_hidden_state", None)
    hidden = out.hidden_states[-1] if hidden is None else hidden
    logits = getattr(out, "logits", None) if causal else None
    return hidden.float(), None if logits is None else logits.float(), tuple(out.hidden_states[1:-1])


def layer_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], attention_mask) -> torch.Tensor:
    """Intermediate-layer distillation: mean over layers of the relative squared error of the hidden states
    `(B, N, C)` over real tokens (`attention_mask` `(B, N)`)."""
    mask = attention_mask.bool()
    errors = [
        (s[mask].float() - t[mask].float()).square().sum() / t[mask].float().square().sum().clamp_min(1e-12)
        for s, t in zip(student, teacher, strict=True)
    ]
    return torch.stack(errors).mean() if errors else attention_mask.new_zeros((), dtype=torch.float32)


def output_loss(
    student: tuple[torch.Tensor, torch.Tensor | None],
    teacher: tuple[torch.Tensor, torch.Tensor | None],
    attention_mask: torch.Tensor,
    pooler: Pooler | None,
    hidden_weight: float,
) -> torch.Tensor:
    """Stage-2 loss: `KL(teacher || student)` per real token for logits; otherwise `1 - cos` of the pooled
    embeddings plus `hidden_weight` times the relative squared error of the final hidden states over real tokens."""
    (h_s, logits_s), (h_t, logits_t) = student, teacher
    mask = attention_mask.bool()
    if logits_s is not None and logits_t is not None:
        logp_t, logp_s = logits_t.log_softmax(-1), logits_s.log_softmax(-1)
        kl = (logp_t.exp() * (logp_t - logp_s)).sum(-1)  # (B, N)
        return kl[mask].mean()
    pooler = pooler or mean_pooler
    cosine = nn.functional.cosine_similarity(pooler(h_s, attention_mask), pooler(h_t, attention_mask), dim=-1)
    hidden = (h_s[mask] - h_t[mask]).square().sum() / h_t[mask].square().sum().clamp_min(1e-12)
    return (1 - cosine).mean() + hidden_weight * hidden


def lora_targets(model: nn.Module) -> list[str]:
    """Names of the linear modules (`nn.Linear`, GPT-2's `Conv1D`) that get LoRA adapters: all but the estimators'
    and the output embedding."""
    from transformers.pytorch_utils import Conv1D

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear | Conv1D) and ESTIMATOR_ATTR not in name.split(".") and module is not output
    ]


def _native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 matrix products natively (autocast then saves time rather than costs it)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return False


def _autocast(config: DistillConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """The stage-2 student forward's autocast context (`DistillConfig.mixed_precision`)."""
    enabled = config.mixed_precision == "bf16" or (config.mixed_precision == "auto" and _native_bf16(device))
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def add_lora(model: nn.Module, rank: int = 16, seed: int = 0) -> nn.Module:
    """Wrap a converted model in a `peft` model with LoRA adapters (`r = rank`, `lora_alpha = 2 r`, no dropout) on
    every `lora_targets` module; peft freezes everything else. The adapters start at zero (`B = 0`), so the wrapped
    model computes what the converted one did.

    Returns:
        The `PeftModel` (`merge_and_unload()` gives the converted model back, adapters merged).
    """
    import peft
    from transformers.pytorch_utils import Conv1D

    targets = lora_targets(model)
    if not targets:
        raise ValueError(
            f"No linear layer to put LoRA adapters on in this `{type(model).__name__}`; use `full_finetune=True`."
        )
    lora = peft.LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=targets,
        # GPT-2's Conv1D stores its weight transposed
        fan_in_fan_out=any(isinstance(model.get_submodule(t), Conv1D) for t in targets),
    )
    torch.manual_seed(seed)
    with compat.peft_wrapping():
        return peft.get_peft_model(model, lora)


@contextlib.contextmanager
def as_teacher(model: nn.Module) -> Iterator[None]:
    """Forward passes inside run the teacher of stage 2, without gradients: exact softmax attention
    (`TEACHER_IMPLEMENTATION`) and, for a `peft` model, its adapters disabled.

    >>> with as_teacher(peft_model):
    ...     target = model_outputs(peft_model, batch, causal)
    """
    adapters = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with torch.no_grad(), adapters, _implementation(model, TEACHER_IMPLEMENTATION):
        yield


def end_to_end(
    model: nn.Module,
    batches: Sequence[Batch],
    config: DistillConfig | None = None,
    seconds: float | None = None,
    pooler: Pooler | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Stage 2: train the converted model, running on its own, to reproduce its teacher's outputs.

    The teacher is the same model with exact softmax attention and its adapters disabled (LoRA), or a frozen copy
    taken before training (`full_finetune`). LoRA adapters are injected with `peft` on every linear layer except
    the estimators' and the output embedding, trained with the estimator parameters, then merged.

    Args:
        model (`PreTrainedModel`): a converted model (modified in place: LoRA merges into the same modules).
        batches (`list[dict]`): model inputs, e.g. from `length_batches`.
        config (`DistillConfig`, *optional*): `stage2_lr`, `lora_rank`, `full_finetune`, `hidden_weight`,
            `layer_weight`, ...
        seconds (`float`, *optional*): wall-clock budget (default: `config.max_minutes`).
        pooler (`Callable`, *optional*): `(hidden (B, N, C), attention_mask (B, N)) -> (B, C)` embeddings of an
            encoder, e.g. `sentence_transformers_pooler(st_model)`; default: mean pooling. Unused for decoders.

    Returns:
        `(model, stats)`: the trained converted model (the same object, adapters merged) and the stage's statistics.
    """
    config = config or DistillConfig(stages=(2,))
    _check_converted(model)
    causal = is_causal(model)
    device = next(model.parameters()).device
    training = model.training
    estimators = estimator_parameters(model)
    model.eval()
    if config.full_finetune:
        teacher = copy.deepcopy(model).requires_grad_(False)
        teacher.set_attn_implementation(TEACHER_IMPLEMENTATION)
        student = model.requires_grad_(True)
    else:
        student = add_lora(model, config.lora_rank, config.seed)
        for p in estimators:
            p.requires_grad_(True)
        teacher = student
    cache: dict[int, tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, ...]]] = {}
    layers = config.layer_weight > 0

    def targets(index: int, batch: Batch):
        if index in cache:
            return cache[index]
        with as_teacher(teacher):
            hidden, logits, inner = _outputs_and_layers(teacher, batch, causal)
        # intermediate targets are kept in bf16 (half the memory; their error is far below the losses trained on)
        out = (hidden, logits, tuple(h.to(torch.bfloat16) for h in inner) if layers else ())
        # encoders' targets are small enough to keep; decoders' logits are recomputed
        if not causal:
            cache[index] = out
        return out

    regularise = config.transfer_weight > 0

    def step_loss(index: int, batch: Batch) -> torch.Tensor:
        batch = _to_device(batch, device)
        hidden, logits, inner = targets(index, batch)
        recorded = student_attention_losses(student, config.rows_weight) if regularise else contextlib.nullcontext()
        with _autocast(config, device), recorded as sinks:
            s_hidden, s_logits, s_inner = _outputs_and_layers(student, batch, causal)
        mask = batch["attention_mask"]
        loss = output_loss((s_hidden, s_logits), (hidden, logits), mask, pooler, config.hidden_weight)
        if layers:
            loss = loss + config.layer_weight * layer_loss(s_inner, inner, mask)
        if regularise:
            loss = loss + config.transfer_weight * recorded_loss(sinks)
        return loss

    clock = _Clock(seconds or config.max_minutes * 60, config.max_steps, "end to end", config.progress)
    try:
        chosen = {id(p) for p in estimators}
        others = [p for p in student.parameters() if p.requires_grad and id(p) not in chosen]
        groups = [{"params": others, "lr": config.stage2_lr}, {"params": estimators, "lr": config.stage2_estimator_lr}]
        stats = _train_loop(groups, batches, clock, config.warmup, step_loss)
    finally:
        if not config.full_finetune:
            model = student.merge_and_unload()
        model.requires_grad_(False)
        model.train(training)
    stats["trainable_parameters"] = sum(p.numel() for g in groups for p in g["params"])
    return model, stats


# ------------------------------------------------------------------------------------------------ both
def distill(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    config: DistillConfig | None = None,
    pooler: Pooler | None = None,
) -> DistillResult:
    """Run the selected stages on a converted model, in place, within `config.max_minutes`.

    Args:
        model (`PreTrainedModel`): a converted model (`hf_lara.convert`); stays the same object (LoRA merged).
        tokenizer: its tokenizer.
        texts (`list[str]`): training texts, as long as the intended use (truncated to `config.max_length`).
        config (`DistillConfig`, *optional*): settings; defaults to both stages in 10 minutes.
        pooler (`Callable`, *optional*): embedding pooling of an encoder for stage 2 (see `end_to_end`).

    Returns:
        A `DistillResult`.
    """
    config = config or DistillConfig()
    _check_converted(model)
    batches = length_batches(
        tokenizer, texts, max_length=config.max_length, batch_tokens=config.batch_tokens, seed=config.seed
    )
    result = DistillResult()
    seconds = config.stage_seconds()
    deadline = time.monotonic() + config.max_minutes * 60
    trainable = _trainable_flags(model)
    try:
        if 1 in config.stages:
            stats = attention_transfer(model, batches, config, seconds[1])
            result.stages["attention_transfer"] = stats
        if 2 in config.stages:
            # stage 2 gets whatever stage 1 left of the budget
            remaining = max(deadline - time.monotonic(), 1e-3)
            model, stats = end_to_end(model, batches, config, remaining, pooler)
            result.stages["end_to_end"] = stats
    finally:
        # the stages freeze the model; hand it back as trainable as it came (e.g. for fine-tuning next)
        _restore_trainable_flags(model, trainable)
    return result


def _trainable_flags(model: nn.Module) -> dict[str, bool]:
    return {name: p.requires_grad for name, p in model.named_parameters()}


def _restore_trainable_flags(model: nn.Module, flags: dict[str, bool]) -> None:
    """Set `requires_grad` back by parameter name (LoRA merged: the names are the model's own again)."""
    for name, p in model.named_parameters():
        p.requires_grad_(flags.get(name, False))


# ------------------------------------------------------------------------------------------------ checkpoints
def is_sentence_transformer(path: str | Path) -> bool:
    """A sentence-transformers folder (its `modules.json` lists the modules after the Transformer)."""
    return (Path(path) / "modules.json").is_file()


def read_train_texts(path: str | Path) -> list[str]:
    """Training texts from a file: `.jsonl` (one object with a `text` field per line), `.json` (a list of strings or
    of such objects) or plain text (one text per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"`train_file` {str(path)!r} does not exist.")
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        items = [json.loads(line) for line in raw.splitlines() if line.strip()]
    elif path.suffix == ".json":
        items = json.loads(raw)
    else:
        items = raw.splitlines()
    texts = [item["text"] if isinstance(item, dict) else item for item in items]
    if not all(isinstance(t, str) for t in texts):
        raise ValueError(f"`train_file` {str(path)!r} must hold texts (strings or objects with a `text` field).")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"`train_file` {str(path)!r} holds no non-empty text.")
    return texts


def _load(src: str):
    """`(model, tokenizer, st_model or None)` from a checkpoint folder or Hub id, in fp32."""
    import transformers

    if is_sentence_transformer(src):
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(src), device="cpu")
        return st[0].auto_model.float(), st.tokenizer, st
    config = transformers.AutoConfig.from_pretrained(src)
    architecture = (getattr(config, "architectures", None) or [""])[0]
    model_class = getattr(transformers, architecture, None) or transformers.AutoModel
    model = model_class.from_pretrained(src, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(src)
    return model, tokenizer, None


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished folder `tmp` to `out`; an existing `out` is replaced only with `overwrite`."""
    if out.exists():
        if any(out.iterdir()) and not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass `overwrite=True` (`--overwrite`).")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


def distill_checkpoint(
    src: str,
    out: str | Path,
    method: str,
    texts: Sequence[str],
    config: DistillConfig | None = None,
    *,
    layers: list[int] | None = None,
    keep_softmax: int = 0,
    overwrite: bool = False,
    **hparams: Any,
) -> DistillResult:
    """Convert the checkpoint `src`, distil it on `texts` and save it to `out` (`hf-lara distill`).

    A sentence-transformers folder is loaded as a `SentenceTransformer`, distilled through its own pooling and saved
    with `SentenceTransformer.save`, so `SentenceTransformer(out)` loads it (after `import hf_lara`). Other checkpoints
    are saved with `save_pretrained`, their tokenizer and a model card. The folder is written next to `out` under a
    temporary name and renamed when complete; `distill_results.json` records what `distill` did.

    Args:
        src (`str`): checkpoint folder or Hub id.
        out (`str` or `Path`): output folder (must be absent or empty unless `overwrite`).
        method (`str`): the estimator; `**hparams` its hyper-parameters (`layer_hparams` among them: per-layer
            overrides, as in `hf_lara.convert`).
        texts (`list[str]`): training texts.
        config (`DistillConfig`, *optional*): distillation settings.
        layers (`list[int]`, *optional*): layers to convert (default: all).
        keep_softmax (`int`, *optional*, defaults to 0): leave this many layers with the largest measured attention
            error on softmax (measured on the first training texts, see `hf_lara.integration.calibration`).
        overwrite (`bool`, *optional*, defaults to `False`): replace a non-empty `out`.
    """
    from .integration import LaraConfig, convert

    config = config or DistillConfig()
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass `overwrite=True` (`--overwrite`).")
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("`texts` holds no non-empty text to train on.")
    model, tokenizer, st = _load(src)
    # check the method and hyper-parameters before anything long
    LaraConfig.from_config(model.config, method=method, layers=layers, **hparams)
    calibration = None
    if keep_softmax:
        calibration = length_batches(tokenizer, texts[:64], max_length=config.max_length, batch_tokens=4096)
    convert(model, method, layers=layers, keep_softmax=keep_softmax, calibration=calibration, **hparams)
    pooler = sentence_transformers_pooler(st) if st is not None else None
    if st is not None:
        st.max_seq_length = max(st.max_seq_length or 0, config.max_length)
    result = distill(model, tokenizer, texts, config, pooler=pooler)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if st is not None:
            st.save(str(tmp))
        else:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            from .cards import build_card

            build_card(model, base_model=src if not Path(src).exists() else None).save(tmp / "README.md")
        summary = {"method": method, "hparams": hparams, "config": asdict(config), **result.to_dict()}
        calibration_report = getattr(model, "lara_calibration", None)
        if calibration_report is not None:
            summary["calibration"] = calibration_report.to_dict()
        (tmp / "distill_results.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
        _publish(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result
