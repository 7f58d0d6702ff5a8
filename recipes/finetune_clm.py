"""Causal language modelling with a converted decoder: fine-tune it end to end and report validation perplexity.

Give a base decoder plus `--method` (it is converted before training) or an already converted checkpoint, e.g.
the output of `distill_attention.py`. Texts from the Hub or local txt/csv/json files are tokenised, concatenated
and cut into blocks of `--block_size` tokens, as in Transformers' `run_clm_no_trainer.py`.

Launch:
    accelerate launch recipes/finetune_clm.py \
        --model_name_or_path gpt2 --method kernel --hparam feature_map=hedgehog \
        --dataset_name wikitext --dataset_config_name wikitext-2-raw-v1 --block_size 512 \
        --learning_rate 1e-4 --num_train_epochs 1 --checkpointing_steps 500 --output_dir gpt2-hedgehog
"""

from __future__ import annotations

import argparse
from itertools import chain

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
    decay_groups,
    estimators_have_parameters,
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
from transformers import AutoModelForCausalLM, default_data_collator

from hf_lara import metrics


def get_dataloaders(accelerator, args, tokenizer):
    """`train` and `validation` dataloaders of `--block_size`-token blocks (inputs are their own labels)."""
    raw = load_text_datasets(args, keep_linebreaks=not args.no_keep_linebreaks)
    column = args.text_column_name or ("text" if "text" in raw["train"].column_names else raw["train"].column_names[0])
    require_columns(raw, {"--text_column_name": column}, args)
    block_size = min(args.block_size, tokenizer.model_max_length)

    def tokenize(examples):
        return tokenizer(examples[column])

    def group_texts(examples):
        # concatenate everything, then cut into full blocks; the remainder shorter than a block is dropped
        joined = {k: list(chain(*examples[k])) for k in examples}
        total = (len(joined["input_ids"]) // block_size) * block_size
        blocks = {k: [t[i : i + block_size] for i in range(0, total, block_size)] for k, t in joined.items()}
        blocks["labels"] = [ids.copy() for ids in blocks["input_ids"]]
        return blocks

    with accelerator.main_process_first():
        tokenized = raw.map(
            tokenize,
            batched=True,
            num_proc=args.preprocessing_num_workers,
            remove_columns=raw["train"].column_names,
            load_from_cache_file=not args.overwrite_cache,
            desc="Tokenizing",
        )
        blocks = tokenized.map(
            group_texts,
            batched=True,
            num_proc=args.preprocessing_num_workers,
            load_from_cache_file=not args.overwrite_cache,
            desc=f"Grouping texts in blocks of {block_size}",
        )
    for split in ("train", "validation"):
        if len(blocks[split]) == 0:
            raise RecipeError(
                f"The {split} split has fewer than `--block_size` {block_size} tokens in total; lower `--block_size`."
            )
    return make_dataloaders(blocks["train"], blocks["validation"], default_data_collator, args)


def evaluate_model(accelerator, model, dataloader) -> dict:
    """Perplexity over every predicted token of the validation blocks, through the bundled `perplexity` metric."""
    perplexity = metrics.load("perplexity")
    model.eval()
    with isolated_rng(accelerator), torch.no_grad():
        for batch in dataloader:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
            labels = batch["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().transpose(1, 2), labels, reduction="none", ignore_index=-100
            )  # (B, T - 1)
            nll, counts = nll.sum(-1), (labels != -100).sum(-1)
            nll, counts = accelerator.gather_for_metrics((nll, counts))
            perplexity.add_batch(nll=nll.cpu().double().numpy(), num_tokens=counts.cpu().numpy())
    result = perplexity.compute()
    return {"perplexity": result["perplexity"], "loss": result["loss"]}


def training_function(args: argparse.Namespace) -> transformers.PreTrainedModel:
    """Train, evaluate and save; returns the trained model, unwrapped (for callers that import the recipe)."""
    # DDP must tolerate estimator parameters without a gradient in some steps
    accelerator = make_accelerator(args, find_unused_parameters=estimators_have_parameters(args))
    set_seed(args.seed)

    tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer_name or args.model_name_or_path)
    train_dataloader, eval_dataloader = get_dataloaders(accelerator, args, tokenizer)
    model = load_model(AutoModelForCausalLM, args, dtype=torch.float32)

    optimizer, scheduler = build_optimizer_and_scheduler(
        accelerator, args, decay_groups(model, args.weight_decay), train_dataloader
    )
    model, optimizer, train_dataloader, eval_dataloader, scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader, scheduler
    )
    if args.with_tracking:
        accelerator.init_trackers("finetune_clm", tracker_config(args))

    progress = resume_progress(accelerator, args)
    max_train_steps, num_epochs = num_training_steps(args, len(train_dataloader))
    progress_bar = tqdm(range(max_train_steps), disable=not accelerator.is_local_main_process)
    progress_bar.update(progress.completed_steps)
    starting_epoch, resumed_batches = progress.epoch, progress.batches
    window, results = LossWindow(), {}
    for epoch in range(starting_epoch, num_epochs):
        model.train()
        train_dataloader.set_epoch(epoch)
        progress.epoch, progress.batches = epoch, 0
        active_dataloader = train_dataloader
        if epoch == starting_epoch and resumed_batches:
            # resuming inside an epoch: skip the batches the checkpoint had already consumed
            active_dataloader = accelerator.skip_first_batches(train_dataloader, resumed_batches)
            progress.batches = resumed_batches
        for batch in active_dataloader:
            with accelerator.accumulate(model):
                # blocks are full, so the mean token loss of each batch weighs every token equally
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
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

        results = evaluate_model(accelerator, model, eval_dataloader)
        accelerator.print(f"epoch {epoch}: perplexity {results['perplexity']:.4f} eval_loss {results['loss']:.4f}")
        if args.with_tracking:
            accelerator.log({f"eval_{k}": v for k, v in results.items()}, step=progress.completed_steps)
        progress.epoch, progress.batches = epoch + 1, 0
        if name := checkpoint_name(args, progress, end_of_epoch=True):
            save_checkpoint(accelerator, args, progress, name)
        if progress.completed_steps >= max_train_steps:
            break

    if args.with_tracking:
        accelerator.end_training()
    save_final(accelerator, model, args, tokenizer, results={f"eval_{k}": v for k, v in results.items()})
    return accelerator.unwrap_model(model)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(parser)
    add_data_args(parser)
    parser.add_argument(
        "--text_column_name", default=None, help="Column holding the text (default: `text` or the first)."
    )
    parser.add_argument("--block_size", type=int, default=512, help="Tokens per training block.")
    parser.add_argument("--no_keep_linebreaks", action="store_true", help="Drop line breaks of txt files.")
    add_training_args(parser, learning_rate=5e-5)
    args = parser.parse_args(argv)
    check_common_args(args)
    if args.block_size < 2:
        raise ValueError(
            f"`--block_size` must be at least 2 (one input and one predicted token), got {args.block_size}."
        )
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
