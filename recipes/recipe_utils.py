"""Pieces every hf_lara recipe shares: command-line options, the model (converted on load or already converted),
local or Hub datasets, the optimizer and scheduler, the training loop with exact resume, and the final save.

Each recipe keeps what is its own (data, model, loss, evaluation) and reads top to bottom like Accelerate's
`nlp_example.py`; `train` runs the loop they all share, through small callbacks. Argument names follow
Transformers' `examples/pytorch/*_no_trainer.py` scripts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration
from datasets import DatasetDict, load_dataset
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import hf_lara

#: Local file extensions the text recipes read, mapped to the `datasets` builder that reads them.
TEXT_BUILDERS = {"csv": "csv", "json": "json", "jsonl": "json", "txt": "text"}
#: Checkpoint folder names written by `--checkpointing_steps`.
CHECKPOINT_PATTERN = re.compile(r"^(step|epoch)_(\d+)$")


# ---------------------------------------------------------------------------------------------------- arguments
def add_model_args(parser: argparse.ArgumentParser) -> None:
    """`--model_name_or_path` plus the conversion options (`--method`, `--method_args`, `--layers`)."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model_name_or_path",
        required=True,
        help="A pretrained checkpoint (Hub id or folder) to convert with `--method`, or an hf_lara-converted one.",
    )
    group.add_argument(
        "--method",
        choices=hf_lara.available_methods(),
        default=None,
        help="Estimator replacing softmax attention. Required for a base checkpoint; with a converted checkpoint it "
        "converts again (new estimators), otherwise the checkpoint's own estimators are kept.",
    )
    group.add_argument(
        "--method_args",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="Hyper-parameters of the estimator, e.g. `feature_map=hedgehog num_features=32 adaptive=true`; "
        "values are read as JSON when they parse, else as strings.",
    )
    group.add_argument(
        "--layers", type=int, nargs="+", default=None, help="Self-attention layers to convert (default: all)."
    )
    group.add_argument("--tokenizer_name", default=None, help="Tokenizer or processor, if not the model's.")


def add_data_args(parser: argparse.ArgumentParser, *, files: str = "csv, json or txt") -> None:
    """Hub or local datasets, as in the `*_no_trainer.py` scripts."""
    group = parser.add_argument_group("data")
    group.add_argument("--dataset_name", default=None, help="Dataset on the Hub (or a local dataset script/folder).")
    group.add_argument("--dataset_config_name", default=None, help="Configuration of `--dataset_name`.")
    group.add_argument("--train_file", default=None, help=f"Local training data ({files}).")
    group.add_argument("--validation_file", default=None, help=f"Local validation data ({files}).")
    group.add_argument(
        "--validation_split_percentage",
        type=int,
        default=5,
        help="Percentage of the training split held out for validation when there is no validation split.",
    )
    group.add_argument("--max_train_samples", type=int, default=None, help="Keep only this many training examples.")
    group.add_argument("--max_eval_samples", type=int, default=None, help="Keep only this many validation examples.")
    group.add_argument("--preprocessing_num_workers", type=int, default=None, help="Processes for `datasets.map`.")
    group.add_argument("--overwrite_cache", action="store_true", help="Recompute cached preprocessing.")


def add_training_args(parser: argparse.ArgumentParser, *, learning_rate: float = 5e-5) -> None:
    """Optimisation, checkpointing, tracking and Hub options shared by every recipe."""
    group = parser.add_argument_group("training")
    group.add_argument("--per_device_train_batch_size", type=int, default=8)
    group.add_argument("--per_device_eval_batch_size", type=int, default=8)
    group.add_argument("--gradient_accumulation_steps", type=int, default=1)
    group.add_argument("--learning_rate", type=float, default=learning_rate)
    group.add_argument("--weight_decay", type=float, default=0.0)
    group.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping; 0 disables it.")
    group.add_argument("--num_train_epochs", type=int, default=3)
    group.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps; overrides the epochs.")
    group.add_argument(
        "--lr_scheduler_type",
        default="linear",
        choices=[s.value for s in transformers.SchedulerType if s.value != "reduce_lr_on_plateau"],
    )
    group.add_argument("--num_warmup_steps", type=int, default=0)
    group.add_argument("--seed", type=int, default=42)
    group.add_argument("--output_dir", required=True, help="Where the final model and checkpoints go.")
    group.add_argument(
        "--checkpointing_steps",
        default=None,
        help="Save the training state every N optimizer steps (`step_N`) or at the end of each epoch (`epoch`).",
    )
    group.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help="A checkpoint folder written by this recipe, or `latest` for the newest one in `--output_dir`.",
    )
    group.add_argument("--logging_steps", type=int, default=10, help="Print the training loss every N steps.")
    group.add_argument("--with_tracking", action="store_true", help="Log metrics to the trackers of `--report_to`.")
    group.add_argument("--report_to", default="all", help="`all`, `tensorboard`, `wandb`, ... (with --with_tracking).")
    group.add_argument("--push_to_hub", action="store_true", help="Upload the final model to the Hub.")
    group.add_argument("--hub_model_id", default=None, help="Repository to push to (default: the output folder name).")
    group.add_argument("--hub_token", default=None, help="Token for `--push_to_hub`.")


def parse_method_args(items: list[str]) -> dict[str, Any]:
    """`["feature_map=hedgehog", "num_features=32"]` -> `{"feature_map": "hedgehog", "num_features": 32}`."""
    hparams = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"`--method_args` takes KEY=VALUE pairs such as `num_features=64`, got {item!r}.")
        try:
            hparams[key] = json.loads(raw)
        except json.JSONDecodeError:
            hparams[key] = raw
    return hparams


def check_common_args(args: argparse.Namespace, *, builders: dict[str, str] | None = TEXT_BUILDERS) -> None:
    """Refuse bad arguments before anything heavy runs; fills `args.method_args` with the parsed dict.

    Checks the data source, the local file types, the checkpointing and Hub options, and the conversion (loading
    only the config): a base checkpoint needs `--method`, and the method's hyper-parameters must build.
    """
    if builders is not None:
        check_data_args(args, builders)
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"`--{name}` must be at least 1, got {getattr(args, name)}.")
    if args.checkpointing_steps is not None and not (
        args.checkpointing_steps == "epoch" or args.checkpointing_steps.isdigit() and int(args.checkpointing_steps) > 0
    ):
        raise ValueError(
            f"`--checkpointing_steps` must be a positive integer or `epoch`, got {args.checkpointing_steps!r}."
        )
    if args.push_to_hub and os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise ValueError("`--push_to_hub` needs the Hub, but HF_HUB_OFFLINE is set; unset it or drop `--push_to_hub`.")
    args.method_args = parse_method_args(args.method_args)
    check_conversion(args)


def check_data_args(args: argparse.Namespace, builders: dict[str, str]) -> None:
    """A Hub dataset or local files of a supported type."""
    if args.dataset_name is None and args.train_file is None:
        raise ValueError(
            "No training data: pass `--dataset_name` (a Hub dataset) or `--train_file` "
            f"(a local {'/'.join(sorted(builders))} file)."
        )
    for name in ("train_file", "validation_file"):
        path = getattr(args, name)
        if path is None:
            continue
        extension = Path(path).suffix.lstrip(".")
        if extension not in builders:
            raise ValueError(f"`--{name}` must be a {', '.join(sorted(builders))} file, got {path!r}.")
        if not Path(path).exists():
            raise ValueError(f"`--{name}` {path!r} does not exist.")
    if args.train_file and args.validation_file:
        train_ext, val_ext = (builders[Path(p).suffix.lstrip(".")] for p in (args.train_file, args.validation_file))
        if train_ext != val_ext:
            raise ValueError(
                f"`--train_file` and `--validation_file` must have the same type, got {train_ext} and {val_ext}."
            )


def check_conversion(args: argparse.Namespace) -> None:
    """A base checkpoint needs `--method`; the method and its hyper-parameters must build (config only)."""
    if args.method is None:
        if args.method_args or args.layers is not None:
            raise ValueError("`--method_args` and `--layers` need `--method`.")
        config = transformers.AutoConfig.from_pretrained(args.model_name_or_path)
        if not isinstance(config, hf_lara.LaraConfig):
            raise ValueError(
                f"{args.model_name_or_path!r} is not an hf_lara-converted checkpoint (model type `{config.model_type}`); "
                f"pass `--method` (one of {', '.join(hf_lara.available_methods())}) to convert it."
            )
        return
    # builds one estimator: unknown hyper-parameters, bad values and unsupported families fail here
    config = hf_lara.LaraConfig.from_pretrained(
        args.model_name_or_path, method=args.method, layers=args.layers, **args.method_args
    )
    num_layers = getattr(config, "num_hidden_layers", None)
    if args.layers is not None and num_layers is not None and max(args.layers) >= num_layers:
        raise ValueError(f"`--layers` must be indices below {num_layers} (the model's layers), got {args.layers}.")


# ---------------------------------------------------------------------------------------------------- model and data
def load_model(auto_class: type, args: argparse.Namespace, **kwargs: Any) -> transformers.PreTrainedModel:
    """`auto_class.from_pretrained(...)`, then `hf_lara.convert` when `--method` is given."""
    model = auto_class.from_pretrained(args.model_name_or_path, **kwargs)
    if args.method is not None:
        hf_lara.convert(model, args.method, layers=args.layers, **args.method_args)
    return model


def load_text_datasets(args: argparse.Namespace, **builder_kwargs: Any) -> DatasetDict:
    """`train` and `validation` splits from the Hub or local files; holds out a validation split if there is none."""
    if args.dataset_name is not None:
        raw = load_dataset(args.dataset_name, args.dataset_config_name)
    else:
        data_files = {"train": args.train_file}
        if args.validation_file is not None:
            data_files["validation"] = args.validation_file
        builder = TEXT_BUILDERS[Path(args.train_file).suffix.lstrip(".")]
        extra = builder_kwargs if builder == "text" else {}
        raw = load_dataset(builder, data_files=data_files, **extra)
    return with_validation_split(raw, args)


def with_validation_split(raw: DatasetDict, args: argparse.Namespace) -> DatasetDict:
    """Hold out `--validation_split_percentage` of `train` when there is no `validation` split; apply the caps."""
    if "train" not in raw:
        raise ValueError(f"The dataset has no `train` split; its splits are {list(raw)}.")
    if "validation" not in raw:
        if not 0 < args.validation_split_percentage < 100:
            raise ValueError(
                "No validation split: pass `--validation_file` or a `--validation_split_percentage` in 1-99."
            )
        split = raw["train"].train_test_split(test_size=args.validation_split_percentage / 100, seed=args.seed)
        raw = DatasetDict(train=split["train"], validation=split["test"])
    if args.max_train_samples is not None:
        raw["train"] = raw["train"].select(range(min(args.max_train_samples, len(raw["train"]))))
    if args.max_eval_samples is not None:
        raw["validation"] = raw["validation"].select(range(min(args.max_eval_samples, len(raw["validation"]))))
    return raw


def require_columns(dataset, columns: dict[str, str | None]) -> None:
    """Every named column must exist: `{"--text_column_name": "text"}`; None values are skipped."""
    for option, column in columns.items():
        if column is not None and column not in dataset.column_names:
            raise ValueError(
                f"`{option}` {column!r} is not a column of the dataset; its columns are {dataset.column_names}."
            )


def make_dataloaders(train_set, eval_set, collate_fn, args: argparse.Namespace) -> tuple[DataLoader, DataLoader]:
    """The shuffled training dataloader and the validation one, at the per-device batch sizes.

    The training dataloader has a generator of its own: each new iterator draws a seed from it, not from the global
    RNG, so a resumed run's dropout and estimator samples replay the uninterrupted run's exactly.
    """
    generator = torch.Generator().manual_seed(args.seed)
    train = DataLoader(
        train_set,
        shuffle=True,
        collate_fn=collate_fn,
        batch_size=args.per_device_train_batch_size,
        generator=generator,
    )
    valid = DataLoader(eval_set, collate_fn=collate_fn, batch_size=args.per_device_eval_batch_size)
    return train, valid


# ---------------------------------------------------------------------------------------------------- training state
def make_accelerator(args: argparse.Namespace) -> Accelerator:
    """An `Accelerator` with gradient accumulation, trackers and a seedable sampler (shuffling that resumes exactly).

    Mixed precision, the distributed type, FSDP and DeepSpeed come from the `accelerate launch` config.
    """
    # under `torchrun` on a machine without accelerators, Accelerate only forms a (gloo) process group when told to
    # use the CPU; otherwise every process would train alone on all the data
    cpu_only = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available()
    return Accelerator(
        cpu=cpu_only,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to if args.with_tracking else None,
        project_config=ProjectConfiguration(project_dir=args.output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )


class TrainingProgress:
    """Where training stands: registered with `accelerator.register_for_checkpointing`, so checkpoints record it.

    `batches` counts the dataloader batches consumed in `epoch`, which is what `skip_first_batches` needs; it is
    exact with gradient accumulation and with epochs whose length is not a multiple of the accumulation steps.
    """

    def __init__(self) -> None:
        self.epoch = 0
        self.batches = 0
        self.completed_steps = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self.batches, "completed_steps": self.completed_steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batches, self.completed_steps = state["epoch"], state["batches"], state["completed_steps"]


def resolve_checkpoint(args: argparse.Namespace) -> str | None:
    """The folder `--resume_from_checkpoint` names; `latest` is the most advanced `step_N`/`epoch_N` in `--output_dir`."""
    if args.resume_from_checkpoint is None:
        return None
    if args.resume_from_checkpoint != "latest":
        if not Path(args.resume_from_checkpoint).is_dir():
            raise ValueError(f"`--resume_from_checkpoint` {args.resume_from_checkpoint!r} is not a folder.")
        return args.resume_from_checkpoint
    found = [p for p in Path(args.output_dir).glob("*") if p.is_dir() and CHECKPOINT_PATTERN.match(p.name)]
    if not found:
        raise ValueError(f"`--resume_from_checkpoint latest`: no step_N or epoch_N folder in {args.output_dir!r}.")
    return str(max(found, key=lambda p: p.stat().st_mtime))


def checkpoint_name(args: argparse.Namespace, progress: TrainingProgress, end_of_epoch: bool) -> str | None:
    """`step_N` / `epoch_N` when `--checkpointing_steps` asks for a checkpoint now, else None."""
    every = args.checkpointing_steps
    if every == "epoch" and end_of_epoch:
        return f"epoch_{progress.epoch - 1}"
    if every is not None and every != "epoch" and not end_of_epoch and progress.completed_steps % int(every) == 0:
        return f"step_{progress.completed_steps}"
    return None


def num_training_steps(args: argparse.Namespace, batches_per_epoch: int) -> tuple[int, int]:
    """`(max_train_steps, num_train_epochs)` from `len(train_dataloader)` (per process, after `prepare`)."""
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        return args.num_train_epochs * steps_per_epoch, args.num_train_epochs
    return args.max_train_steps, math.ceil(args.max_train_steps / steps_per_epoch)


def resume_progress(accelerator: Accelerator, args: argparse.Namespace) -> TrainingProgress:
    """A `TrainingProgress` registered for checkpointing, loaded with the whole training state from
    `--resume_from_checkpoint` when given (call after `accelerator.prepare`)."""
    progress = TrainingProgress()
    accelerator.register_for_checkpointing(progress)
    checkpoint = resolve_checkpoint(args)
    if checkpoint is not None:
        accelerator.print(f"Resumed from checkpoint: {checkpoint}")
        accelerator.load_state(checkpoint)
    return progress


# ---------------------------------------------------------------------------------------------------- optimisation
#: Parameters kept out of weight decay by `decay_groups`.
NO_DECAY = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups: `weight_decay` for the weights, none for biases and norm weights."""
    return [
        {"params": [p for n, p in model.named_parameters() if not n.endswith(NO_DECAY)], "weight_decay": weight_decay},
        {"params": [p for n, p in model.named_parameters() if n.endswith(NO_DECAY)], "weight_decay": 0.0},
    ]


def build_optimizer_and_scheduler(
    accelerator: Accelerator, args: argparse.Namespace, params: Iterable, train_dataloader
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over `params` and the `--lr_scheduler_type` schedule, sized from the dataloader before `prepare`.

    The prepared scheduler steps once per process at every optimizer step, hence the warm-up and total step counts
    multiplied by the number of processes (as in Transformers' `*_no_trainer.py` scripts).
    """
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    max_train_steps, _ = num_training_steps(args, math.ceil(len(train_dataloader) / accelerator.num_processes))
    scheduler = transformers.get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    return optimizer, scheduler


def train(
    accelerator: Accelerator,
    model,
    optimizer,
    scheduler,
    train_dataloader,
    args: argparse.Namespace,
    progress: TrainingProgress,
    compute_loss: Callable[[dict], torch.Tensor],
    evaluate: Callable[[int], dict] | None = None,
    *,
    parameters: Iterable[torch.nn.Parameter] | None = None,
    train_mode: Callable[[], None] | None = None,
) -> dict:
    """The training loop of every recipe (all arguments prepared); returns the last `evaluate` results (or `{}`).

    Gradient accumulation, clipping of `parameters` (default: all of the model's) to `--max_grad_norm`, the
    progress bar, the `step N: loss` lines every `--logging_steps`, `--checkpointing_steps`, and exact resume from
    `progress`: the interrupted epoch skips the batches it had consumed. `compute_loss(batch)` runs the forward;
    `train_mode()` (default `model.train()`) starts each epoch; `evaluate(epoch)`, if given, ends each epoch (before
    its checkpoint) and its results are logged as `eval_*` with `--with_tracking`.
    """
    max_train_steps, num_epochs = num_training_steps(args, len(train_dataloader))
    progress_bar = tqdm(range(max_train_steps), disable=not accelerator.is_local_main_process)
    progress_bar.update(progress.completed_steps)
    starting_epoch, skipped_batches = progress.epoch, progress.batches
    results = {}
    for epoch in range(starting_epoch, num_epochs):
        (train_mode or model.train)()
        train_dataloader.set_epoch(epoch)
        progress.epoch, progress.batches = epoch, 0
        active_dataloader = train_dataloader
        if epoch == starting_epoch and skipped_batches:
            active_dataloader = accelerator.skip_first_batches(train_dataloader, skipped_batches)
            progress.batches = skipped_batches
        window_loss, window_batches = 0.0, 0
        for batch in active_dataloader:
            with accelerator.accumulate(model):
                loss = compute_loss(batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    clipped = model.parameters() if parameters is None else parameters
                    accelerator.clip_grad_norm_(clipped, args.max_grad_norm)
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

        if evaluate is not None:
            results = evaluate(epoch)
            if args.with_tracking:
                accelerator.log({f"eval_{k}": v for k, v in results.items()}, step=progress.completed_steps)
        progress.epoch, progress.batches = epoch + 1, 0
        if name := checkpoint_name(args, progress, end_of_epoch=True):
            accelerator.save_state(f"{args.output_dir}/{name}")
        if progress.completed_steps >= max_train_steps:
            break
    return results


@contextlib.contextmanager
def isolated_rng(accelerator: Accelerator):
    """Run evaluation without touching the training random streams, so resumed runs replay training exactly."""
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def tracker_config(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments trackers can record (scalars only)."""
    return {k: v for k, v in vars(args).items() if isinstance(v, int | float | str | bool)}


# ---------------------------------------------------------------------------------------------------- saving
def save_final(accelerator: Accelerator, model, args: argparse.Namespace, processor=None, results=None) -> None:
    """`save_pretrained` of the unwrapped model with the full state dict (correct under FSDP and ZeRO-3), then the
    tokenizer or processor, `all_results.json`, and the Hub upload with `--push_to_hub`."""
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model)
    unwrapped.save_pretrained(
        args.output_dir,
        is_main_process=accelerator.is_main_process,
        save_function=accelerator.save,
        state_dict=state_dict,
    )
    if accelerator.is_main_process:
        if processor is not None:
            processor.save_pretrained(args.output_dir)
        if results is not None:
            with open(Path(args.output_dir) / "all_results.json", "w") as f:
                json.dump(results, f, indent=2)
        if args.push_to_hub:
            push_to_hub(args)
    accelerator.wait_for_everyone()


def push_to_hub(args: argparse.Namespace) -> None:
    """Upload `--output_dir` (without the training checkpoints) to `--hub_model_id`."""
    from huggingface_hub import HfApi

    api = HfApi(token=args.hub_token)
    repo_id = api.create_repo(args.hub_model_id or Path(args.output_dir).name, exist_ok=True).repo_id
    api.upload_folder(
        repo_id=repo_id,
        folder_path=args.output_dir,
        commit_message="End of training",
        ignore_patterns=["step_*", "epoch_*"],
    )
