"""Stage-2 variants of `hf_lara.distill` at a fixed step count, from one shared stage-1 result.

Same model, data, conversion and metrics as `bench_fidelity.py` (eva, window 64, 4 sink tokens, documents of
256-512 tokens, 300 training documents, 64 held-out evaluation documents; one thread). Stage 1 runs once for STEPS
steps; every variant then starts from a copy of that model, runs stage 2 for STEPS steps with its `DistillConfig`
options and is measured on the evaluation documents (cosine, top-1/top-5 NN agreement, attention error) and on the
first 64 training documents (cosine, top-1/top-5; seen in training), which tells under-fitting from a domain gap.
One JSON line per variant is appended to OUT (`fidelity_tuning.md` lists the results).

    python benchmarks/bench_fidelity_sweep.py 150 out.jsonl '{"name": "baseline"}' '{"layer_weight": 0.0}'
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_fidelity as bf  # noqa: E402

import hf_lara  # noqa: E402
from hf_lara.distill import (  # noqa: E402
    DistillConfig,
    attention_transfer,
    end_to_end,
    length_batches,
    sentence_transformers_pooler,
)


class Sizes:
    """The `args` fields `bench_fidelity.build_data` reads."""

    num_eval = 64
    num_train = {"long": 300, "short": 10}


def light(st, reference: torch.Tensor, texts: list[str]) -> dict:
    """Cosine and top-1/top-5 NN agreement only (no per-layer attention error)."""
    emb = bf.embed(st, texts, 512)
    r1, r5, o1, o5 = (bf.neighbours(x, k) for x, k in ((reference, 1), (reference, 5), (emb, 1), (emb, 5)))
    overlap = [len(set(a.tolist()) & set(b.tolist())) / 5 for a, b in zip(o5, r5, strict=True)]
    return {
        "cosine": (emb * reference).sum(-1).mean().item(),
        "top1": (o1 == r1).float().mean().item(),
        "top5": sum(overlap) / len(overlap),
    }


def main(steps: int, out: Path, variants: list[dict]) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = bf.minilm()
    data = bf.build_data(base.tokenizer, Sizes)
    ev, tr = data["long"]["eval"], data["long"]["train"]
    ref_ev, ref_tr = bf.embed(base, ev, 512), bf.embed(base, tr[:64], 512)
    st = copy.deepcopy(base)
    st.max_seq_length = 512
    hf_lara.convert(st[0].auto_model, "eva", **{**bf.METHODS["eva"](64), "sink_tokens": 4})
    batches = length_batches(st.tokenizer, tr, max_length=512, batch_tokens=DistillConfig.batch_tokens)
    config = DistillConfig(max_minutes=120, max_length=512, progress=False, max_steps=steps)
    s1 = attention_transfer(st[0].auto_model, batches, config, 3600)
    rows = [
        {
            "variant": "stage1",
            "steps": s1["steps"],
            "cpu_minutes": s1["cpu_minutes"],
            "eval": bf.compare(st, ref_ev, ev, 512),
            "train": light(st, ref_tr, tr[:64]),
        }
    ]
    write(out, rows[-1])
    for options in variants:
        name = options.pop("name", None) or ",".join(f"{k}={v}" for k, v in options.items()) or "baseline"
        sv = copy.deepcopy(st)
        config = DistillConfig(max_minutes=120, max_length=512, progress=False, max_steps=steps, **options)
        start = time.time()
        _, s2 = end_to_end(sv[0].auto_model, batches, config, 3600, sentence_transformers_pooler(sv))
        row = {
            "variant": name,
            "steps": s2["steps"],
            "cpu_minutes": s2["cpu_minutes"],
            "wall_minutes": (time.time() - start) / 60,
            "loss_first": s2["loss_first"],
            "loss_last": s2["loss_last"],
            "eval": bf.compare(sv, ref_ev, ev, 512),
            "train": light(sv, ref_tr, tr[:64]),
        }
        write(out, row)


def write(out: Path, row: dict) -> None:
    print(json.dumps(row), flush=True)
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]), [json.loads(v) for v in sys.argv[3:]])
