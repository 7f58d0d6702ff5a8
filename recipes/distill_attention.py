"""Two-stage distillation of a converted model towards its teacher, the same weights with exact softmax attention.

A thin Accelerate script over `hf_lara.distill` (the package's `distill()` and `hf-lara distill` use the same pieces);
the training loop is written out below.

- **Stage 1, attention transfer** (`--stages 1`). Only the estimators' own parameters train (kernel feature maps,
  EVA's adaptive chunk projections, LARA's adaptive maps or causal proposal means). Inside
  `distill.attention_losses`, every converted layer computes its softmax output (the teacher) and its estimator's
  output from the same queries, keys and values, records the estimator's relative squared error (plus Hedgehog's row
  cross-entropy with `--attn_rows_weight`) and hands the teacher's output on, so errors never compound in training.
- **Stage 2, end to end** (`--stages 2`). The converted model runs on its own and learns to reproduce the teacher's
  outputs (`distill.output_loss`: mean-pooled embedding cosine plus final hidden states for encoders, logits KL for
  decoders), training LoRA adapters (`peft`, on every linear layer but the estimators' and the output embedding) and
  the estimator parameters. The adapters are merged before saving, so the output is a plain converted checkpoint.

`--stages 1,2` (the default) gives stage 1 the first `--stage1_share` of the optimizer steps and stage 2 the rest, in
one run with one `accelerator.prepare`; checkpoints and `--resume_from_checkpoint` work across the boundary. Before
and after training the script reports, on the validation set, each layer's relative attention-output error (teacher
forced) and the cosine between mean-pooled final hidden states of the converted model and of the teacher.

Launch:
    accelerate launch recipes/distill_attention.py \
        --model_name_or_path sentence-transformers/all-MiniLM-L6-v2 --method kernel --hparam feature_map=hedgehog \
        --dataset_name wikitext --dataset_config_name wikitext-2-raw-v1 --max_seq_length 256 \
        --learning_rate 1e-2 --max_train_steps 500 --stages 1,2 --output_dir minilm-hedgehog
"""

from __future__ import annotations

import argparse
import itertools
import math

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
from transformers import DataCollatorWithPadding

from hf_lara import distill
from hf_lara.arguments import parse_ints


def auto_class_for(config: transformers.PreTrainedConfig) -> type:
    """The Auto class of the checkpoint's own architecture, so that heads are kept in the saved model."""
    architecture = (getattr(config, "architectures", None) or [""])[0]
    if architecture.endswith("LMHeadModel"):
        return transformers.AutoModelForCausalLM
    _, sep, task = architecture.partition("For")
    return getattr(transformers, f"AutoModelFor{task}", transformers.AutoModel) if sep else transformers.AutoModel


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


def stage_steps(args: argparse.Namespace, total: int) -> dict[int, int]:
    """Optimizer steps of each stage: with both, stage 1 gets `--stage1_share` of `total` (at least one step each)."""
    if len(args.stages) == 1:
        return {args.stages[0]: total}
    if total < 2:
        raise RecipeError(f"`--stages 1,2` needs at least 2 optimizer steps, got {total}; raise `--max_train_steps`.")
    first = min(max(1, round(total * args.stage1_share)), total - 1)
    return {1: first, 2: total - first}


def stage_at(steps: dict[int, int], completed_steps: int) -> int:
    """The stage the next optimizer step belongs to."""
    first = next(iter(steps))
    return first if completed_steps < steps[first] else list(steps)[-1]


def evaluate_fidelity(accelerator, model, dataloader) -> dict:
    """Per-layer relative attention-output error `sqrt(sum ||s - t||^2 / sum ||t||^2)` over real tokens (teacher
    forced; the ratio averaged over validation batches) and the cosine of mean-pooled final hidden states, converted
    model on its own vs the teacher (mean over validation texts).

    `model` is the unwrapped model: each process evaluates its share of the batches without gradients.
    """
    causal = distill.is_causal(model)
    errors, cosines = [], []
    model.eval()
    with isolated_rng(accelerator), torch.no_grad():
        for batch in dataloader:
            with distill.attention_losses(model) as sinks:
                model(**batch)
            layers = sorted(sinks)
            errors.append(accelerator.gather(torch.stack([torch.stack(sinks[i].losses).mean() for i in layers])[None]))
            with distill.as_teacher(model):
                teacher, _ = distill.model_outputs(model, batch, causal)
            student, _ = distill.model_outputs(model, batch, causal)
            mask = batch["attention_mask"]
            pooled = distill.mean_pooler(student, mask), distill.mean_pooler(teacher, mask)
            cosines.append(accelerator.gather_for_metrics(torch.nn.functional.cosine_similarity(*pooled, dim=-1)))
    per_layer = torch.cat(errors).mean(0).sqrt()
    return {
        "layers": layers,
        "per_layer_relative_error": per_layer.tolist(),
        "relative_error": per_layer.mean().item(),
        "embedding_cosine": torch.cat(cosines).mean().item(),
    }


def report(accelerator, before: dict, after: dict) -> None:
    accelerator.print("layer  relative error before -> after")
    for i, layer in enumerate(after["layers"]):
        b, a = before["per_layer_relative_error"][i], after["per_layer_relative_error"][i]
        accelerator.print(f"{layer:5d}  {b:.4f} -> {a:.4f}")
    accelerator.print(f"all    {before['relative_error']:.4f} -> {after['relative_error']:.4f}")
    accelerator.print(f"embedding cosine {before['embedding_cosine']:.4f} -> {after['embedding_cosine']:.4f}")


def training_function(args: argparse.Namespace) -> transformers.PreTrainedModel:
    """Distil, evaluate and save; returns the distilled model, unwrapped (for callers that import the recipe)."""
    accelerator = make_accelerator(args)
    set_seed(args.seed)

    tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer_name or args.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_dataloader, eval_dataloader = get_dataloaders(accelerator, args, tokenizer)

    config = transformers.AutoConfig.from_pretrained(args.model_name_or_path)
    model = load_model(auto_class_for(config), args, dtype=torch.float32)
    num_layers = len(model.lara_estimators())
    estimators = distill.estimator_parameters(model)
    if 1 in args.stages and not estimators:
        raise RecipeError(
            f"Nothing to train: the `{model.config.lara_method}` estimators of this model have no parameters that "
            "take part in its attention. Distil a trainable estimator: `kernel` (feature maps), `eva` "
            "(`adaptive=true`, the default), `lara` with `adaptive=true` (encoders) or `lara` (decoders: proposal "
            "means); or train LoRA adapters end to end only with `--stages 2`."
        )
    model.requires_grad_(False)
    if 2 in args.stages:
        # LoRA adapters for stage 2, zero at first; stage 1 runs with them disabled
        model = distill.add_lora(model, args.lora_rank, args.seed)
    for parameter in estimators:
        parameter.requires_grad_(True)
    chosen = {id(p) for p in estimators}
    adapters = [p for p in model.parameters() if p.requires_grad and id(p) not in chosen]
    trainable = estimators + adapters
    accelerator.print(
        f"Training {sum(p.numel() for p in estimators):,} estimator parameters in {num_layers} layers and "
        f"{sum(p.numel() for p in adapters):,} LoRA parameters, stages {','.join(map(str, args.stages))}, "
        f"on {accelerator.num_processes} process(es) ({accelerator.distributed_type.value})"
    )

    total, _ = num_training_steps(args, math.ceil(len(train_dataloader) / accelerator.num_processes))
    steps = stage_steps(args, total)
    # one optimizer and schedule per stage: estimators alone, then LoRA adapters plus estimators
    params = {1: estimators, 2: [{"params": adapters, "lr": args.lora_learning_rate}, {"params": estimators}]}
    optimization = [
        build_optimizer_and_scheduler(accelerator, args, params[stage], train_dataloader, steps[stage])
        for stage in steps
    ]
    model, train_dataloader, eval_dataloader, *prepared = accelerator.prepare(
        model, train_dataloader, eval_dataloader, *itertools.chain(*optimization)
    )
    optimization = {stage: prepared[2 * i : 2 * i + 2] for i, stage in enumerate(steps)}
    unwrapped = accelerator.unwrap_model(model)
    causal = distill.is_causal(unwrapped)
    if args.with_tracking:
        accelerator.init_trackers("distill_attention", tracker_config(args))

    progress = resume_progress(accelerator, args)
    before = evaluate_fidelity(accelerator, unwrapped, eval_dataloader)
    max_train_steps, num_epochs = num_training_steps(args, len(train_dataloader))
    progress_bar = tqdm(range(max_train_steps), disable=not accelerator.is_local_main_process)
    progress_bar.update(progress.completed_steps)
    starting_epoch, resumed_batches = progress.epoch, progress.batches
    window = LossWindow()
    # no dropout: the teacher is deterministic and the estimators train as they run at inference
    model.eval()
    for epoch in range(starting_epoch, num_epochs):
        train_dataloader.set_epoch(epoch)
        progress.epoch, progress.batches = epoch, 0
        active_dataloader = train_dataloader
        if epoch == starting_epoch and resumed_batches:
            # resuming inside an epoch: skip the batches the checkpoint had already consumed
            active_dataloader = accelerator.skip_first_batches(train_dataloader, resumed_batches)
            progress.batches = resumed_batches
        for batch in active_dataloader:
            stage = stage_at(steps, progress.completed_steps)
            optimizer, scheduler = optimization[stage]
            with accelerator.accumulate(model):
                if stage == 1:
                    # each converted layer: its estimator vs softmax on the same queries, keys and values
                    with distill.attention_losses(unwrapped, args.attn_rows_weight) as sinks:
                        model(**batch)
                    loss = distill.transfer_loss(unwrapped, sinks)
                else:
                    # the converted model on its own vs the same weights with softmax and no adapters
                    with distill.as_teacher(unwrapped):
                        target = distill.model_outputs(unwrapped, batch, causal)
                    student = distill.model_outputs(model, batch, causal)
                    loss = distill.output_loss(student, target, batch["attention_mask"], None, args.hidden_weight)
                # DDP needs a gradient for every trainable parameter in every step, also those this step leaves
                # unused (the other stage's, EVA's projections on short inputs)
                loss = loss + 0.0 * sum(p.sum() for p in trainable)
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

    if 2 in steps:
        unwrapped = unwrapped.merge_and_unload()
    unwrapped.requires_grad_(False)
    after = evaluate_fidelity(accelerator, unwrapped, eval_dataloader)
    report(accelerator, before, after)
    if args.with_tracking:
        accelerator.log(
            {"eval_relative_error": after["relative_error"], "eval_embedding_cosine": after["embedding_cosine"]}
        )
        accelerator.end_training()
    save_final(accelerator, unwrapped, args, tokenizer, results={"before": before, "after": after, "steps": steps})
    return unwrapped


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(parser)
    add_data_args(parser)
    parser.add_argument(
        "--text_column_name", default=None, help="Column holding the text (default: `text` or the first)."
    )
    parser.add_argument("--max_seq_length", type=int, default=128, help="Truncate inputs to this many tokens.")
    group = parser.add_argument_group("distillation")
    group.add_argument("--stages", default="1,2", help="1 = attention transfer, 2 = end to end (default: 1,2).")
    group.add_argument(
        "--stage1_share", type=float, default=0.3, help="Share of the optimizer steps given to stage 1 when both run."
    )
    group.add_argument(
        "--attn_rows_weight",
        type=float,
        default=0.0,
        help="Stage 1: weight of Hedgehog's cross-entropy between softmax and estimated attention rows (O(N^2)).",
    )
    group.add_argument("--lora_rank", type=int, default=16, help="Stage 2: LoRA rank r (lora_alpha = 2 r).")
    group.add_argument(
        "--lora_learning_rate", type=float, default=2e-3, help="Stage 2: learning rate of the LoRA adapters."
    )
    group.add_argument(
        "--hidden_weight",
        type=float,
        default=0.1,
        help="Stage 2, encoders: weight of the final hidden states' error next to the embedding cosine loss.",
    )
    add_training_args(parser, learning_rate=1e-3)
    args = parser.parse_args(argv)
    check_common_args(args)
    args.stages = tuple(parse_ints(args.stages, "--stages", minimum=1))
    # the package's checks of the same settings: stages in {1, 2}, share in (0, 1), weights >= 0, rank >= 1
    distill.DistillConfig(
        stages=args.stages,
        stage1_share=args.stage1_share,
        rows_weight=args.attn_rows_weight,
        hidden_weight=args.hidden_weight,
        lora_rank=args.lora_rank,
        stage2_lr=args.lora_learning_rate,
    )
    args.stages = tuple(sorted(set(args.stages)))
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
