"""Sequence classification with a converted model: fine-tune it end to end and report accuracy and F1.

Give a base checkpoint plus `--method` (it is converted before training; the classification head is new) or an
already converted checkpoint, e.g. the output of `distill_attention.py`. Data: a GLUE task (`--task_name`, through
`datasets`), another dataset (`--dataset_name`), or local csv/json files with one or two text columns and a label
column; labels may be strings or integers. Arguments follow Transformers' `run_glue_no_trainer.py`.

Launch:
    accelerate launch recipes/finetune_classification.py \
        --model_name_or_path bert-base-uncased --method eva --hparam window_size=32 \
        --task_name sst2 --max_length 128 \
        --learning_rate 2e-5 --num_train_epochs 3 --checkpointing_steps epoch --output_dir bert-eva-sst2
"""

from __future__ import annotations

import argparse

import torch
import transformers
from accelerate.utils import set_seed
from datasets import ClassLabel, DatasetDict, load_dataset
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
    first_line,
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
    with_validation_split,
)
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, default_data_collator

from hf_lara import metrics

#: Text columns tried, in order, when `--text_column_name` is not given.
DEFAULT_TEXT_COLUMNS = ("sentence", "text", "sentence1", "question")
#: The GLUE classification tasks and their text columns (stsb, a regression task, is left out).
GLUE_TASKS = {
    "cola": ("sentence", None),
    "mnli": ("premise", "hypothesis"),
    "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "qqp": ("question1", "question2"),
    "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence", None),
    "wnli": ("sentence1", "sentence2"),
}
#: Where `--task_name` reads GLUE from unless `--dataset_name` names another copy (a Hub id or local folder).
GLUE_DATASET = "nyu-mll/glue"


def load_glue(args: argparse.Namespace) -> DatasetDict:
    """The GLUE task `--task_name` through `datasets` (MNLI validates on its matched split)."""
    source = args.dataset_name or GLUE_DATASET
    try:
        raw = load_dataset(source, args.task_name)
    except (OSError, ValueError) as error:  # offline, or not a GLUE copy
        raise RecipeError(
            f"GLUE task {args.task_name!r} could not be loaded from {source!r}: {first_line(error)}"
        ) from None
    if args.task_name == "mnli":
        raw = DatasetDict(train=raw["train"], validation=raw["validation_matched"])
    return with_validation_split(DatasetDict({k: v for k, v in raw.items() if k in ("train", "validation")}), args)


def text_columns(args: argparse.Namespace, columns: list[str]) -> tuple[str, str | None]:
    """The text column and the optional second one (`sentence1`/`sentence2` pairs are found on their own)."""
    if args.task_name is not None and args.text_column_name is None:
        return GLUE_TASKS[args.task_name]
    first = args.text_column_name or next((c for c in DEFAULT_TEXT_COLUMNS if c in columns), None)
    if first is None:
        raise RecipeError(
            f"No text column found among {columns}; name it with `--text_column_name` "
            f"(tried {', '.join(DEFAULT_TEXT_COLUMNS)})."
        )
    second = args.text_pair_column_name
    if second is None and first == "sentence1" and "sentence2" in columns:
        second = "sentence2"
    return first, second


def label_names(raw: DatasetDict, args: argparse.Namespace) -> tuple[list, dict]:
    """The class names and the map from label values to ids: a `ClassLabel`'s own order, else the sorted values."""
    feature = raw["train"].features[args.label_column_name]
    if isinstance(feature, ClassLabel):
        return list(feature.names), {i: i for i in range(feature.num_classes)}
    labels = sorted(set(raw["train"][args.label_column_name]))
    if any(isinstance(label, float) for label in labels):
        raise RecipeError(
            f"`--label_column_name` {args.label_column_name!r} holds floats; only classification is supported."
        )
    unknown = set(raw["validation"][args.label_column_name]) - set(labels)
    if unknown:
        raise RecipeError(f"Validation labels {sorted(unknown)} never occur in the training data ({labels}).")
    return labels, {label: i for i, label in enumerate(labels)}


def get_dataloaders(accelerator, args, tokenizer):
    """Tokenised `train` and `validation` dataloaders and the label names."""
    raw = load_glue(args) if args.task_name is not None else load_text_datasets(args)
    first, second = text_columns(args, raw["train"].column_names)
    columns = {"--text_column_name": first, "--text_pair_column_name": second}
    require_columns(raw, {**columns, "--label_column_name": args.label_column_name}, args)
    labels, label_to_id = label_names(raw, args)
    padding = "max_length" if args.pad_to_max_length else False

    def preprocess(examples):
        texts = (examples[first],) if second is None else (examples[first], examples[second])
        result = tokenizer(*texts, padding=padding, truncation=True, max_length=args.max_length)
        result["labels"] = [label_to_id[label] for label in examples[args.label_column_name]]
        return result

    with accelerator.main_process_first():
        tokenized = raw.map(
            preprocess,
            batched=True,
            num_proc=args.preprocessing_num_workers,
            remove_columns=raw["train"].column_names,
            load_from_cache_file=not args.overwrite_cache,
            desc="Tokenizing",
        )
    if args.pad_to_max_length:
        collator = default_data_collator
    else:
        collator = DataCollatorWithPadding(
            tokenizer, pad_to_multiple_of=8 if accelerator.mixed_precision != "no" else None
        )
    train, valid = make_dataloaders(tokenized["train"], tokenized["validation"], collator, args)
    return train, valid, [str(label) for label in labels]


def evaluate_model(accelerator, model, dataloader, num_labels: int) -> dict:
    """Accuracy and F1 (binary for two labels, macro otherwise) over the whole validation set."""
    accuracy, f1 = metrics.load("accuracy"), metrics.load("f1")
    model.eval()
    with isolated_rng(accelerator), torch.no_grad():
        for batch in dataloader:
            predictions = model(**batch).logits.argmax(dim=-1)
            predictions, references = accelerator.gather_for_metrics((predictions, batch["labels"]))
            accuracy.add_batch(predictions=predictions.cpu(), references=references.cpu())
            f1.add_batch(predictions=predictions.cpu(), references=references.cpu())
    average = "binary" if num_labels == 2 else "macro"
    return {"accuracy": accuracy.compute()["accuracy"], "f1": f1.compute(average=average)["f1"]}


def training_function(args: argparse.Namespace) -> transformers.PreTrainedModel:
    """Train, evaluate and save; returns the trained model, unwrapped (for callers that import the recipe)."""
    # DDP must tolerate estimator parameters without a gradient (LARA's causal proposals in an encoder, ...)
    accelerator = make_accelerator(args, find_unused_parameters=estimators_have_parameters(args))
    set_seed(args.seed)

    tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer_name or args.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_dataloader, eval_dataloader, labels = get_dataloaders(accelerator, args, tokenizer)

    model = load_model(
        AutoModelForSequenceClassification,
        args,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        ignore_mismatched_sizes=args.ignore_mismatched_sizes,
        dtype=torch.float32,
    )
    model.config.pad_token_id = tokenizer.pad_token_id

    optimizer, scheduler = build_optimizer_and_scheduler(
        accelerator, args, decay_groups(model, args.weight_decay), train_dataloader
    )
    model, optimizer, train_dataloader, eval_dataloader, scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader, scheduler
    )
    if args.with_tracking:
        accelerator.init_trackers("finetune_classification", tracker_config(args))

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

        results = evaluate_model(accelerator, model, eval_dataloader, len(labels))
        accelerator.print(f"epoch {epoch}: accuracy {results['accuracy']:.4f} f1 {results['f1']:.4f}")
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
    add_data_args(parser, files="csv or json")
    parser.add_argument(
        "--task_name",
        default=None,
        choices=sorted(GLUE_TASKS),
        help=f"A GLUE task, read with `datasets` from `--dataset_name` (default: {GLUE_DATASET}).",
    )
    parser.add_argument(
        "--text_column_name", default=None, help=f"Text column (default: first of {DEFAULT_TEXT_COLUMNS})."
    )
    parser.add_argument("--text_pair_column_name", default=None, help="Second text column, for sentence pairs.")
    parser.add_argument("--label_column_name", default="label", help="Label column (strings or integers).")
    parser.add_argument("--max_length", type=int, default=128, help="Truncate inputs to this many tokens.")
    parser.add_argument(
        "--pad_to_max_length", action="store_true", help="Pad every input to `--max_length` (default: per batch)."
    )
    parser.add_argument(
        "--ignore_mismatched_sizes", action="store_true", help="Replace a checkpoint head with another label count."
    )
    add_training_args(parser, learning_rate=5e-5)
    args = parser.parse_args(argv)
    check_common_args(args, builders={"csv": "csv", "json": "json", "jsonl": "json"})
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
