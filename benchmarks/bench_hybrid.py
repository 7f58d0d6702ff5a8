"""What the converted layers cost a whole encoder on long inputs: all-linear, per-layer budget, hybrid.

An all-MiniLM-L6-v2-shaped `BertModel` (6 layers, hidden 384, 12 heads of 32, random weights, positions up to the
longest N) runs one forward pass of a batch of one sequence, without autograd, for each configuration:

* `sdpa`: the original model (Transformers' SDPA attention, quadratic in N);
* every `--configs` entry `NAME=JSON`: `hf_lara.convert` keyword arguments, e.g.
  `eva128={"method": "eva", "window_size": 64, "num_chunks": 128, "sink_tokens": 4}`; `"layers": [0, 1, 2, 3, 4]`
  leaves layer 5 on softmax (a hybrid), `"layer_hparams": {"5": {...}}` gives layer 5 its own budget.

Each configuration is timed `--reps` times (best call, one warm-up call first); the table gives seconds and the
speed-up over `sdpa` at each length. Run it with nothing else on the CPUs.

    python benchmarks/bench_hybrid.py --lengths 512 4096 16384 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import transformers

import hf_lara

RESULTS = Path(__file__).resolve().parent / "results"
MINILM_SHAPE = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
EVA = {"method": "eva", "window_size": 64, "num_chunks": 128, "sink_tokens": 4}
KERNEL = {"method": "kernel", "feature_map": "hedgehog", "window_size": 64, "sink_tokens": 4}
FIRST_FIVE = [0, 1, 2, 3, 4]
# the configurations of the fidelity table in the README (bench_fidelity.py, documents)
DEFAULT_CONFIGS = [
    f"eva 128 chunks={json.dumps(EVA)}",
    f"eva 128 chunks, layer 5: 256={json.dumps({**EVA, 'layer_hparams': {'5': {'num_chunks': 256}}})}",
    f"eva 128 chunks, layer 5 softmax={json.dumps({**EVA, 'layers': FIRST_FIVE})}",
    f"kernel={json.dumps(KERNEL)}",
    f"kernel, layer 5: 128 features={json.dumps({**KERNEL, 'layer_hparams': {'5': {'num_features': 128}}})}",
    f"kernel, layer 5 softmax={json.dumps({**KERNEL, 'layers': FIRST_FIVE})}",
]


def build(config_kwargs: dict, max_length: int) -> torch.nn.Module:
    """A random MiniLM-shaped encoder, converted with `config_kwargs` (None: left on SDPA)."""
    torch.manual_seed(0)
    config = transformers.BertConfig(**MINILM_SHAPE, max_position_embeddings=max_length, attn_implementation="sdpa")
    model = transformers.BertModel(config).eval()
    if config_kwargs is not None:
        kwargs = dict(config_kwargs)
        hf_lara.convert(model, kwargs.pop("method"), **kwargs)
    return model


def best_seconds(model: torch.nn.Module, ids: torch.Tensor, reps: int) -> float:
    with torch.no_grad():
        model(input_ids=ids)  # warm-up
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            model(input_ids=ids)
            times.append(time.perf_counter() - start)
    return min(times)


def parse_configs(items: list[str]) -> dict[str, dict | None]:
    configs: dict[str, dict | None] = {"sdpa": None}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep:
            raise SystemExit(f"--configs takes NAME=JSON, got {item!r}")
        configs[name] = json.loads(text)
    return configs


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 4096, 16384])
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, metavar="NAME=JSON")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=str(RESULTS / "hybrid_cost"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    configs = parse_configs(args.configs)
    rows = []
    for N in args.lengths:
        ids = torch.randint(1000, 20000, (1, N), generator=torch.Generator().manual_seed(N))
        for name, kwargs in configs.items():
            seconds = best_seconds(build(kwargs, max(args.lengths)), ids, args.reps)
            rows.append({"config": name, "N": N, "seconds": seconds})
            print(f"N={N:6d} {name:40s} {seconds:8.3f} s", flush=True)
    lines = table(rows, list(configs), args.lengths)
    print("\n".join(lines))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"threads": args.threads, "reps": args.reps, "torch": torch.__version__, "load": os.getloadavg()}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "configs": configs, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return rows


def table(rows: list[dict], names: list[str], lengths: list[int]) -> list[str]:
    seconds = {(r["config"], r["N"]): r["seconds"] for r in rows}
    lines = [
        "| configuration | " + " | ".join(f"N = {N}: s (speed-up vs sdpa)" for N in lengths) + " |",
        "|---|" + "---|" * len(lengths),
    ]
    for name in names:
        cells = [f"{seconds[name, N]:.3f} ({seconds['sdpa', N] / seconds[name, N]:.2f}x)" for N in lengths]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    sys.exit(main() and 0)
