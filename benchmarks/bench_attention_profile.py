"""Where the teacher's attention goes: how much of each layer's softmax mass falls outside the exact local window
and how concentrated that far mass is, for all-MiniLM-L6-v2 on the held-out texts of `bench_fidelity.py`.

A linear estimator (random or learned features, EVA's chunk summaries) stands in for the keys outside the window;
what it can reproduce depends on how that far mass is spread. Per layer, averaged over the real query tokens of
every head and text:

* far mass: the share of a query's softmax weight on keys outside its window and its sink tokens (the geometry of
  `hf_lara.attention.window`: the `W` positions nearest the query, the first and last `G` real tokens);
* far keys (participation ratio): `1 / sum_j p_j^2` of the far weights renormalised to sum to 1, the number of far
  keys the mass is effectively spread over (1 = one key holds it all);
* top-8 share: the share of the far mass on the query's 8 heaviest far keys.

    python benchmarks/bench_attention_profile.py --regimes long,short
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_fidelity import REGIMES, evaluation_texts  # noqa: E402
from report import write_report  # noqa: E402

from hf_lara.attention.window import sink_positions, window_bounds  # noqa: E402
from hf_lara.demo import minilm_path  # noqa: E402
from hf_lara.fidelity import encode_texts  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def near_mask(attention_mask: torch.Tensor, window: int, sinks: int) -> torch.Tensor:
    """`(B, N, N)` bool: key `j` is in query `i`'s bidirectional window or is a sink (padding is never near)."""
    B, N = attention_mask.shape
    positions = torch.arange(N)
    lo = window_bounds(positions, attention_mask, N, window, causal=False)  # (B, N)
    in_window = (positions[None, None, :] >= lo[..., None]) & (positions[None, None, :] < lo[..., None] + window)
    sink_pos, sink_ok = sink_positions(attention_mask, B, N, sinks, causal=False, device=attention_mask.device)
    is_sink = ((positions[None, None, :] == sink_pos[..., None]) & sink_ok[..., None]).any(1)  # (B, N)
    return (in_window | is_sink[:, None, :]) & attention_mask[:, None, :]


def layer_profile(probs: torch.Tensor, near: torch.Tensor, query_real: torch.Tensor, top: int) -> dict[str, float]:
    """Far mass, participation ratio and top-`top` share of one layer's softmax `probs` `(B, H, N, N)`, averaged
    over the heads and the real queries (`query_real` `(B, N)`)."""
    far = probs.masked_fill(near[:, None], 0.0)
    far_mass = far.sum(-1)  # (B, H, N)
    share = far / far_mass.clamp_min(1e-30)[..., None]
    participation = 1.0 / share.square().sum(-1).clamp_min(1e-30)
    top_share = share.topk(min(top, share.shape[-1]), dim=-1).values.sum(-1)
    weight = query_real[:, None, :].expand_as(far_mass).float()
    has_far = weight * (far_mass > 0)

    def mean(x: torch.Tensor, w: torch.Tensor) -> float:
        return ((x * w).sum() / w.sum().clamp_min(1)).item()

    return {
        "far_mass": mean(far_mass, weight),
        "far_keys": mean(participation, has_far),
        "top_share": mean(top_share, has_far),
    }


def profile(model, batches: list[dict], window: int, sinks: int, top: int) -> list[dict[str, float]]:
    """Per-layer profile over `batches`, each text weighted by its real query tokens."""
    totals: list[dict[str, float]] = []
    weights = 0.0
    for batch in batches:
        mask = batch["attention_mask"].bool()
        with torch.no_grad():
            attentions = model(**batch, output_attentions=True).attentions
        near = near_mask(mask, window, sinks)
        tokens = mask.sum().item()
        for i, probs in enumerate(attentions):
            layer = layer_profile(probs.float(), near, mask, top)
            if len(totals) <= i:
                totals.append(dict.fromkeys(layer, 0.0))
            for key, value in layer.items():
                totals[i][key] += value * tokens
        weights += tokens
    return [{key: value / weights for key, value in layer.items()} for layer in totals]


def table(rows: list[dict]) -> str:
    lines = [
        "| texts | window / sinks | layer | far mass | far keys (participation ratio) | top-8 share of far mass |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        for layer, p in enumerate(row["layers"]):
            lines.append(
                f"| {row['regime']} | {row['window']} / {row['sinks']} | {layer} | {p['far_mass']:.3f} | "
                f"{p['far_keys']:.1f} | {p['top_share']:.3f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--regimes", default="long,short")
    parser.add_argument("--sink_tokens", type=int, default=4)
    parser.add_argument("--num_eval", type=int, default=64)
    parser.add_argument("--top", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=str(RESULTS / "attention_profile"))
    args = parser.parse_args(argv)
    regimes = [r for r in args.regimes.split(",") if r]
    unknown = sorted(set(regimes) - set(REGIMES))
    if unknown:
        parser.error(f"unknown regimes {unknown}; choose from {sorted(REGIMES)}")
    torch.set_num_threads(args.threads)

    from transformers import AutoModel, AutoTokenizer

    path = str(minilm_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    rows = []
    for regime in regimes:
        _, max_length, window = REGIMES[regime]
        tokenizer.model_max_length = 10**6
        texts = evaluation_texts(tokenizer, regime, args.num_eval)
        batches = encode_texts(tokenizer, texts, batch_size=8, max_length=max_length)
        layers = profile(model, batches, window, args.sink_tokens, args.top)
        rows.append({"regime": regime, "window": window, "sinks": args.sink_tokens, "layers": layers})
    text = table(rows)
    print(text)
    conditions = {"model": "all-MiniLM-L6-v2", "texts": "bench_fidelity.py evaluation texts", "top": args.top}
    conditions["platform"] = platform.platform()
    write_report(args.output, conditions, rows, text)


if __name__ == "__main__":
    main()
