"""Sequence classification with a converted model: fine-tune it end to end and report accuracy and F1.

Give a base checkpoint plus `--method` (it is converted before training; the classification head is new) or an
already converted checkpoint, e.g. the output of `distill_attention.py`. Data come from the Hub or from local
csv/json files with one or two text columns and a label column; labels may be strings or integers.

Launch:
    accelerate launch recipes/finetune_classification.py \
        --model_name_or_path bert-base-uncased --method eva --method_args window_size=32 \
        --dataset_name glue --dataset_config_name sst2 --text_column_name sentence \
        --learning_rate 2e-5 --num_train_epochs 3 --checkpointing_steps epoch --output_dir bert-eva-sst2
"""

from __future__ import annotations

import argparse

import torch
import transformers
from accelerate.utils import set_seed
from recipe_utils import (
    add_data_args,
    add_model_args,
    add_training_args,
    build_optimizer_and_scheduler,
    check_common_args,
    decay_groups,
    isolated_rng,
    load_model,
    load_text_datasets,
    make_accelerator,
    make_dataloaders,
    require_columns,
    resume_progress,
    save_final,
    tracker_config,
    train,
)
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

from hf_lara import metrics

#: Text columns tried, in order, when `--text_column_name` is not given.
DEFAULT_TEXT_COLUMNS = ("sentence", "text", "sentence1", "question")


def text_columns(args: argparse.Namespace, columns: list[str]) -> tuple[str, str | None]:
    """The text column and the optional second one (`sentence1`/`sentence2` pairs are found on their own)."""
    first = args.text_column_name or next((c for c in DEFAULT_TEXT_COLUMNS if c in columns), None)
    if first is None:
        raise ValueError(
            f"No text column found among {columns}; name it with `--text_column_name` "
            f"(tried {', '.join(DEFAULT_TEXT_COLUMNS)})."
        )
    second = args.text_pair_column_name
    if second is None and first == "sentence1" and "sentence2" in columns:
        second = "sentence2"
    return first, second


def get_dataloaders(accelerator, args, tokenizer):
    """Tokenised `train` and `validation` dataloaders and the sorted label list."""
    raw = load_text_datasets(args)
    first, second = text_columns(args, raw["train"].column_names)
    require_columns(
        raw["train"],
        {
            "--text_column_name": first,
            "--text_pair_column_name": second,
            "--label_column_name": args.label_column_name,
        },
    )
    require_columns(raw["validation"], {"--label_column_name": args.label_column_name})
    labels = sorted(set(raw["train"][args.label_column_name]))
    if any(isinstance(label, float) for label in labels):
        raise ValueError(
            f"`--label_column_name` {args.label_column_name!r} holds floats; only classification is supported."
        )
    label_to_id = {label: i for i, label in enumerate(labels)}
    unknown = set(raw["validation"][args.label_column_name]) - set(labels)
    if unknown:
        raise ValueError(f"Validation labels {sorted(unknown)} never occur in the training data ({labels}).")

    def preprocess(examples):
        texts = (examples[first],) if second is None else (examples[first], examples[second])
        result = tokenizer(*texts, truncation=True, max_length=args.max_seq_length)
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
    pad_to = 8 if accelerator.mixed_precision != "no" else None
    collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to)
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
    accelerator = make_accelerator(args)
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

    def evaluate(epoch: int) -> dict:
        results = evaluate_model(accelerator, model, eval_dataloader, len(labels))
        accelerator.print(f"epoch {epoch}: accuracy {results['accuracy']:.4f} f1 {results['f1']:.4f}")
        return results

    results = train(
        accelerator,
        model,
        optimizer,
        scheduler,
        train_dataloader,
        args,
        progress,
        compute_loss=lambda batch: model(**batch).loss,
        evaluate=evaluate,
    )

    if args.with_tracking:
        accelerator.end_training()
    save_final(accelerator, model, args, tokenizer, results={f"eval_{k}": v for k, v in results.items()})
    return accelerator.unwrap_model(model)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(parser)
    add_data_args(parser, files="csv or json")
    parser.add_argument(
        "--text_column_name", default=None, help=f"Text column (default: first of {DEFAULT_TEXT_COLUMNS})."
    )
    parser.add_argument("--text_pair_column_name", default=None, help="Second text column, for sentence pairs.")
    parser.add_argument("--label_column_name", default="label", help="Label column (strings or integers).")
    parser.add_argument("--max_seq_length", type=int, default=128, help="Truncate inputs to this many tokens.")
    parser.add_argument(
        "--ignore_mismatched_sizes", action="store_true", help="Replace a checkpoint head with another label count."
    )
    add_training_args(parser, learning_rate=5e-5)
    args = parser.parse_args(argv)
    check_common_args(args, builders={"csv": "csv", "json": "json", "jsonl": "json"})
    return args


def main(argv: list[str] | None = None) -> None:
    training_function(parse_args(argv))


if __name__ == "__main__":
    main()
