"""Image classification with a converted ViT or DeiT: fine-tune it end to end and report accuracy.

Give a base checkpoint plus `--method` (it is converted before training) or an already converted checkpoint. Images
come from a Hub dataset or from local image folders (`--train_dir`, `--validation_dir`: one sub-folder per class, as
`datasets`' `imagefolder` reads them). Images are resized and normalised by the checkpoint's image processor; there
is no random augmentation, which keeps resumed runs exact (add your own transforms for real runs).

Launch:
    accelerate launch recipes/finetune_image_classification.py \
        --model_name_or_path google/vit-base-patch16-224-in21k --method lara --hparam adaptive=true \
        --dataset_name beans --learning_rate 5e-5 --num_train_epochs 3 --output_dir vit-lara-beans
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import transformers
from accelerate.utils import set_seed
from datasets import load_dataset
from recipe_utils import (
    LossWindow,
    RecipeError,
    add_model_args,
    add_training_args,
    build_optimizer_and_scheduler,
    check_common_args,
    checkpoint_name,
    estimators_have_parameters,
    exit_on_error,
    first_line,
    isolated_rng,
    load_model,
    load_named_dataset,
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
from transformers import AutoModelForImageClassification

from hf_lara import metrics


def load_image_datasets(args: argparse.Namespace):
    """`train` and `validation` splits from the Hub or from local image folders, read together so that both share
    one list of classes; a folder without files, or that `datasets` cannot read, is a `RecipeError` naming it."""
    if args.dataset_name is not None:
        return load_named_dataset(args)
    folders = {"train": ("--train_dir", args.train_dir), "validation": ("--validation_dir", args.validation_dir)}
    folders = {split: option for split, option in folders.items() if option[1] is not None}
    for option, folder in folders.values():
        if not any(path.is_file() for path in Path(folder).rglob("*")):
            raise RecipeError(f"`{option}` {folder!r} holds no images (it needs one sub-folder of images per class).")
    try:
        raw = load_dataset("imagefolder", data_files={k: os.path.join(v[1], "**") for k, v in folders.items()})
    except Exception as error:  # datasets raises several types for unreadable folders
        names = " and ".join(f"`{option}` {folder!r}" for option, folder in folders.values())
        raise RecipeError(f"{names} could not be read as image folders: {first_line(error)}") from None
    return with_validation_split(raw, args)


def get_dataloaders(accelerator, args, processor):
    """Dataloaders of `pixel_values` and `labels`, preprocessed on the fly, and the class names."""
    with accelerator.main_process_first():
        raw = load_image_datasets(args)
    require_columns(
        raw, {"--image_column_name": args.image_column_name, "--label_column_name": args.label_column_name}, args
    )
    feature = raw["train"].features[args.label_column_name]
    if not hasattr(feature, "names"):
        raise RecipeError(
            f"`--label_column_name` {args.label_column_name!r} must be a `ClassLabel` column, got {feature}."
        )
    labels = list(feature.names)

    def preprocess(examples):
        images = [image.convert("RGB") for image in examples[args.image_column_name]]
        pixels = processor(images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels, "labels": torch.tensor(examples[args.label_column_name])}

    def collate(examples):
        return {
            "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "labels": torch.stack([e["labels"] for e in examples]),
        }

    train, valid = raw["train"].with_transform(preprocess), raw["validation"].with_transform(preprocess)
    train, valid = make_dataloaders(train, valid, collate, args)
    return train, valid, labels


def evaluate_model(accelerator, model, dataloader) -> dict:
    """Accuracy over the whole validation set."""
    accuracy = metrics.load("accuracy")
    model.eval()
    with isolated_rng(accelerator), torch.no_grad():
        for batch in dataloader:
            predictions = model(**batch).logits.argmax(dim=-1)
            predictions, references = accelerator.gather_for_metrics((predictions, batch["labels"]))
            accuracy.add_batch(predictions=predictions.cpu(), references=references.cpu())
    return accuracy.compute()


def training_function(args: argparse.Namespace) -> transformers.PreTrainedModel:
    """Train, evaluate and save; returns the trained model, unwrapped (for callers that import the recipe)."""
    # DDP must tolerate estimator parameters without a gradient in some steps
    accelerator = make_accelerator(args, find_unused_parameters=estimators_have_parameters(args))
    set_seed(args.seed)

    processor = transformers.AutoImageProcessor.from_pretrained(args.tokenizer_name or args.model_name_or_path)
    train_dataloader, eval_dataloader, labels = get_dataloaders(accelerator, args, processor)
    model = load_model(
        AutoModelForImageClassification,
        args,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        ignore_mismatched_sizes=args.ignore_mismatched_sizes,
        dtype=torch.float32,
    )

    optimizer, scheduler = build_optimizer_and_scheduler(accelerator, args, model.parameters(), train_dataloader)
    model, optimizer, train_dataloader, eval_dataloader, scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader, scheduler
    )
    if args.with_tracking:
        accelerator.init_trackers("finetune_image_classification", tracker_config(args))

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

        results = evaluate_model(accelerator, model, eval_dataloader)
        accelerator.print(f"epoch {epoch}: accuracy {results['accuracy']:.4f}")
        if args.with_tracking:
            accelerator.log({f"eval_{k}": v for k, v in results.items()}, step=progress.completed_steps)
        progress.epoch, progress.batches = epoch + 1, 0
        if name := checkpoint_name(args, progress, end_of_epoch=True):
            save_checkpoint(accelerator, args, progress, name)
        if progress.completed_steps >= max_train_steps:
            break

    if args.with_tracking:
        accelerator.end_training()
    save_final(accelerator, model, args, processor, results={f"eval_{k}": v for k, v in results.items()})
    return accelerator.unwrap_model(model)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(parser)
    group = parser.add_argument_group("data")
    group.add_argument("--dataset_name", default=None, help="Image dataset on the Hub (or a local dataset folder).")
    group.add_argument("--dataset_config_name", default=None, help="Configuration of `--dataset_name`.")
    group.add_argument("--train_dir", default=None, help="Local image folder: one sub-folder of images per class.")
    group.add_argument("--validation_dir", default=None, help="Local validation image folder, same layout.")
    group.add_argument(
        "--train_val_split",
        type=float,
        default=0.15,
        help="Fraction of the training data held out when there is no validation split.",
    )
    group.add_argument("--max_train_samples", type=int, default=None)
    group.add_argument("--max_eval_samples", type=int, default=None)
    group.add_argument("--image_column_name", default="image", help="Column holding the images.")
    group.add_argument("--label_column_name", default="label", help="Column holding the class labels.")
    parser.add_argument(
        "--ignore_mismatched_sizes", action="store_true", help="Replace a checkpoint head with another label count."
    )
    add_training_args(parser, learning_rate=5e-5)
    args = parser.parse_args(argv)
    if args.dataset_name is None and args.train_dir is None:
        raise ValueError("No training data: pass `--dataset_name` (a Hub dataset) or `--train_dir` (an image folder).")
    for name in ("train_dir", "validation_dir"):
        path = getattr(args, name)
        if path is not None and not os.path.isdir(path):
            raise ValueError(f"`--{name}` {path!r} is not a folder.")
    check_common_args(args, builders=None)
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
