"""Fidelity of converted all-MiniLM-L6-v2 before and after `hf_lara.distill`, on text not used in training.

For each method and each regime (short sentences, documents of 256-512 tokens) the sentence-transformers model is
converted, measured fresh, after stage 1 (attention transfer) and after stage 2 (end to end, LoRA merged), against
the unconverted model:

* embedding cosine: mean cosine between the converted and the original sentence-transformers embeddings;
* top-1 / top-5 NN agreement: within the evaluation set, the share of texts whose nearest neighbour is unchanged /
  the mean overlap of the 5 nearest neighbours;
* per-layer attention error: relative MSE of each layer's attention output against softmax on the same queries,
  keys and values, every layer fed the teacher's hidden states (`hf_lara.integration.calibration`);
* training minutes (wall clock of `hf_lara.distill`, which is what `hf-lara distill` runs).

Training text (`--train_source`, default broad): long documents of many installed packages' docstrings and
descriptions, short sentences of numpy/torch/transformers docstrings; evaluation text: docstrings of Python's
standard library (`fidelity_texts.py`). Writes `results/fidelity.json`, `results/fidelity.md` and
`results/fidelity.png`.

    python benchmarks/bench_fidelity.py --minutes 5 --methods eva,kernel
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from fidelity_texts import TRAIN_SOURCES, documents, sentences, stdlib_files, training_files  # noqa: E402
from report import write_report  # noqa: E402

import hf_lara  # noqa: E402
from hf_lara.arguments import parse_layer_hparams, parse_method_hparams  # noqa: E402
from hf_lara.distill import (  # noqa: E402
    DistillConfig,
    attention_transfer,
    end_to_end,
    length_batches,
    sentence_transformers_pooler,  # noqa: E402
)
from hf_lara.fidelity import encode_texts  # noqa: E402
from hf_lara.integration.calibration import measure_layer_errors  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TRAIN_SOURCE_NAMES = {
    "default": "numpy, torch, transformers docstrings (BSD-3, BSD-3, Apache-2.0)",
    "broad": "long: docstrings of installed permissive (MIT/BSD/Apache/ISC/PSF) distributions + their description "
    "prose; short: numpy, torch, transformers docstrings",
    "broad_docstrings": "long: docstrings of installed permissive (MIT/BSD/Apache/ISC/PSF) distributions; short: "
    "numpy, torch, transformers docstrings",
}
# regime -> (token range of evaluation/training texts, max_length, window of windowed methods)
REGIMES = {"short": ((24, 64), 64, 16), "long": ((256, 512), 512, 64)}
# eva: documents (window 64) get 64 chunks of >= 8 tokens; sentences (window 16) 8 chunks, so a query sees at most
# 16 + 8 logits, fewer than the 24-62 tokens of a sentence (64 chunks would be single tokens there: exact softmax)
METHODS = {
    "eva": lambda w: {"window_size": w, "num_chunks": 64 if w >= 64 else w // 2, "chunk_size": min(16, w)},
    "kernel": lambda w: {"feature_map": "hedgehog", "window_size": w},
    "rfa": lambda w: {"num_features": 64, "window_size": w, "learn_features": True},
    "lara": lambda w: {"num_landmarks": 16, "window_size": w, "adaptive": True},
}


def minilm():
    from sentence_transformers import SentenceTransformer

    from hf_lara.demo import minilm_path

    return SentenceTransformer(str(minilm_path()), device="cpu")


def embed(st, texts: list[str], max_length: int) -> torch.Tensor:
    st.max_seq_length = max_length
    return st.encode(texts, batch_size=16, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False)


def neighbours(emb: torch.Tensor, k: int) -> torch.Tensor:
    sims = emb @ emb.T
    sims.fill_diagonal_(-2)
    return sims.topk(k, dim=-1).indices


def similarity_error(emb: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean absolute change of the pairwise cosine similarities between different texts (what NN agreement sees)."""
    off = ~torch.eye(len(emb), dtype=torch.bool)
    return ((emb @ emb.T) - (reference @ reference.T))[off].abs().mean().item()


def compare(st, reference: torch.Tensor, texts: list[str], max_length: int) -> dict:
    emb = embed(st, texts, max_length)
    ref1, ref5 = neighbours(reference, 1), neighbours(reference, 5)
    out1, out5 = neighbours(emb, 1), neighbours(emb, 5)
    overlap = [len(set(a.tolist()) & set(b.tolist())) / 5 for a, b in zip(out5, ref5, strict=True)]
    tokenizer = st.tokenizer
    model = st[0].auto_model
    errors, _ = measure_layer_errors(model, encode_texts(tokenizer, texts, batch_size=16, max_length=max_length))
    return {
        "cosine": (emb * reference).sum(-1).mean().item(),
        "top1": (out1 == ref1).float().mean().item(),
        "top5": sum(overlap) / len(overlap),
        "similarity_error": similarity_error(emb, reference),
        "attention_error": [errors[i] for i in sorted(errors)],
    }


def run_one(base, method: str, regime: str, data: dict, args) -> dict:
    (low, high), max_length, window = REGIMES[regime]
    hparams = METHODS[method](window)
    if args.sink_tokens:
        hparams["sink_tokens"] = args.sink_tokens
    hparams.update(args.method_hparams.get(method, {}))
    layer_hparams = parse_layer_hparams(args.layer_hparam, method)
    st = copy.deepcopy(base)
    st.max_seq_length = max_length
    model = st[0].auto_model
    calibration = None
    if args.keep_softmax:
        # the layers to keep exact are chosen on training text (never on the evaluation text)
        calibration = length_batches(
            st.tokenizer, data[regime]["train"][:32], max_length=max_length, batch_tokens=8192
        )
    hf_lara.convert(
        model, method, keep_softmax=args.keep_softmax, calibration=calibration, layer_hparams=layer_hparams, **hparams
    )
    texts, reference = data[regime]["eval"], data[regime]["reference"]
    row = {"method": method, "regime": regime, "hparams": hparams, "fresh": compare(st, reference, texts, max_length)}
    if layer_hparams:
        row["layer_hparams"] = model.config.lara_layer_hparams
    if args.keep_softmax:
        row["kept_softmax"] = model.lara_calibration.kept_softmax
    print(f"{method} {regime} fresh {row['fresh']['cosine']:.4f} top1 {row['fresh']['top1']:.2f}", flush=True)
    if method not in args.train_methods.split(","):
        row["stage1"], row["stage2"], row["train_minutes"], row["train_cpu_minutes"] = {}, {}, 0.0, 0.0
        return row
    minutes = args.minutes_short if regime == "short" and args.minutes_short else args.minutes
    config = DistillConfig(
        hidden_weight=args.hidden_weight,
        max_minutes=minutes,
        stage1_share=args.stage1_share,
        max_length=max_length,
        batch_tokens=args.batch_tokens,
        progress=not args.no_progress,
        # --distill lora_rank=... wins over --lora_rank
        **{"lora_rank": args.lora_rank, **args.distill_options},
    )
    batches = length_batches(
        st.tokenizer, data[regime]["train"], max_length=max_length, batch_tokens=args.batch_tokens
    )
    seconds = config.stage_seconds()
    start = time.monotonic()
    try:
        s1 = attention_transfer(model, batches, config, seconds[1])
        row["stage1"] = {
            **compare(st, reference, texts, max_length),
            "minutes": s1["minutes"],
            "cpu_minutes": s1["cpu_minutes"],
            "steps": s1["steps"],
            "loss_first": s1["loss_first"],
            "loss_last": s1["loss_last"],
        }
        print(f"  stage1 {row['stage1']['cosine']:.4f} top1 {row['stage1']['top1']:.2f}", flush=True)
    except ValueError as err:  # nothing to train in stage 1 for this estimator
        row["stage1"] = {"skipped": str(err)}
    # the evaluation between the stages is not training time
    remaining = minutes * 60 - row["stage1"].get("minutes", 0) * 60
    _, s2 = end_to_end(model, batches, config, remaining, sentence_transformers_pooler(st))
    row["stage2"] = {
        **compare(st, reference, texts, max_length),
        "minutes": s2["minutes"],
        "cpu_minutes": s2["cpu_minutes"],
        "steps": s2["steps"],
        "loss_first": s2["loss_first"],
        "loss_last": s2["loss_last"],
    }
    row["train_minutes"] = row["stage1"].get("minutes", 0) + s2["minutes"]
    row["train_cpu_minutes"] = row["stage1"].get("cpu_minutes", 0) + s2["cpu_minutes"]
    row["wall_minutes"] = (time.monotonic() - start) / 60
    print(f"  stage2 {row['stage2']['cosine']:.4f} top1 {row['stage2']['top1']:.2f}", flush=True)
    return row


def distill_options(items: list[str]) -> dict:
    """`KEY=VALUE` strings -> `DistillConfig` keyword arguments, typed like the field's default."""
    fields = {f.name: f.default for f in dataclasses.fields(DistillConfig)}
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"--distill {item!r}: expected KEY=VALUE with KEY one of {sorted(fields)}")
        default = fields[key]
        if isinstance(default, bool):
            options[key] = value.lower() in ("1", "true", "yes")
        elif isinstance(default, int | float):
            options[key] = type(default)(value)
        elif default is None:  # optional numbers, e.g. max_steps
            options[key] = int(value) if value.lstrip("-").isdigit() else float(value)
        else:
            options[key] = value
    return options


def evaluation_texts(tokenizer, regime: str, count: int) -> list[str]:
    """The held-out texts of `regime`: standard-library documents or sentences (`tokenizer` with an unbounded
    `model_max_length`, so that lengths are counted untruncated)."""
    (low, high), _, _ = REGIMES[regime]
    pick = documents if regime == "long" else sentences
    return pick(stdlib_files(), tokenizer, low, high, count, seed=0)


def build_data(tokenizer, args) -> dict:
    tokenizer.model_max_length = 10**6
    training = training_files()
    data = {}
    source = TRAIN_SOURCES[getattr(args, "train_source", "default")]
    for regime, ((low, high), _, _) in REGIMES.items():
        if regime == "long":
            training_texts = source(tokenizer, low, high, args.num_train[regime], 1)
        else:
            training_texts = sentences(training, tokenizer, low, high, args.num_train[regime], seed=1)
        data[regime] = {"eval": evaluation_texts(tokenizer, regime, args.num_eval), "train": training_texts}
    tokenizer.model_max_length = 512
    return data


def table(rows: list[dict]) -> str:
    lines = [
        "| method | regime | hparams | fresh cos / top-1 / top-5 | stage 1 cos / top-1 / top-5 | stage 2 cos / top-1 / top-5 "
        "| attention error fresh -> s1 -> s2 (mean) | train min (wall / CPU) |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cell(m):
        if "cosine" not in m:
            return "—"
        return f"{m['cosine']:.3f} / {100 * m['top1']:.0f} % / {100 * m['top5']:.0f} %"

    def err(m):
        return f"{sum(m['attention_error']) / len(m['attention_error']):.3f}" if "attention_error" in m else "—"

    for r in rows:
        hp = ", ".join(f"{k}={v}" for k, v in r["hparams"].items())
        for layer, overrides in r.get("layer_hparams", {}).items():
            hp += f", layer {layer}: " + ", ".join(f"{k}={v}" for k, v in overrides.items())
        if r.get("kept_softmax"):
            hp += f", softmax kept in layers {r['kept_softmax']} (quadratic there)"
        lines.append(
            f"| {r['method']} | {r['regime']} | {hp} | {cell(r['fresh'])} | {cell(r['stage1'])} | {cell(r['stage2'])} "
            f"| {err(r['fresh'])} -> {err(r['stage1'])} -> {err(r['stage2'])} "
            f"| {r['train_minutes']:.1f} / {r['train_cpu_minutes']:.1f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    for ax, regime in zip(axes, REGIMES, strict=True):
        subset = [r for r in rows if r["regime"] == regime]
        for r in subset:
            stages = [s for s in ("fresh", "stage1", "stage2") if "cosine" in r[s]]
            if len(stages) < 2:
                continue
            ax.plot(stages, [r[s]["cosine"] for s in stages], marker="o", label=r["method"])
        ax.axhline(0.98 if regime == "long" else 0.99, color="grey", ls="--", lw=0.8)
        ax.set_title(f"all-MiniLM-L6-v2, {regime} texts")
        ax.set_ylabel("embedding cosine to the original")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="eva,kernel,rfa,lara")
    parser.add_argument("--regimes", default="short,long")
    parser.add_argument("--train_methods", default="eva,kernel", help="methods also distilled (others: fresh only)")
    parser.add_argument("--minutes", type=float, default=4.0, help="distillation budget per (method, regime)")
    parser.add_argument(
        "--minutes_short", type=float, default=None, help="budget for short texts (default: --minutes)"
    )
    parser.add_argument("--stage1_share", type=float, default=0.3)
    parser.add_argument("--batch_tokens", type=int, default=DistillConfig.batch_tokens)
    parser.add_argument("--hidden_weight", type=float, default=0.1)
    parser.add_argument(
        "--lora_rank",
        type=int,
        default=4,
        help="stage-2 LoRA rank (4 with broad text: +0.007 held-out, see results/fidelity_domain.md)",
    )
    parser.add_argument("--num_eval", type=int, default=64)
    parser.add_argument("--num_train_long", type=int, default=400)
    parser.add_argument("--num_train_short", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--train_source",
        default="broad",
        choices=sorted(TRAIN_SOURCES),
        help="training documents of the long regime (fidelity_texts.TRAIN_SOURCES); short texts: default source",
    )
    parser.add_argument(
        "--sink_tokens", type=int, default=0, help="sink tokens of every method (eva and windowed rfa/kernel/lara)"
    )
    parser.add_argument(
        "--keep_softmax", type=int, default=0, help="leave the K layers with the largest error on softmax (quadratic)"
    )
    parser.add_argument(
        "--distill",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another `DistillConfig` field, e.g. --distill layer_weight=1 (repeatable)",
    )
    parser.add_argument(
        "--hparam",
        action="append",
        default=[],
        metavar="METHOD.KEY=VALUE",
        help="override one method's hyper-parameter, e.g. --hparam kernel.num_features=64 (repeatable)",
    )
    parser.add_argument(
        "--layer_hparam",
        action="append",
        default=[],
        metavar="LAYER:KEY=VALUE",
        help="hyper-parameter of one layer for every method, e.g. --layer_hparam 5:num_features=128 (repeatable)",
    )
    parser.add_argument("--output", default=str(RESULTS / "fidelity"))
    parser.add_argument("--no_progress", action="store_true")
    args = parser.parse_args(argv)
    args.num_train = {"long": args.num_train_long, "short": args.num_train_short}
    args.distill_options = distill_options(args.distill)
    args.method_hparams = parse_method_hparams(args.hparam)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_start = os.getloadavg()
    base = minilm()
    data = build_data(base.tokenizer, args)
    regimes = args.regimes.split(",")
    for regime in regimes:
        data[regime]["reference"] = embed(base, data[regime]["eval"], REGIMES[regime][1])
        n = [len(base.tokenizer(t)["input_ids"]) for t in data[regime]["eval"]]
        data[regime]["eval_tokens"] = {"min": min(n), "median": sorted(n)[len(n) // 2], "max": max(n)}
        print(
            regime, len(data[regime]["eval"]), "eval", len(data[regime]["train"]), "train", data[regime]["eval_tokens"]
        )
    rows = [run_one(base, m, r, data, args) for m in args.methods.split(",") for r in regimes]
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    conditions = {
        "model": "all-MiniLM-L6-v2 (sentence-transformers, mean pooling + normalize)",
        "torch_threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "budget_minutes_per_run": args.minutes,
        "budget_minutes_short": args.minutes_short or args.minutes,
        "stage1_share": args.stage1_share,
        "sink_tokens": args.sink_tokens,
        "keep_softmax": args.keep_softmax,
        "distill_options": args.distill_options,
        "lora_rank": args.lora_rank,
        "train_source_option": args.train_source,
        "hparam_overrides": args.method_hparams,
        "layer_hparam": args.layer_hparam,
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "data": {
            r: {"eval": len(data[r]["eval"]), "train": len(data[r]["train"]), "eval_tokens": data[r]["eval_tokens"]}
            for r in regimes
        },
        "eval_source": "Python standard library docstrings (PSF)",
        "train_source": TRAIN_SOURCE_NAMES[args.train_source],
    }
    text = table(rows)
    print(text)
    write_report(out, conditions, rows, text)
    plot(rows, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
