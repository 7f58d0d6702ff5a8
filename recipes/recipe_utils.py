"""Pieces every hf_lara recipe shares: command-line options, the model (converted on load or already converted),
local or Hub datasets with clear data errors, the optimizer and scheduler, resume bookkeeping (atomic checkpoints,
progress as JSON, nothing unpickled) and the final save.

Each recipe keeps its training loop in its own `training_function`, like Accelerate's `nlp_example.py`. Argument
names follow Transformers' `examples/pytorch/*_no_trainer.py` scripts; hyper-parameters and layers are read by
`hf_lara.arguments`, as in the `hf-lara` command line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pickle
import re
import shutil
import sys
from collections.abc import Iterable
from dataclasses import asdict, astuple, dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
import transformers
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    DistributedType,
    ProjectConfiguration,
)
from datasets import DatasetDict, load_dataset
from safetensors import SafetensorError
from torch.utils.data import DataLoader

import hf_lara
from hf_lara.arguments import add_layer_hparam, parse_hparams, parse_layer_hparams, parse_layers
from hf_lara.attention import build_attention

#: Local file extensions the text recipes read, mapped to the `datasets` builder that reads them.
TEXT_BUILDERS = {"csv": "csv", "json": "json", "jsonl": "json", "txt": "text"}
#: Checkpoint folder names written by `--checkpointing_steps`.
CHECKPOINT_PATTERN = re.compile(r"^(step|epoch)_(\d+)$")
#: Training progress in each checkpoint, written last: its presence marks the checkpoint complete.
PROGRESS_FILE = "training_progress.json"
#: Files in a checkpoint that would be unpickled on loading; resuming refuses checkpoints that hold any.
PICKLED_FILES = ("custom_checkpoint_*.pkl", ".metadata")
#: Head dimension of the meta-device estimator `estimators_have_parameters` builds.
ESTIMATOR_PROBE_DIM = 8


class RecipeError(ValueError):
    """A problem with the user's arguments, data or checkpoints: `main` prints it as one line and exits with 2."""


# ---------------------------------------------------------------------------------------------------- arguments
def add_model_args(parser: argparse.ArgumentParser) -> None:
    """`--model_name_or_path` plus the conversion options (`--method`, `--hparam`, `--layer_hparam`, `--layers`)."""
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
        "--hparam",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Estimator hyper-parameter, repeatable: `--hparam feature_map=hedgehog --hparam num_features=32`. Values "
        "take the estimator's declared types; booleans are true/false/1/0.",
    )
    add_layer_hparam(group)
    group.add_argument("--layers", default=None, help="Self-attention layers to convert, e.g. `0,2` (default: all).")
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


def check_common_args(args: argparse.Namespace, *, builders: dict[str, str] | None = TEXT_BUILDERS) -> None:
    """Refuse bad arguments before anything heavy runs; sets `args.hparams` and `args.layer_hparams` (dicts) and
    `args.layers` (a list).

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
    check_conversion(args)


def check_data_args(args: argparse.Namespace, builders: dict[str, str]) -> None:
    """A Hub dataset or local files of a supported type."""
    if args.dataset_name is None and args.train_file is None and getattr(args, "task_name", None) is None:
        raise ValueError(
            "No training data: pass `--dataset_name` (a Hub dataset) or `--train_file` "
            f"(a local {'/'.join(sorted(builders))} file)."
        )
    if getattr(args, "task_name", None) is not None and args.train_file is not None:
        raise ValueError("Pass either `--task_name` (GLUE through `datasets`) or `--train_file`, not both.")
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
        if args.hparam or args.layer_hparam or args.layers is not None:
            raise ValueError("`--hparam`, `--layer_hparam` and `--layers` need `--method`.")
        args.hparams, args.layer_hparams = {}, {}
        config = conversion_config(args)
        if not isinstance(config, hf_lara.LaraConfig):
            raise ValueError(
                f"{args.model_name_or_path!r} is not an hf_lara-converted checkpoint (model type `{config.model_type}`); "
                f"pass `--method` (one of {', '.join(hf_lara.available_methods())}) to convert it."
            )
        return
    args.hparams = parse_hparams(args.hparam, args.method)
    args.layer_hparams = parse_layer_hparams(args.layer_hparam, args.method)
    if args.layers is not None:
        args.layers = parse_layers(args.layers)
    # builds the shared and each overridden layer's estimator: bad values and unsupported families fail here
    config = conversion_config(args)
    num_layers = getattr(config, "num_hidden_layers", None)
    for name, indices in (("--layers", args.layers), ("--layer_hparam", list(args.layer_hparams))):
        if indices and num_layers is not None and max(indices) >= num_layers:
            raise ValueError(f"`{name}` must be indices below {num_layers} (the model's layers), got {indices}.")


def conversion_config(args: argparse.Namespace) -> transformers.PreTrainedConfig:
    """The config the recipe trains: the checkpoint's own without `--method`, else the `LaraConfig` that `--method`,
    `--hparam`, `--layer_hparam` and `--layers` make of it (`args.hparams`, `args.layer_hparams` parsed)."""
    if args.method is None:
        return transformers.AutoConfig.from_pretrained(args.model_name_or_path)
    return hf_lara.LaraConfig.from_pretrained(
        args.model_name_or_path,
        method=args.method,
        layers=args.layers,
        layer_hparams=args.layer_hparams,
        **args.hparams,
    )


def exit_on_error(script: str, error: ValueError) -> NoReturn:
    """Print `error` as one line, `<script>: error: ...` as argparse does, and exit with code 2."""
    print(f"{Path(script).name}: error: {' '.join(str(error).split())}", file=sys.stderr)
    sys.exit(2)


# ---------------------------------------------------------------------------------------------------- model and data
def load_model(auto_class: type, args: argparse.Namespace, **kwargs: Any) -> transformers.PreTrainedModel:
    """`auto_class.from_pretrained(...)`, then `hf_lara.convert` when `--method` is given."""
    model = auto_class.from_pretrained(args.model_name_or_path, **kwargs)
    if args.method is not None:
        hf_lara.convert(model, args.method, layers=args.layers, layer_hparams=args.layer_hparams, **args.hparams)
    return model


def load_named_dataset(args: argparse.Namespace) -> DatasetDict:
    """`--dataset_name` (and `--dataset_config_name`) through `datasets`, with a validation split held out if it has
    none; a name that cannot be loaded is a `RecipeError`."""
    try:
        raw = load_dataset(args.dataset_name, args.dataset_config_name)
    except (OSError, ValueError) as error:  # offline, unknown name or configuration
        raise RecipeError(f"`--dataset_name` {args.dataset_name!r} could not be loaded: {first_line(error)}") from None
    return with_validation_split(raw, args)


def load_text_datasets(args: argparse.Namespace, **builder_kwargs: Any) -> DatasetDict:
    """`train` and `validation` splits from the Hub or local files; holds out a validation split if there is none.

    Local files are read one by one, so that an empty or unreadable file, or a validation file whose columns differ
    from the training file's, is reported naming the file (and the column) instead of as a `datasets` error.
    """
    if args.dataset_name is not None:
        return load_named_dataset(args)
    builder = TEXT_BUILDERS[Path(args.train_file).suffix.lstrip(".")]
    extra = builder_kwargs if builder == "text" else {}
    raw = DatasetDict(train=read_data_file(args.train_file, "--train_file", builder, **extra))
    if args.validation_file is not None:
        raw["validation"] = read_data_file(args.validation_file, "--validation_file", builder, **extra)
        check_same_columns(raw, args)
    return with_validation_split(raw, args)


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def read_data_file(path: str, option: str, builder: str, **kwargs: Any):
    """One local file as a `Dataset`; an empty, unreadable or row-less file is a `RecipeError` naming it."""
    if Path(path).stat().st_size == 0:
        raise RecipeError(f"`{option}` {path!r} is empty.")
    try:
        dataset = load_dataset(builder, data_files={"train": path}, split="train", **kwargs)
    except Exception as error:  # datasets wraps pandas/pyarrow parse errors in several types
        # datasets cannot build an empty split: a header without rows ends here
        problem = "has no rows" if "corresponds to no data" in str(error) else f"could not be read as {builder}"
        raise RecipeError(f"`{option}` {path!r} {problem}: {first_line(error)}") from None
    if len(dataset) == 0:
        raise RecipeError(f"`{option}` {path!r} has no rows.")
    return dataset


def check_same_columns(raw: DatasetDict, args: argparse.Namespace) -> None:
    """The validation file must have the training file's columns."""
    train, valid = raw["train"].column_names, raw["validation"].column_names
    missing, extra = [c for c in train if c not in valid], [c for c in valid if c not in train]
    if missing or extra:
        problem = f"lacks column {missing[0]!r}" if missing else f"has column {extra[0]!r}"
        raise RecipeError(
            f"`--validation_file` {args.validation_file!r} {problem}, unlike `--train_file` {args.train_file!r}: "
            f"columns {valid} vs {train}."
        )


def data_source(args: argparse.Namespace, split: str) -> str:
    """Where `split` came from, for messages: "`--train_file` 'data.csv'" or "`--dataset_name` 'glue' (train)"."""
    path = getattr(args, f"{split}_file", None) if split in ("train", "validation") else None
    if getattr(args, "dataset_name", None) is None and path is not None:
        return f"`--{split}_file` {path!r}"
    if getattr(args, "dataset_name", None) is None and split == "validation" and getattr(args, "train_file", None):
        return f"`--train_file` {args.train_file!r}"
    name = getattr(args, "dataset_name", None) or getattr(args, "train_dir", None)
    return f"the dataset {name!r} ({split} split)"


def with_validation_split(raw: DatasetDict, args: argparse.Namespace) -> DatasetDict:
    """Hold out `--validation_split_percentage` of `train` when there is no `validation` split; apply the caps."""
    if "train" not in raw:
        raise RecipeError(f"The dataset has no `train` split; its splits are {list(raw)}.")
    if len(raw["train"]) == 0:
        raise RecipeError(f"{data_source(args, 'train')} has no rows.")
    if "validation" not in raw:
        # `--train_val_split` (a fraction) in the image recipe, `--validation_split_percentage` in the text ones
        holdout = getattr(args, "train_val_split", None) or args.validation_split_percentage / 100
        if not 0 < holdout < 1:
            raise RecipeError(
                "No validation split: pass a validation file or folder, or hold out a fraction of the training data "
                f"strictly between 0 and 1 (`--validation_split_percentage` 1-99, `--train_val_split`), got {holdout}."
            )
        split = raw["train"].train_test_split(test_size=holdout, seed=args.seed)
        raw = DatasetDict(train=split["train"], validation=split["test"])
    if args.max_train_samples is not None:
        raw["train"] = raw["train"].select(range(min(args.max_train_samples, len(raw["train"]))))
    if args.max_eval_samples is not None:
        raw["validation"] = raw["validation"].select(range(min(args.max_eval_samples, len(raw["validation"]))))
    return raw


def require_columns(raw: DatasetDict, columns: dict[str, str | None], args: argparse.Namespace) -> None:
    """Every named column must exist in every split: `{"--text_column_name": "text"}`; None values are skipped."""
    for split, dataset in raw.items():
        for option, column in columns.items():
            if column is not None and column not in dataset.column_names:
                raise RecipeError(
                    f"`{option}` {column!r} is not a column of {data_source(args, split)}; "
                    f"its columns are {dataset.column_names}."
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
def make_accelerator(args: argparse.Namespace, *, find_unused_parameters: bool = False) -> Accelerator:
    """An `Accelerator` with gradient accumulation, trackers and a seedable sampler (shuffling that resumes exactly).

    Mixed precision, the distributed type, FSDP and DeepSpeed come from the `accelerate launch` config. Under DDP,
    `find_unused_parameters` lets a step leave some parameters without a gradient (see `estimators_have_parameters`).
    A config asking for FSDP or DeepSpeed that Accelerate cannot honour on this machine is an error, not a silent
    fall-back to plain data parallelism.
    """
    # under `torchrun` on a machine without accelerators, Accelerate only forms a (gloo) process group when told to
    # use the CPU; otherwise every process would train alone on all the data
    cpu_only = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available()
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if find_unused_parameters else []
    accelerator = Accelerator(
        cpu=cpu_only,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to if args.with_tracking else None,
        project_config=ProjectConfiguration(project_dir=args.output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=handlers,
    )
    for flag, wanted in (
        ("ACCELERATE_USE_FSDP", DistributedType.FSDP),
        ("ACCELERATE_USE_DEEPSPEED", DistributedType.DEEPSPEED),
    ):
        if os.environ.get(flag, "false").lower() == "true" and accelerator.distributed_type != wanted:
            raise RecipeError(
                f"The Accelerate config asks for {wanted.value}, but on this machine Accelerate runs "
                f"{accelerator.distributed_type.value} (no GPU: {wanted.value} is not available on CPU). Use a GPU "
                "machine, or recipes/configs/cpu.yaml (one process) or `torchrun --nproc_per_node N` (DDP over gloo)."
            )
    return accelerator


def estimators_have_parameters(args: argparse.Namespace) -> bool:
    """Whether the converted model's estimators own parameters (LARA, EVA, kernel), built on the meta device.

    Such parameters can miss a gradient in a step (LARA's causal proposal means in an encoder, EVA's chunk
    projections when a batch fits its window), which DDP only accepts with `find_unused_parameters=True`.
    """
    config = conversion_config(args)
    method = config.lara_method
    layers = [None, *map(int, config.lara_layer_hparams)]  # the shared set, then each overridden layer's
    layer_hparams = [config.layer_hparams_of(layer) for layer in layers]
    with torch.device("meta"):
        estimators = [
            build_attention(method, num_heads=1, head_dim=ESTIMATOR_PROBE_DIM, **hparams) for hparams in layer_hparams
        ]
    return any(True for estimator in estimators for _ in estimator.parameters())


@dataclass
class TrainingProgress:
    """Where training stands, saved as plain JSON (`PROGRESS_FILE`) in every checkpoint: nothing is unpickled.

    `batches` counts the dataloader batches consumed in `epoch`, which is what `skip_first_batches` needs; it is
    exact with gradient accumulation and with epochs whose length is not a multiple of the accumulation steps.
    """

    epoch: int = 0
    batches: int = 0
    completed_steps: int = 0

    @classmethod
    def read(cls, checkpoint: Path) -> TrainingProgress:
        """The progress recorded in `checkpoint`, checked to be three non-negative integers."""
        try:
            state = json.loads((checkpoint / PROGRESS_FILE).read_text())
            progress = cls(**{key: state[key] for key in ("epoch", "batches", "completed_steps")})
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise RecipeError(f"Checkpoint {str(checkpoint)!r} has no valid {PROGRESS_FILE}: {error}.") from None
        values = astuple(progress)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            raise RecipeError(f"Checkpoint {str(checkpoint)!r}: {PROGRESS_FILE} holds {state}, not step counts.")
        return progress


def complete_checkpoints(output_dir: str) -> list[tuple[TrainingProgress, Path]]:
    """The complete `step_N`/`epoch_N` checkpoints of `output_dir`, oldest first (by optimizer steps, then epoch)."""
    found = []
    for path in Path(output_dir).glob("*"):
        if CHECKPOINT_PATTERN.match(path.name) and path.is_dir() and (path / PROGRESS_FILE).is_file():
            with contextlib.suppress(RecipeError):
                found.append((TrainingProgress.read(path), path))
    return sorted(found, key=lambda item: (item[0].completed_steps, item[0].epoch, item[0].batches))


def resolve_checkpoint(args: argparse.Namespace) -> Path | None:
    """The folder `--resume_from_checkpoint` names; `latest` is the most advanced complete one in `--output_dir`.

    A checkpoint is complete once its `PROGRESS_FILE` exists: `save_checkpoint` writes it last, in a temporary
    folder renamed into place. Folders left by an interrupted save are skipped by `latest` and refused by name.
    """
    if args.resume_from_checkpoint is None:
        return None
    if args.resume_from_checkpoint == "latest":
        found = complete_checkpoints(args.output_dir)
        if not found:
            raise RecipeError(
                f"`--resume_from_checkpoint latest`: no complete step_N or epoch_N checkpoint in {args.output_dir!r}."
            )
        return found[-1][1]
    checkpoint = Path(args.resume_from_checkpoint)
    if not checkpoint.is_dir():
        raise RecipeError(f"`--resume_from_checkpoint` {str(checkpoint)!r} is not a folder.")
    if not (checkpoint / PROGRESS_FILE).is_file():
        raise RecipeError(
            f"`--resume_from_checkpoint` {str(checkpoint)!r} is incomplete or damaged (no {PROGRESS_FILE}, which is "
            "written last): its save was interrupted or it is not a checkpoint of these recipes. Resume from an "
            "earlier checkpoint or from `latest`."
        )
    return checkpoint


def resume_progress(accelerator: Accelerator, args: argparse.Namespace) -> TrainingProgress:
    """The `TrainingProgress` to start from: fresh, or the model, optimizer, scheduler, sampler and random states
    of `--resume_from_checkpoint` loaded into the prepared objects (call after `accelerator.prepare`).

    Nothing in the checkpoint is unpickled: Accelerate loads tensors with `weights_only=True`, the progress is JSON,
    and a checkpoint holding a pickled custom object (which these recipes never write) is refused.
    """
    checkpoint = resolve_checkpoint(args)
    if checkpoint is None:
        return TrainingProgress()
    # Accelerate unpickles registered custom objects, torch.distributed.checkpoint its `.metadata` (sharded FSDP)
    pickles = sorted(p.name for pattern in PICKLED_FILES for p in checkpoint.rglob(pattern))
    if pickles:
        raise RecipeError(
            f"Checkpoint {str(checkpoint)!r} holds {', '.join(pickles)}: pickled objects, which these recipes never "
            "write and will not load (unpickling runs code). Remove them or resume from a checkpoint of these recipes."
        )
    progress = TrainingProgress.read(checkpoint)
    try:
        accelerator.load_state(str(checkpoint))
    except (OSError, EOFError, RuntimeError, KeyError, SafetensorError, pickle.UnpicklingError) as error:
        raise RecipeError(
            f"Checkpoint {str(checkpoint)!r} is damaged: {str(error).splitlines()[0] if str(error) else type(error).__name__}."
        ) from None
    accelerator.print(f"Resumed from checkpoint: {checkpoint} (step {progress.completed_steps})")
    return progress


def save_checkpoint(accelerator: Accelerator, args: argparse.Namespace, progress: TrainingProgress, name: str) -> None:
    """`accelerator.save_state` into `<output_dir>/<name>`, atomically.

    Every process writes into `<name>.partial`; then the main process adds `PROGRESS_FILE` (JSON) and renames the
    folder, replacing an older one of the same name. A run killed before the rename leaves only `<name>.partial`.
    """
    final = Path(args.output_dir) / name
    partial = final.with_name(f"{name}.partial")
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(partial / PROGRESS_FILE, asdict(progress))
        if final.exists():
            stale = final.with_name(f"{name}.stale")
            shutil.rmtree(stale, ignore_errors=True)
            final.rename(stale)
            partial.rename(final)
            shutil.rmtree(stale)
        else:
            partial.rename(final)
    accelerator.wait_for_everyone()


def write_json_atomic(path: Path, data: Any) -> None:
    """`json.dump` into a temporary file beside `path`, flushed to disk, then renamed onto it."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


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
    accelerator: Accelerator,
    args: argparse.Namespace,
    params: Iterable,
    train_dataloader,
    max_train_steps: int | None = None,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over `params` and the `--lr_scheduler_type` schedule, sized from the dataloader before `prepare` (or
    over `max_train_steps` optimizer steps, for a schedule covering part of the run).

    The prepared scheduler steps once per process at every optimizer step, hence the warm-up and total step counts
    multiplied by the number of processes (as in Transformers' `*_no_trainer.py` scripts).
    """
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
    if max_train_steps is None:
        max_train_steps, _ = num_training_steps(args, math.ceil(len(train_dataloader) / accelerator.num_processes))
    scheduler = transformers.get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    return optimizer, scheduler


class LossWindow:
    """The mean training loss of the batches since the last optimizer step, printed as `step N: loss X`."""

    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def add(self, loss: torch.Tensor) -> None:
        self.total, self.count = self.total + loss.detach(), self.count + 1

    def log(self, accelerator: Accelerator, args: argparse.Namespace, step: int, lr: float, last: bool) -> None:
        """Print (and track) the mean over processes every `--logging_steps` and at the last step; then reset."""
        if step % args.logging_steps == 0 or last:
            loss = accelerator.reduce(self.total / self.count, reduction="mean").item()
            accelerator.print(f"step {step}: loss {loss:.8f}")
            if args.with_tracking:
                accelerator.log({"train_loss": loss, "lr": lr}, step=step)
        self.total, self.count = 0.0, 0


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
