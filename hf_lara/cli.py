"""The `hf-lara` command line: convert, fidelity, bench, push, demo.

Every command has `--help`. Bad input (unknown method, bad hyper-parameter, missing file, malformed repo id, ...)
prints one line `hf-lara <command>: error: ...` and exits with code 2; a push the Hub refuses or cannot receive
exits with code 1; success exits with 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from . import arguments


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
def cmd_convert(args: argparse.Namespace) -> int:
    from .cards import build_card
    from .integration import LaraConfig, convert

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UsageError(f"{out} exists and is not empty; pass --overwrite to write into it")
    check_methods([args.method])
    hparams = arguments.parse_hparams(args.hparam, args.method)
    layers = arguments.parse_layers(args.layers) if args.layers else None
    config = load_config(args.src)
    # check the method and hyper-parameters before loading any weights
    LaraConfig.from_config(config, method=args.method, layers=layers, **hparams)
    model = model_class_for(args.src, config).from_pretrained(args.src)
    base_model = args.base_model
    if base_model is None and not Path(args.src).exists() and args.src.count("/") == 1:
        base_model = args.src
    convert(model, args.method, layers=layers, **hparams)
    model.save_pretrained(out)
    preprocessor = load_preprocessor(args.src)
    if preprocessor is not None:
        preprocessor.save_pretrained(out)
    build_card(model, base_model=base_model).save(out / "README.md")
    converted = len(model.lara_estimators())
    print(f"Converted {args.src} ({type(model).__name__}, {converted} attention layers) with `{args.method}` -> {out}")
    return 0


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


def cmd_fidelity(args: argparse.Namespace) -> int:
    from .cards import load_folder_card, update_card
    from .fidelity import attention_fidelity, encode_texts, plot_attention_error

    config = load_config(args.model)
    if getattr(config, "lara_method", None) is None:
        raise UsageError(f"{args.model} is not converted by hf_lara; run `hf-lara convert` first")
    if args.update_card and not Path(args.model).is_dir():
        raise UsageError("--update-card needs MODEL to be a local folder")
    texts = read_texts(args)
    tokenizer = load_preprocessor(args.model)
    if tokenizer is None or not hasattr(tokenizer, "pad_token"):
        raise UsageError(f"{args.model} has no tokenizer; `hf-lara fidelity` measures text models")
    model = model_class_for(args.model, config).from_pretrained(args.model)
    batches = encode_texts(tokenizer, texts, batch_size=args.batch_size, max_length=args.max_length)
    report = attention_fidelity(model, batches, progress=True)
    print(
        f"{args.model}: `{report.method}` {report.hparams or ''} on {report.num_sequences} texts "
        f"({report.num_tokens} tokens)\n"
    )
    print("| layer | " + " | ".join(map(str, range(len(report.attention_error)))) + " |")
    print("|---|" + "---|" * len(report.attention_error))
    print("| attention rel. MSE | " + " | ".join(f"{e:.3g}" for e in report.attention_error) + " |")
    print("| end to end | " + " | ".join(f"{e:.3g}" for e in report.attention_error_end_to_end) + " |\n")
    print(f"mean attention rel. MSE (converted layers): {report.mean_attention_error:.4g}")
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
        card.save(Path(args.model) / "README.md")
        print(f"card: {Path(args.model) / 'README.md'}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import estimator_table, format_table

    methods = check_methods(args.method)
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
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
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


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DEMO_HPARAMS, format_demo_table, run_demo

    methods = check_methods(args.method)
    set_threads(args.threads)
    if args.length < 1 or args.repeats < 1:
        raise UsageError("--length and --repeats must be >= 1")
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {out} is a file")
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
        Path(args.json).write_text(json.dumps(result.rows, indent=2) + "\n")
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
    p.add_argument("--layers", help="comma-separated self-attention layers to convert (default: all)")
    p.add_argument("--base-model", help="Hub id of the source, recorded in the card (default: SRC if it is a Hub id)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT")
    p.set_defaults(func=cmd_convert)

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
    if extras and args.command == "convert":
        try:
            args.hparam = (args.hparam or []) + arguments.flags_as_hparams(extras)
        except ValueError as err:
            parser.error(str(err))
    elif extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    try:
        return args.func(args)
    except (UsageError, ValueError, TypeError, NotImplementedError, FileNotFoundError) as err:
        code, message = 2, str(err)
    except (HubError, RuntimeError) as err:
        code, message = 1, str(err)
    print(f"hf-lara {args.command}: error: {' '.join(message.split())}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
