"""Fine-tuning a converted (+ distilled) all-MiniLM-L6-v2 on a text-classification task vs fine-tuning the original.

Task (licence-clean, offline, built from installed sources): passages of 256-400 tokens made of consecutive
docstrings of one source file, labelled by the library they come from: `numpy` (BSD-3), `torch` (BSD-3),
`transformers` (Apache-2.0) or Python's standard library (PSF). Train and test passages come from disjoint files.
With a window of 64, at least 75 % of the keys of every passage lie outside a query's window, so the linear part of
the estimator carries most of the attention.

Both models are `BertForSequenceClassification` built from the all-MiniLM-L6-v2 folder with the same seed (same new
head) and fine-tuned with the same loop, data order and hyper-parameters (AdamW, linear warm-up and decay, all
weights). The converted model is first distilled with `hf_lara.distill` (both stages, mean-pooled embeddings as the
stage-2 target, which is what sentence-transformers' Pooling computes for this model) on the *unlabelled* training
passages; `--no_distill` fine-tunes the fresh conversion instead.

Both models are scored on the same test passages, so the comparison is paired: each converted row reports its
difference to the original with the paired standard error (the spread of the per-passage differences, which only
the passages where exactly one model is right carry) and an exact McNemar test on those discordant passages.
This is the noise of the test sample for these two trained models; the noise of training itself (head
initialisation, dropout, data order: `--seed`) is not in it.

    python benchmarks/bench_finetune.py --methods eva,kernel --sink_tokens 4 --threads 1
    python benchmarks/bench_finetune.py --hparam eva.num_chunks=32                           # override one method
    python benchmarks/bench_finetune.py --keep_softmax 1                 # the worst layer stays on softmax (hybrid)
    python benchmarks/bench_finetune.py --layer_hparam 5:num_chunks=256  # a larger budget in layer 5 only

On a shared CPU the original and each converted model can run as separate processes at the same time: one with
`--methods ''` (the original only), the others with `--original REPORT` naming its output (read, and waited for,
once the converted model is scored; refused unless the task and fine-tuning settings are the same).
`results/finetune_round2.md` was made that way (~30 wall-minutes at a load of 5-8 on 2 cores).
    python benchmarks/bench_finetune.py --quick       # 1-2 minute smoke run
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from fidelity_texts import _docstrings, _files, stdlib_files  # noqa: E402
from report import write_report  # noqa: E402

import hf_lara  # noqa: E402
from hf_lara.arguments import parse_layer_hparams, parse_method_hparams  # noqa: E402
from hf_lara.demo import minilm_path  # noqa: E402
from hf_lara.distill import DistillConfig, distill, length_batches  # noqa: E402

RESULTS = Path(__file__).parent / "results"
LABELS = ("numpy", "torch", "transformers", "stdlib")
WINDOW = 64
METHODS = {
    "eva": {"window_size": WINDOW, "num_chunks": 64, "chunk_size": 16},
    "kernel": {"feature_map": "hedgehog", "window_size": WINDOW, "sink_tokens": 1},
    "lara": {"num_landmarks": 16, "window_size": WINDOW, "adaptive": True, "sink_tokens": 1},
    "rfa": {"num_features": 64, "window_size": WINDOW, "learn_features": True, "sink_tokens": 1},
}


# ------------------------------------------------------------------------------------------------ data
def label_files(label: str) -> list[Path]:
    if label == "stdlib":
        return stdlib_files()
    spec = importlib.util.find_spec(label)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {label!r} is not installed; the task needs numpy, torch and transformers")
    return list(_files([Path(list(spec.submodule_search_locations)[0])], ("tests", "testing", "__pycache__")))


def passages(path: Path, tokenizer, low: int, high: int, per_file: int) -> list[str]:
    """Up to `per_file` passages of `low`..`high` tokens: consecutive words of the file's docstrings."""
    words = " ".join(_docstrings(path)).split()
    out, start, step = [], 0, int((low + high) / 2 / 1.5)  # ~1.5 WordPiece tokens per docstring word
    while start < len(words) and len(out) < per_file:
        chunk = " ".join(words[start : start + step])
        n = len(tokenizer(chunk)["input_ids"])
        if low <= n <= high:
            out.append(chunk)
        elif n > high:  # too many tokens per word here: cut to fit
            chunk = " ".join(chunk.split()[: int(step * high / n * 0.95)])
            if low <= len(tokenizer(chunk)["input_ids"]) <= high:
                out.append(chunk)
        start += step
    return out


def build_task(tokenizer, args) -> dict:
    """`{"train": [(text, label)], "test": [...]}`, balanced, train and test from disjoint files (seeded split)."""
    splits = {"train": [], "test": []}
    for label_id, label in enumerate(LABELS):
        files = label_files(label)
        random.Random(label_id).shuffle(files)
        want = {"train": args.train_per_class, "test": args.test_per_class}
        got = {"train": [], "test": []}
        for path in files:
            # the split of a file is a function of its name: passages of one file never cross splits
            split = "test" if zlib.crc32(path.name.encode() + bytes([label_id])) % 3 == 0 else "train"
            if len(got[split]) >= want[split]:
                if all(len(got[s]) >= want[s] for s in got):
                    break
                continue
            for text in passages(path, tokenizer, args.low, args.high, args.per_file):
                got[split].append((text, label_id))
        for split in splits:
            if len(got[split]) < want[split]:
                print(f"warning: only {len(got[split])} {split} passages for {label}", flush=True)
            splits[split] += got[split][: want[split]]
    random.Random(0).shuffle(splits["train"])
    return splits


# ------------------------------------------------------------------------------------------------ training
def encode(tokenizer, examples: list[tuple[str, int]], max_length: int) -> list[dict]:
    return [
        {"input_ids": tokenizer(t, truncation=True, max_length=max_length)["input_ids"], "label": y}
        for t, y in examples
    ]


def collate(items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    n = max(len(x["input_ids"]) for x in items)
    ids = torch.full((len(items), n), pad_id)
    mask = torch.zeros(len(items), n, dtype=torch.long)
    for i, x in enumerate(items):
        ids[i, : len(x["input_ids"])] = torch.tensor(x["input_ids"])
        mask[i, : len(x["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([x["label"] for x in items])}


def finetune(model, train: list[dict], pad_id: int, args) -> dict:
    """All weights, AdamW, linear warm-up (10 %) then linear decay, `args.steps` steps of `args.batch_size`; the data
    order depends only on `args.seed`, so both models see the same batches."""
    rng = random.Random(args.seed)
    order: list[int] = []
    while len(order) < args.steps * args.batch_size:
        epoch = list(range(len(train)))
        rng.shuffle(epoch)
        order += epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (args.steps - s) / (args.steps - warmup))
    )
    torch.manual_seed(args.seed)  # dropout
    model.train()
    start, cpu, losses = time.monotonic(), time.process_time(), []
    for step in range(args.steps):
        batch = collate([train[i] for i in order[step * args.batch_size : (step + 1) * args.batch_size]], pad_id)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return {
        "steps": args.steps,
        "minutes": (time.monotonic() - start) / 60,
        "cpu_minutes": (time.process_time() - cpu) / 60,
        "loss_first": losses[0],
        "loss_last": sum(losses[-10:]) / len(losses[-10:]),
        "losses": [round(x, 4) for x in losses],
    }


@torch.no_grad()
def correct(model, test: list[dict], pad_id: int, batch_size: int = 16) -> list[bool]:
    """Whether the model's prediction is right, per passage, in the order of `test` (evaluated in length order)."""
    model.eval()
    order = sorted(range(len(test)), key=lambda i: len(test[i]["input_ids"]))
    out = [False] * len(test)
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        batch = collate([test[i] for i in chunk], pad_id)
        labels = batch.pop("labels")
        for i, right in zip(chunk, (model(**batch).logits.argmax(-1) == labels).tolist(), strict=True):
            out[i] = bool(right)
    return out


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: under "both models are equally good", each of the `n = only_a + only_b`
    discordant passages is won by either model with probability 1/2, so `min(only_a, only_b) ~ Binomial(n, 1/2)`;
    p = 2 P(X <= min), capped at 1 (1 when there is no discordant passage)."""
    if only_a < 0 or only_b < 0:
        raise ValueError(f"discordant counts must be >= 0, got {only_a} and {only_b}.")
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired(reference: list[bool], other: list[bool]) -> dict:
    """Paired comparison of two models on the same passages: `other` minus `reference`.

    With `d_i = other_i - reference_i` in {-1, 0, 1}, the difference of accuracies is the mean of `d` and its paired
    standard error is `sd(d) / sqrt(n)` (sample standard deviation, `n - 1`); only the discordant passages (one model
    right, the other wrong) make `d` non-zero. Also the two discordant counts and their exact McNemar p-value.
    """
    n = len(reference)
    if n < 2 or len(other) != n:
        raise ValueError(f"need two lists of the same length >= 2, got {len(reference)} and {len(other)}.")
    only_reference = sum(1 for a, b in zip(reference, other, strict=True) if a and not b)
    only_other = sum(1 for a, b in zip(reference, other, strict=True) if b and not a)
    mean = (only_other - only_reference) / n
    variance = (only_other + only_reference - n * mean**2) / (n - 1)  # sum of d_i^2 is the discordant count
    return {
        "n": n,
        "difference_points": 100 * mean,
        "paired_se_points": 100 * math.sqrt(variance / n),
        "only_reference_right": only_reference,
        "only_other_right": only_other,
        "both_right": sum(1 for a, b in zip(reference, other, strict=True) if a and b),
        "mcnemar_p": mcnemar_exact(only_reference, only_other),
    }


def bits(flags: list[bool]) -> str:
    """`[True, False, True]` -> `"101"`: per-passage correctness as stored in the JSON (one character a passage)."""
    return "".join("1" if x else "0" for x in flags)


def accuracy_se(accuracy: float, n: int) -> float:
    """Binomial standard error of one accuracy measured on `n` passages, in points."""
    return 100 * math.sqrt(accuracy * (1 - accuracy) / n)


#: Settings that decide the task's passages (with the test labels, compared when `--original` is read).
SAME_TASK = ("low", "high", "per_file", "train_per_class", "test_per_class")
#: Fine-tuning settings both models must share.
SAME_FINETUNE = ("steps", "batch_size", "lr", "seed")


def expected_task(args, task: dict, train: list) -> dict:
    """What a report's `conditions` must hold for its original to be paired with this run's converted models."""
    return {
        "train": len(train),
        "test_labels": "".join(str(y) for _, y in task["test"]),
        "data": {k: getattr(args, k) for k in SAME_TASK},
        "hparams": {k: getattr(args, k) for k in SAME_FINETUNE},
    }


def original_row(path: str | Path, expected: dict, wait_minutes: float, poll_seconds: float = 30.0) -> dict:
    """The original's row of the report `path` (its `.json`), once that file exists and holds it (polled every
    `poll_seconds` for up to `wait_minutes`), checked to come from the same task and fine-tuning settings."""
    path = Path(path).with_suffix(".json")
    deadline = time.monotonic() + wait_minutes * 60
    while True:
        if path.exists():
            report = json.loads(path.read_text())
            rows = [r for r in report["rows"] if r["model"] == "original (softmax)"]
            if rows:
                break
        if time.monotonic() >= deadline:
            raise SystemExit(f"--original: {path} holds no original row after {wait_minutes} minutes of waiting.")
        print(f"waiting for the original's row in {path}", flush=True)
        time.sleep(poll_seconds)
    conditions = report["conditions"]
    for key, want in expected.items():
        got = conditions.get(key)
        if key == "hparams":
            got = {k: (got or {}).get(k) for k in want}
        if got != want:
            raise SystemExit(f"--original: {path} is from another task or setting: {key} is {got!r}, here {want!r}.")
    return {**rows[0], "from": str(path)}


def method_hparams(methods: list[str], sink_tokens: int | None, overrides: dict[str, dict]) -> dict[str, dict]:
    """The hyper-parameters of each method: the `METHODS` table, `sink_tokens` for all if given, then `overrides`
    (`parse_method_hparams` of `--hparam METHOD.KEY=VALUE`), which must name methods being run."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}.")
    extra = [m for m in overrides if m not in methods]
    if extra:
        raise ValueError(
            f"`--hparam` names method {extra[0]!r}, which is not run; `--methods` is {','.join(methods)}."
        )
    if sink_tokens is not None and sink_tokens < 0:
        raise ValueError(f"`--sink_tokens` must be >= 0, got {sink_tokens}.")
    out = {}
    for m in methods:
        hp = dict(METHODS[m])
        if sink_tokens is not None:
            hp["sink_tokens"] = sink_tokens
        hp.update(overrides.get(m, {}))
        out[m] = hp
    return out


def convert(model, method: str, hparams: dict, task: dict, tokenizer, args):
    """`hf_lara.convert`; with `--keep_softmax K` the K worst layers, measured on training passages, stay exact."""
    layer_hparams = parse_layer_hparams(args.layer_hparam, method)
    if not args.keep_softmax:
        return hf_lara.convert(model, method, layer_hparams=layer_hparams, **hparams)
    texts = [t for t, _ in task["train"][:32]]
    calibration = length_batches(tokenizer, texts, max_length=args.high, batch_tokens=8192)
    return hf_lara.convert(
        model, method, keep_softmax=args.keep_softmax, calibration=calibration, layer_hparams=layer_hparams, **hparams
    )


def classifier(seed: int):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)  # the new head's initialisation
    return AutoModelForSequenceClassification.from_pretrained(
        minilm_path(), num_labels=len(LABELS), dtype=torch.float32
    )


def length_stats(encoded: list[dict]) -> dict:
    n = sorted(len(x["input_ids"]) for x in encoded)
    q = statistics.quantiles(n, n=4)
    return {
        "min": n[0],
        "p25": q[0],
        "median": q[1],
        "p75": q[2],
        "max": n[-1],
        "min_share_keys_outside_window": 1 - WINDOW / n[0],
        "median_share_keys_outside_window": 1 - WINDOW / q[1],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="eva", help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument(
        "--sink_tokens", type=int, default=None, help="sink tokens of every method (default: the METHODS table)"
    )
    parser.add_argument(
        "--hparam",
        action="append",
        default=[],
        metavar="METHOD.KEY=VALUE",
        help="override one method's hyper-parameter, e.g. --hparam eva.num_chunks=32 (repeatable)",
    )
    parser.add_argument("--no_distill", action="store_true", help="fine-tune the fresh conversion")
    parser.add_argument(
        "--keep_softmax",
        type=int,
        default=0,
        help="leave the K layers with the largest attention error on softmax (chosen on 32 training passages)",
    )
    parser.add_argument(
        "--layer_hparam",
        action="append",
        default=[],
        metavar="LAYER:KEY=VALUE",
        help="hyper-parameter of one layer for every method, e.g. --layer_hparam 5:num_chunks=256 (repeatable)",
    )
    parser.add_argument("--distill_minutes", type=float, default=3.0, help="wall-clock budget of hf_lara.distill")
    parser.add_argument("--lora_rank", type=int, default=DistillConfig.lora_rank, help="LoRA rank of stage 2")
    parser.add_argument("--steps", type=int, default=75)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--low", type=int, default=256)
    parser.add_argument("--high", type=int, default=400)
    parser.add_argument("--per_file", type=int, default=2)
    parser.add_argument("--train_per_class", type=int, default=150)
    parser.add_argument("--test_per_class", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--original",
        default=None,
        metavar="JSON",
        help="take the original's row from this report of a run on the same task (e.g. one with --methods '' "
        "running at the same time: waited for when needed) instead of fine-tuning it here",
    )
    parser.add_argument("--original_wait", type=float, default=120.0, help="minutes to wait for --original")
    parser.add_argument("--output", default=str(RESULTS / "finetune"))
    parser.add_argument("--quick", action="store_true", help="smoke run: few steps and examples")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.distill_minutes, args.train_per_class, args.test_per_class = 6, 0.2, 12, 8
        if args.output == str(RESULTS / "finetune"):
            args.output = os.path.join(tempfile.gettempdir(), "hf_lara_bench_finetune_quick")
    methods = [m for m in args.methods.split(",") if m]
    try:
        hparams = method_hparams(methods, args.sink_tokens, parse_method_hparams(args.hparam))
    except ValueError as err:
        parser.error(str(err))
    if args.original is not None and not methods:
        parser.error("`--original` takes the original from another run, so `--methods` must name at least one method.")
    torch.set_num_threads(args.threads)
    wall, cpu, load_start = time.monotonic(), time.process_time(), os.getloadavg()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    tokenizer.model_max_length = 10**6
    task = build_task(tokenizer, args)
    train, test = encode(tokenizer, task["train"], 512), encode(tokenizer, task["test"], 512)
    lengths = {"train": length_stats(train), "test": length_stats(test)}
    print(f"{len(train)} train / {len(test)} test passages; tokens {lengths}", flush=True)
    pad_id = tokenizer.pad_token_id

    def report(rows: list[dict]) -> None:
        conditions = {
            "task": "source library of a docstring passage: " + ", ".join(LABELS),
            "train": len(train),
            "test": len(test),
            "test_labels": "".join(str(y) for _, y in task["test"]),  # label index per test passage, in order
            "tokens": lengths,
            "hparams": {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "seed", "distill_minutes")},
            "data": {k: getattr(args, k) for k in SAME_TASK},
            "sink_tokens": args.sink_tokens,
            "hparam_overrides": args.hparam,
            "torch_threads": args.threads,
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_average_start": load_start,
            "load_average_now": os.getloadavg(),
            "wall_minutes": (time.monotonic() - wall) / 60,
            "cpu_minutes": (time.process_time() - cpu) / 60,
            "quick": args.quick,
            "finished": len(rows) == 1 + len(methods),
        }
        write_report(args.output, conditions, rows, table(rows, lengths, args))

    rows: list[dict] = []
    if args.original is None:
        original = classifier(args.seed)
        stats = finetune(original, train, pad_id, args)
        right = correct(original, test, pad_id)
        rows.append({"model": "original (softmax)", "accuracy": sum(right) / len(test), "correct": bits(right)})
        rows[0]["finetune"] = stats
        print(f"original: accuracy {rows[0]['accuracy']:.4f} ({stats['minutes']:.1f} min)", flush=True)
        report(rows)  # every finished row is on disk, in case a later one does not finish
        del original
    for method in methods:
        model = convert(classifier(args.seed), method, hparams[method], task, tokenizer, args)
        row = {"model": method, "hparams": hparams[method], "distilled": not args.no_distill}
        if args.keep_softmax:
            row["kept_softmax"] = model.lara_calibration.kept_softmax
        if model.config.lara_layer_hparams:
            row["layer_hparams"] = model.config.lara_layer_hparams
        if not args.no_distill:
            row["lora_rank"] = args.lora_rank
            config = DistillConfig(
                max_minutes=args.distill_minutes, max_length=args.high, lora_rank=args.lora_rank, progress=False
            )
            result = distill(model, tokenizer, [t for t, _ in task["train"]], config)
            row["distill"] = {
                k: {x: v[x] for x in ("steps", "minutes", "cpu_minutes")} for k, v in result.stages.items()
            }
        stats = finetune(model, train, pad_id, args)
        right = correct(model, test, pad_id)
        if not rows:  # the original from a run in parallel, read once its row is needed
            rows.append(original_row(args.original, expected_task(args, task, train), args.original_wait))
        reference = [c == "1" for c in rows[0]["correct"]]
        row.update(
            accuracy=sum(right) / len(test), correct=bits(right), finetune=stats, paired=paired(reference, right)
        )
        row["difference_points"] = row["paired"]["difference_points"]
        rows.append(row)
        p = row["paired"]
        print(
            f"{method}: accuracy {row['accuracy']:.4f} ({p['difference_points']:+.1f} +- {p['paired_se_points']:.1f}"
            f" points, only original right {p['only_reference_right']}, only {method} right {p['only_other_right']},"
            f" McNemar p {p['mcnemar_p']:.2g})",
            flush=True,
        )
        report(rows)
        del model
    print(table(rows, lengths, args))


def table(rows: list[dict], lengths: dict, args) -> str:
    t = lengths["test"]
    n = len(rows[0]["correct"]) if rows else 0
    lines = [
        f"Test passages: {n}, {t['min']}-{t['max']} tokens (median {t['median']:.0f}); window {WINDOW} leaves "
        f">= {100 * t['min_share_keys_outside_window']:.0f} % of the keys outside. Fine-tuning: {args.steps} steps x "
        f"{args.batch_size}, lr {args.lr}, seed {args.seed}, all weights. Difference: converted minus original on the "
        "same passages, +- its paired standard error; discordant: passages only the original / only the converted "
        "model gets right; p: exact McNemar test on them.",
        "",
        "| model | hparams | distilled (wall / CPU min) | test accuracy +- SE | difference (points) +- paired SE "
        "| discordant (only original / only converted) | McNemar p | fine-tune loss first -> last 10 "
        "| fine-tune min (wall / CPU) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        hp = ", ".join(f"{k}={v}" for k, v in r.get("hparams", {}).items()) or "—"
        for layer, overrides in r.get("layer_hparams", {}).items():
            hp += f", layer {layer}: " + ", ".join(f"{k}={v}" for k, v in overrides.items())
        if r.get("kept_softmax"):
            hp += f", softmax kept in layers {r['kept_softmax']}"
        dist = "—"
        if r.get("distill"):
            wall = sum(s["minutes"] for s in r["distill"].values())
            cpu = sum(s["cpu_minutes"] for s in r["distill"].values())
            dist = f"yes ({wall:.1f} / {cpu:.1f})"
        elif "distilled" in r:
            dist = "no (fresh)"
        diff = discordant = p = "—"
        if "paired" in r:
            q = r["paired"]
            diff = f"{q['difference_points']:+.1f} +- {q['paired_se_points']:.1f}"
            discordant = f"{q['only_reference_right']} / {q['only_other_right']}"
            p = f"{q['mcnemar_p']:.2g}"
        se = accuracy_se(r["accuracy"], len(r["correct"]))
        f = r["finetune"]
        lines.append(
            f"| {r['model']} | {hp} | {dist} | {100 * r['accuracy']:.1f} % +- {se:.1f} | {diff} | {discordant} | {p} "
            f"| {f['loss_first']:.2f} -> {f['loss_last']:.2f} | {f['minutes']:.1f} / {f['cpu_minutes']:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
