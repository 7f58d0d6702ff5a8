"""Attention transfer: train a converted model's estimators to reproduce its own softmax attention.

The converted model is the student; the same weights with exact softmax are the teacher. Everything is frozen except
the estimators' own parameters (kernel feature maps, EVA's adaptive chunk projections, LARA's adaptive landmark maps
or causal proposal means), which learn to match every layer's softmax attention output, and optionally the softmax
attention rows (Hedgehog's cross-entropy). Works for encoders (BERT-like) and decoders (Llama, GPT-2, ...) alike.

How a step works: one forward pass, under a distillation attention function registered with Transformers'
`AttentionInterface`. In every converted layer it receives the layer's queries, keys and values, computes the exact
softmax output (the teacher) and the estimator's output (the student, through hf_lara's own attention function) from
those same tensors, records the student's error, and hands the *teacher's* output on. So each layer is trained on
the hidden states of the original model and errors never compound during training. The compared outputs are the
attention outputs of all heads before the output projection (the estimators' own output).

Evaluation, before and after training, reports per layer the relative error of the attention output (same teacher
forcing) with hf_lara's bundled `attention_fidelity` metric, and the cosine between mean-pooled final hidden states
of the converted model running on its own and of the original model.

Launch:
    accelerate launch recipes/distill_attention.py \
        --model_name_or_path sentence-transformers/all-MiniLM-L6-v2 --method kernel --hparam feature_map=hedgehog \
        --dataset_name wikitext --dataset_config_name wikitext-2-raw-v1 --max_seq_length 128 \
        --learning_rate 1e-2 --max_train_steps 500 --output_dir minilm-hedgehog
"""

from __future__ import annotations

import argparse

import torch
import transformers
from accelerate.utils import set_seed
from recipe_utils import (
    LossWindow,
    RecipeError,
    add_data_args,
    add_model_args,
    add_training_args,
    build_optimizer_and_scheduler,
    check_common_args,
    checkpoint_name,
    exit_on_error,
    isolated_rng,
    load_model,
    load_text_datasets,
    make_accelerator,
    make_dataloaders,
    num_training_steps,
    require_columns,
    resume_progress,
    save_checkpoint,
    save_final,
    tracker_config,
)
from tqdm.auto import tqdm
from transformers import AttentionInterface, AttentionMaskInterface, DataCollatorWithPadding
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from hf_lara import metrics
from hf_lara.integration import ATTENTION_KEY, ESTIMATOR_ATTR

#: Attention implementation used while distilling: teacher output forward, student error recorded.
DISTILL_KEY = "hf_lara_distill"
#: Sequence length of the synthetic probe that finds which estimator parameters take part in the forward.
PROBE_LENGTH = 256


class AttentionRecorder:
    """What the distillation attention function saw in the current forward pass, keyed by layer index.

    Training (`keep_outputs=False`) records each layer's losses; evaluation records the student and teacher outputs
    `(B, N, H * D)` and the query mask `(B, N)`.
    """

    def __init__(self) -> None:
        self.layer_of: dict[int, int] = {}
        self.rows_weight = 0.0
        self.keep_outputs = False
        self.losses: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def attach(self, model: transformers.PreTrainedModel, rows_weight: float) -> None:
        self.layer_of = {id(estimator): i for i, estimator in model.lara_estimators().items()}
        self.rows_weight = rows_weight

    def clear(self) -> None:
        self.losses, self.outputs = {}, {}


RECORDER = AttentionRecorder()


def repeat_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """`(B, H_kv, N, D)` -> `(B, num_heads, N, D)` for grouped-query attention."""
    return x.repeat_interleave(num_heads // x.shape[1], dim=1) if x.shape[1] != num_heads else x


def softmax_attention(query, key, value, padding_mask, causal, scaling):
    """Exact attention in fp32: output `(B, Nq, H, D)` and probabilities `(B, H, Nq, Nk)`; queries are the last keys."""
    num_heads, Nq, Nk = query.shape[1], query.shape[2], key.shape[2]
    query, key, value = query.float(), repeat_heads(key, num_heads).float(), repeat_heads(value, num_heads).float()
    allowed = torch.ones(Nq, Nk, dtype=torch.bool, device=query.device)
    if causal:
        allowed = allowed.tril(diagonal=Nk - Nq)
    allowed = allowed[None, None]
    if padding_mask is not None:
        allowed = allowed & padding_mask[:, None, None, :]
    # the reference stays fp32 under bf16/fp16 autocast
    with torch.autocast(device_type=query.device.type, enabled=False):
        scores = query @ key.transpose(-1, -2) * scaling  # (B, H, Nq, Nk)
        # a finite fill keeps rows without any allowed key (padded queries) finite; every loss masks them out
        probs = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min).softmax(dim=-1)
        out = probs @ value
    return out.transpose(1, 2), probs


def estimated_rows(student_fn, module, query, key, padding_mask, scaling, **kwargs) -> torch.Tensor:
    """The estimator's implied attention rows `(B, H, Nq, Nk)`: its output for one-hot values, `D` keys at a time.

    Every estimator is linear in the values, so values `e_j` give column `j` of its attention matrix. Each slice
    replays the same random state, so randomized estimators use one draw for all columns.
    """
    B, H_kv, Nk, D = key.shape
    eye = torch.eye(Nk, device=key.device, dtype=key.dtype)
    eye = torch.nn.functional.pad(eye, (0, -Nk % D))  # (Nk, ceil(Nk / D) * D)
    state = rng_state(key.device)
    columns = []
    for start in range(0, eye.shape[1], D):
        set_rng_state(key.device, state)
        values = eye[:, start : start + D].expand(B, H_kv, Nk, D)
        columns.append(student_fn(module, query, key, values, padding_mask, scaling=scaling, **kwargs)[0])
    return torch.cat(columns, dim=-1)[..., :Nk].transpose(1, 2)  # (B, H, Nq, Nk)


def rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def distillation_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """`AttentionInterface` function: returns the teacher's output, records the student's error in `RECORDER`."""
    causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", False)))
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    teacher, probs = softmax_attention(query, key, value, attention_mask, causal, scaling)
    estimator = getattr(module, ESTIMATOR_ATTR, None)
    if estimator is None or id(estimator) not in RECORDER.layer_of:
        return teacher.to(query.dtype), None
    layer = RECORDER.layer_of[id(estimator)]
    student_fn = ALL_ATTENTION_FUNCTIONS[ATTENTION_KEY]
    student = student_fn(module, query, key, value, attention_mask, scaling=scaling, **kwargs)[0].float()
    B, Nq = query.shape[0], query.shape[2]
    rows = (
        torch.ones(B, Nq, 1, 1, device=query.device) if attention_mask is None else attention_mask[:, -Nq:, None, None]
    )
    if RECORDER.keep_outputs:
        RECORDER.outputs[layer] = (student.detach().flatten(2), teacher.flatten(2), rows.flatten(1))
        return teacher.to(query.dtype), None
    # relative squared error over real query rows
    loss = ((student - teacher) ** 2 * rows).sum() / ((teacher**2) * rows).sum().clamp_min(1e-12)
    if RECORDER.rows_weight > 0:
        estimate = estimated_rows(student_fn, module, query, key, attention_mask, scaling, **kwargs)
        loss = loss + RECORDER.rows_weight * row_cross_entropy(probs, estimate.float(), rows.flatten(1))
    RECORDER.losses[layer] = loss
    return teacher.to(query.dtype), None


def row_cross_entropy(probs: torch.Tensor, estimate: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Hedgehog's loss: mean over heads and real query rows of `-sum_j p_ij log(estimate_ij)`; `rows` is `(B, Nq)`."""
    cross_entropy = -(probs * estimate.clamp_min(1e-6).log()).sum(-1)  # (B, H, Nq)
    mask = rows[:, None, :].to(cross_entropy.dtype)
    return (cross_entropy * mask).sum() / (mask.sum() * cross_entropy.shape[1])


def register_distillation_attention() -> None:
    """Register `DISTILL_KEY`; its masks are hf_lara's 2-D padding masks, which both branches take."""
    AttentionInterface.register(DISTILL_KEY, distillation_attention)
    AttentionMaskInterface.register(DISTILL_KEY, ALL_MASK_ATTENTION_FUNCTIONS[ATTENTION_KEY])


def auto_class_for(config: transformers.PreTrainedConfig) -> type:
    """The Auto class of the checkpoint's own architecture, so that heads are kept in the saved model."""
    architecture = (getattr(config, "architectures", None) or [""])[0]
    if architecture.endswith("LMHeadModel"):
        return transformers.AutoModelForCausalLM
    _, sep, task = architecture.partition("For")
    return getattr(transformers, f"AutoModelFor{task}", transformers.AutoModel) if sep else transformers.AutoModel


def trainable_parameters(model: transformers.PreTrainedModel) -> list[torch.nn.Parameter]:
    """Freeze the model, then unfreeze the estimator parameters the forward pass really uses.

    A synthetic probe runs every estimator once in its layer's mode (causal or not) and keeps the parameters that
    receive a gradient, so mode-specific parameters (LARA's causal proposals in an encoder, say) stay frozen.
    """
    model.requires_grad_(False)
    trainable = []
    for module in model.modules():
        estimator = getattr(module, ESTIMATOR_ATTR, None)
        if estimator is None or not any(True for _ in estimator.parameters()):
            continue
        estimator.float().requires_grad_(True)
        reference = next(estimator.parameters())
        q, k, v = torch.randn(3, 1, estimator.num_heads, PROBE_LENGTH, estimator.head_dim, device=reference.device)
        with torch.enable_grad():
            out = estimator(q, k, v, causal=bool(getattr(module, "is_causal", False)))
            auxiliary = estimator.auxiliary_loss()
            probe = out.square().sum() + (0.0 if auxiliary is None else auxiliary)
            if probe.requires_grad:  # False when no parameter takes part at all
                probe.backward()
        for parameter in estimator.parameters():
            parameter.requires_grad_(parameter.grad is not None)
            parameter.grad = None
            if parameter.requires_grad:
                trainable.append(parameter)
    return trainable


def distillation_loss(model, trainable) -> torch.Tensor:
    """Mean per-layer loss, plus the estimators' auxiliary losses; `0 * sum(p)` keeps every trainable parameter in
    the graph, so DDP finds a gradient for each even when a batch leaves some unused (short inputs, EVA windows)."""
    loss = torch.stack(list(RECORDER.losses.values())).mean()
    for estimator in model.lara_estimators().values():
        auxiliary = estimator.auxiliary_loss()
        if auxiliary is not None:
            loss = loss + auxiliary
    return loss + 0.0 * sum(p.sum() for p in trainable)


def get_dataloaders(accelerator, args, tokenizer):
    """Tokenised `train` and `validation` dataloaders (dynamic padding)."""
    raw = load_text_datasets(args, keep_linebreaks=False)
    column = args.text_column_name or ("text" if "text" in raw["train"].column_names else raw["train"].column_names[0])
    require_columns(raw, {"--text_column_name": column}, args)

    def tokenize(examples):
        return tokenizer(examples[column], truncation=True, max_length=args.max_seq_length)

    with accelerator.main_process_first():
        raw = raw.filter(lambda example: bool(example[column] and str(example[column]).strip()))
        tokenized = raw.map(
            tokenize,
            batched=True,
            num_proc=args.preprocessing_num_workers,
            remove_columns=raw["train"].column_names,
            load_from_cache_file=not args.overwrite_cache,
            desc="Tokenizing",
        )
    pad_to = 8 if accelerator.mixed_precision != "no" else None
    collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to)
    return make_dataloaders(tokenized["train"], tokenized["validation"], collator, args)


def mean_pooled(model, unwrapped, batch, implementation: str) -> torch.Tensor:
    """Mean of the final hidden states over real tokens, with the given attention implementation.

    The hidden states are taken with a hook on the base model, whatever head the checkpoint has (and independently
    of `output_hidden_states`).
    """
    unwrapped.set_attn_implementation(implementation)
    captured = {}
    handle = unwrapped.base_model.register_forward_hook(lambda module, args, output: captured.update(hidden=output[0]))
    try:
        model(**batch)
    finally:
        handle.remove()
    hidden = captured["hidden"].float()
    mask = batch["attention_mask"][..., None].to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def evaluate_fidelity(accelerator, model, dataloader) -> dict:
    """Per-layer attention-output error (teacher forced) and end-to-end embedding cosine, on the validation set."""
    unwrapped = accelerator.unwrap_model(model)
    layer_metric, embedding_metric = metrics.load("attention_fidelity"), metrics.load("attention_fidelity")
    model.eval()
    RECORDER.keep_outputs = True
    with isolated_rng(accelerator), torch.no_grad():
        for batch in dataloader:
            RECORDER.clear()
            unwrapped.set_attn_implementation(DISTILL_KEY)
            model(**batch)
            for layer, outputs in sorted(RECORDER.outputs.items()):
                student, teacher, rows = accelerator.gather_for_metrics(
                    accelerator.pad_across_processes(outputs, dim=1)
                )
                keep = rows.bool()
                layer_metric.add_batch(
                    predictions=student[keep].float().cpu().numpy(),
                    references=teacher[keep].float().cpu().numpy(),
                    layer=[layer] * int(keep.sum()),
                )
            teacher = mean_pooled(model, unwrapped, batch, "sdpa")
            student = mean_pooled(model, unwrapped, batch, ATTENTION_KEY)
            student, teacher = accelerator.gather_for_metrics((student, teacher))
            embedding_metric.add_batch(
                predictions=student.cpu().numpy(), references=teacher.cpu().numpy(), layer=[0] * len(student)
            )
    RECORDER.keep_outputs = False
    RECORDER.clear()
    unwrapped.set_attn_implementation(DISTILL_KEY)
    fidelity, embedding = layer_metric.compute(), embedding_metric.compute()
    return {
        "layers": fidelity["layers"],
        "per_layer_relative_error": fidelity["per_layer_relative_error"],
        "relative_error": fidelity["relative_error"],
        "embedding_cosine": embedding["cosine"],
    }


def student_mode(model, unwrapped) -> None:
    """Frozen layers in eval mode (no dropout: the teacher is deterministic), estimators in train mode."""
    model.eval()
    for estimator in unwrapped.lara_estimators().values():
        estimator.train()


def report(accelerator, before: dict, after: dict) -> None:
    accelerator.print("layer  relative error before -> after")
    for i, layer in enumerate(after["layers"]):
        b, a = before["per_layer_relative_error"][i], after["per_layer_relative_error"][i]
        accelerator.print(f"{layer:5d}  {b:.4f} -> {a:.4f}")
    accelerator.print(f"all    {before['relative_error']:.4f} -> {after['relative_error']:.4f}")
    accelerator.print(f"embedding cosine {before['embedding_cosine']:.4f} -> {after['embedding_cosine']:.4f}")


def training_function(args: argparse.Namespace) -> transformers.PreTrainedModel:
    """Train, evaluate and save; returns the trained model, unwrapped (for callers that import the recipe)."""
    accelerator = make_accelerator(args)
    set_seed(args.seed)
    register_distillation_attention()

    tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer_name or args.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_dataloader, eval_dataloader = get_dataloaders(accelerator, args, tokenizer)

    config = transformers.AutoConfig.from_pretrained(args.model_name_or_path)
    model = load_model(auto_class_for(config), args, dtype=torch.float32)
    trainable = trainable_parameters(model)
    if not trainable:
        raise RecipeError(
            f"Nothing to train: the `{model.config.lara_method}` estimators of this model have no parameters that "
            "take part in its attention. Distil a trainable estimator: `kernel` (feature maps), `eva` "
            "(`adaptive=true`, the default), `lara` with `adaptive=true` (encoders) or `lara` (decoders: proposal means)."
        )
    RECORDER.attach(model, args.attn_rows_weight)
    model.set_attn_implementation(DISTILL_KEY)
    accelerator.print(
        f"Training {sum(p.numel() for p in trainable):,} estimator parameters in {len(RECORDER.layer_of)} layers "
        f"on {accelerator.num_processes} process(es) ({accelerator.distributed_type.value})"
    )

    optimizer, scheduler = build_optimizer_and_scheduler(accelerator, args, trainable, train_dataloader)
    model, optimizer, train_dataloader, eval_dataloader, scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader, scheduler
    )
    unwrapped = accelerator.unwrap_model(model)
    if args.with_tracking:
        accelerator.init_trackers("distill_attention", tracker_config(args))

    progress = resume_progress(accelerator, args)
    before = evaluate_fidelity(accelerator, model, eval_dataloader)
    max_train_steps, num_epochs = num_training_steps(args, len(train_dataloader))
    progress_bar = tqdm(range(max_train_steps), disable=not accelerator.is_local_main_process)
    progress_bar.update(progress.completed_steps)
    starting_epoch, resumed_batches = progress.epoch, progress.batches
    window = LossWindow()
    for epoch in range(starting_epoch, num_epochs):
        student_mode(model, unwrapped)
        train_dataloader.set_epoch(epoch)
        progress.epoch, progress.batches = epoch, 0
        active_dataloader = train_dataloader
        if epoch == starting_epoch and resumed_batches:
            # resuming inside an epoch: skip the batches the checkpoint had already consumed
            active_dataloader = accelerator.skip_first_batches(train_dataloader, resumed_batches)
            progress.batches = resumed_batches
        for batch in active_dataloader:
            with accelerator.accumulate(model):
                RECORDER.clear()
                model(**batch)
                loss = distillation_loss(unwrapped, trainable)
                RECORDER.clear()  # the loss holds the graph; the recorder need not
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            progress.batches += 1
            window.add(loss)
            if not accelerator.sync_gradients:
                continue
            progress.completed_steps += 1
            progress_bar.update(1)
            last = progress.completed_steps >= max_train_steps
            window.log(accelerator, args, progress.completed_steps, scheduler.get_last_lr()[0], last)
            if name := checkpoint_name(args, progress, end_of_epoch=False):
                save_checkpoint(accelerator, args, progress, name)
            if last:
                break

        progress.epoch, progress.batches = epoch + 1, 0
        if name := checkpoint_name(args, progress, end_of_epoch=True):
            save_checkpoint(accelerator, args, progress, name)
        if progress.completed_steps >= max_train_steps:
            break

    after = evaluate_fidelity(accelerator, model, eval_dataloader)
    report(accelerator, before, after)
    if args.with_tracking:
        accelerator.log(
            {"eval_relative_error": after["relative_error"], "eval_embedding_cosine": after["embedding_cosine"]}
        )
        accelerator.end_training()
    unwrapped.set_attn_implementation(ATTENTION_KEY)
    save_final(accelerator, model, args, tokenizer, results={"before": before, "after": after})
    return accelerator.unwrap_model(model)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(parser)
    add_data_args(parser)
    parser.add_argument(
        "--text_column_name", default=None, help="Column holding the text (default: `text` or the first)."
    )
    parser.add_argument("--max_seq_length", type=int, default=128, help="Truncate inputs to this many tokens.")
    parser.add_argument(
        "--attn_rows_weight",
        type=float,
        default=0.0,
        help="Weight of Hedgehog's cross-entropy between softmax and estimated attention rows (O(N^2) memory).",
    )
    add_training_args(parser, learning_rate=1e-3)
    args = parser.parse_args(argv)
    check_common_args(args)
    if args.attn_rows_weight < 0:
        raise ValueError(f"`--attn_rows_weight` must be >= 0, got {args.attn_rows_weight}.")
    return args


def main(argv: list[str] | None = None) -> None:
    try:
        args = parse_args(argv)
    except ValueError as error:
        exit_on_error(__file__, error)
    try:
        training_function(args)
    except RecipeError as error:
        exit_on_error(__file__, error)


if __name__ == "__main__":
    main()
