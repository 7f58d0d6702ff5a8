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

    python benchmarks/bench_finetune.py               # ~20-30 min on a loaded 2-core CPU; fewer --steps is faster
    python benchmarks/bench_finetune.py --quick       # 1-2 minute smoke run
"""

from __future__ import annotations

import argparse
import importlib.util
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
from hf_lara.demo import minilm_path  # noqa: E402
from hf_lara.distill import DistillConfig, distill  # noqa: E402

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
    }


@torch.no_grad()
def accuracy(model, test: list[dict], pad_id: int, batch_size: int = 16) -> float:
    model.eval()
    items = sorted(test, key=lambda x: len(x["input_ids"]))
    correct = 0
    for s in range(0, len(items), batch_size):
        batch = collate(items[s : s + batch_size], pad_id)
        labels = batch.pop("labels")
        correct += (model(**batch).logits.argmax(-1) == labels).sum().item()
    return correct / len(items)


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
    parser.add_argument("--no_distill", action="store_true", help="fine-tune the fresh conversion")
    parser.add_argument("--distill_minutes", type=float, default=3.0)
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
    parser.add_argument("--output", default=str(RESULTS / "finetune"))
    parser.add_argument("--quick", action="store_true", help="smoke run: few steps and examples")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.distill_minutes, args.train_per_class, args.test_per_class = 6, 0.2, 12, 8
        if args.output == str(RESULTS / "finetune"):
            args.output = os.path.join(tempfile.gettempdir(), "hf_lara_bench_finetune_quick")
    methods = args.methods.split(",")
    for m in methods:
        if m not in METHODS:
            parser.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    torch.set_num_threads(args.threads)
    wall, cpu = time.monotonic(), time.process_time()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    tokenizer.model_max_length = 10**6
    task = build_task(tokenizer, args)
    train, test = encode(tokenizer, task["train"], 512), encode(tokenizer, task["test"], 512)
    lengths = {"train": length_stats(train), "test": length_stats(test)}
    print(f"{len(train)} train / {len(test)} test passages; tokens {lengths}", flush=True)
    pad_id = tokenizer.pad_token_id

    rows = []
    original = classifier(args.seed)
    stats = finetune(original, train, pad_id, args)
    rows.append({"model": "original (softmax)", "accuracy": accuracy(original, test, pad_id), "finetune": stats})
    print(f"original: accuracy {rows[-1]['accuracy']:.4f} ({stats['minutes']:.1f} min)", flush=True)
    del original
    for method in methods:
        model = hf_lara.convert(classifier(args.seed), method, **METHODS[method])
        row = {"model": method, "hparams": METHODS[method], "distilled": not args.no_distill}
        if not args.no_distill:
            config = DistillConfig(max_minutes=args.distill_minutes, max_length=args.high, progress=False)
            result = distill(model, tokenizer, [t for t, _ in task["train"]], config)
            row["distill"] = {
                k: {x: v[x] for x in ("steps", "minutes", "cpu_minutes")} for k, v in result.stages.items()
            }
        stats = finetune(model, train, pad_id, args)
        row.update(accuracy=accuracy(model, test, pad_id), finetune=stats)
        row["difference_points"] = 100 * (row["accuracy"] - rows[0]["accuracy"])
        rows.append(row)
        print(f"{method}: accuracy {row['accuracy']:.4f} ({row['difference_points']:+.1f} points)", flush=True)
        del model
    text = table(rows, lengths, args)
    print(text)
    conditions = {
        "task": "source library of a docstring passage: " + ", ".join(LABELS),
        "train": len(train),
        "test": len(test),
        "tokens": lengths,
        "hparams": {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "seed", "distill_minutes")},
        "torch_threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "wall_minutes": (time.monotonic() - wall) / 60,
        "cpu_minutes": (time.process_time() - cpu) / 60,
        "quick": args.quick,
    }
    write_report(args.output, conditions, rows, text)


def table(rows: list[dict], lengths: dict, args) -> str:
    t = lengths["test"]
    lines = [
        f"Test passages: {t['min']}-{t['max']} tokens (median {t['median']:.0f}); window {WINDOW} leaves "
        f">= {100 * t['min_share_keys_outside_window']:.0f} % of the keys outside. Fine-tuning: {args.steps} steps x "
        f"{args.batch_size}, lr {args.lr}, seed {args.seed}, all weights.",
        "",
        "| model | hparams | distilled (min) | test accuracy | difference (points) | fine-tune min |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        hp = ", ".join(f"{k}={v}" for k, v in r.get("hparams", {}).items()) or "—"
        dist = "—"
        if r.get("distill"):
            dist = f"yes ({sum(s['minutes'] for s in r['distill'].values()):.1f})"
        elif "distilled" in r:
            dist = "no (fresh)"
        diff = f"{r['difference_points']:+.1f}" if "difference_points" in r else "—"
        lines.append(
            f"| {r['model']} | {hp} | {dist} | {100 * r['accuracy']:.1f} % | {diff} | {r['finetune']['minutes']:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
