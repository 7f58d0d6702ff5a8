"""Causal language modelling with a converted decoder: fine-tune it end to end and report validation perplexity.

Give a base decoder plus `--method` (it is converted before training) or an already converted checkpoint, e.g.
the output of `distill_attention.py`. Texts from the Hub or local txt/csv/json files are tokenised, concatenated
and cut into blocks of `--block_size` tokens, as in Transformers' `run_clm_no_trainer.py`.

Launch:
    accelerate launch recipes/finetune_clm.py \
        --model_name_or_path gpt2 --method kernel --method_args feature_map=hedgehog \
        --dataset_name wikitext --dataset_config_name wikitext-2-raw-v1 --block_size 512 \
        --learning_rate 1e-4 --num_train_epochs 1 --checkpointing_steps 500 --output_dir gpt2-hedgehog
"""

from __future__ import annotations

import argparse
import math
from itertools import chain

import torch
import transformers
from accelerate.utils import set_seed
from recipe_utils import (
    TrainingProgress,
    add_data_args,
    add_model_args,
    add_training_args,
    check_common_args,
    checkpoint_name,
    isolated_rng,
    load_model,
    load_text_datasets,
    make_accelerator,
    num_training_steps,
    require_columns,
    resolve_checkpoint,
    save_final,
    tracker_config,
)
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, default_data_collator, get_scheduler

from hf_lara import metrics


def get_dataloaders(accelerator, args, tokenizer):
    """`train` and `validation` dataloaders of `--block_size`-token blocks (inputs are their own labels)."""
    raw = load_text_datasets(args, keep_linebreaks=not args.no_keep_linebreaks)
    column = args.text_column_name or ("text" if "text" in raw["train"].column_names else raw["train"].column_names[0])
    require_columns(raw["train"], {"--text_column_name": column})
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
            raise ValueError(
                f"The {split} split has fewer than `--block_size` {block_size} tokens in total; lower `--block_size`."
            )
    # a generator of its own: each new iterator draws a seed from it, not from the global RNG, so a resumed
    # run's dropout and estimator samples replay the uninterrupted run's exactly
    generator = torch.Generator().manual_seed(args.seed)
    train = DataLoader(
        blocks["train"],
        shuffle=True,
        collate_fn=default_data_collator,
        batch_size=args.per_device_train_batch_size,
        generator=generator,
    )
    valid = DataLoader(
        blocks["validation"], collate_fn=default_data_collator, batch_size=args.per_device_eval_batch_size
    )
    return train, valid


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
    accelerator = make_accelerator(args)
    set_seed(args.seed)

    tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer_name or args.model_name_or_path)
    train_dataloader, eval_dataloader = get_dataloaders(accelerator, args, tokenizer)
    model = load_model(AutoModelForCausalLM, args, dtype=torch.float32)

    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
    groups = [
        {
            "params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)],
            "weight_decay": args.weight_decay,
        },
        {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate)
    max_train_steps, _ = num_training_steps(args, math.ceil(len(train_dataloader) / accelerator.num_processes))
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    model, optimizer, train_dataloader, eval_dataloader, scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader, scheduler
    )
    max_train_steps, num_epochs = num_training_steps(args, len(train_dataloader))
    if args.with_tracking:
        accelerator.init_trackers("finetune_clm", tracker_config(args))

    progress = TrainingProgress()
    accelerator.register_for_checkpointing(progress)
    checkpoint = resolve_checkpoint(args)
    if checkpoint is not None:
        accelerator.print(f"Resumed from checkpoint: {checkpoint}")
        accelerator.load_state(checkpoint)

    progress_bar = tqdm(range(max_train_steps), disable=not accelerator.is_local_main_process)
    progress_bar.update(progress.completed_steps)
    starting_epoch, skipped_batches = progress.epoch, progress.batches
    results = {}
    for epoch in range(starting_epoch, num_epochs):
        model.train()
        train_dataloader.set_epoch(epoch)
        progress.epoch, progress.batches = epoch, 0
        active_dataloader = train_dataloader
        if epoch == starting_epoch and skipped_batches:
            active_dataloader = accelerator.skip_first_batches(train_dataloader, skipped_batches)
            progress.batches = skipped_batches
        window_loss, window_batches = 0.0, 0
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
            window_loss, window_batches = window_loss + loss.detach(), window_batches + 1
            if not accelerator.sync_gradients:
                continue
            progress.completed_steps += 1
            progress_bar.update(1)
            if progress.completed_steps % args.logging_steps == 0 or progress.completed_steps == max_train_steps:
                step_loss = accelerator.reduce(window_loss / window_batches, reduction="mean").item()
                accelerator.print(f"step {progress.completed_steps}: loss {step_loss:.8f}")
                if args.with_tracking:
                    accelerator.log(
                        {"train_loss": step_loss, "lr": scheduler.get_last_lr()[0]}, step=progress.completed_steps
                    )
            window_loss, window_batches = 0.0, 0
            if name := checkpoint_name(args, progress, end_of_epoch=False):
                accelerator.save_state(f"{args.output_dir}/{name}")
            if progress.completed_steps >= max_train_steps:
                break

        results = evaluate_model(accelerator, model, eval_dataloader)
        accelerator.print(f"epoch {epoch}: perplexity {results['perplexity']:.4f} eval_loss {results['loss']:.4f}")
        if args.with_tracking:
            accelerator.log({f"eval_{k}": v for k, v in results.items()}, step=progress.completed_steps)
        progress.epoch, progress.batches = epoch + 1, 0
        if name := checkpoint_name(args, progress, end_of_epoch=True):
            accelerator.save_state(f"{args.output_dir}/{name}")
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
    training_function(parse_args(argv))


if __name__ == "__main__":
    main()
