"""Stage-2 variants of `hf_lara.distill` at a fixed step count, from one shared stage-1 result.

Same model, data, conversion and metrics as `bench_fidelity.py` (eva, window 64, 4 sink tokens, documents of
256-512 tokens, 300 training documents, 64 held-out evaluation documents; one thread). Stage 1 runs once for STEPS
steps; every variant then starts from a copy of that model, runs stage 2 for STEPS steps with its `DistillConfig`
options and is measured on three sets: the evaluation documents ("eval": cosine, top-1/top-5 NN agreement,
attention error), the first 64 training documents ("train": cosine, top-1/top-5; seen in training) and 64 further
documents of the training source that no stage sees ("unseen": the next 64 distinct ones in the same file order). Unseen
close to train means the held-out gap is the distance between the sources (domain); unseen close to eval means the
adapters fit the documents they saw (over-fitting). `--train_source` picks the training texts (see
`fidelity_texts.TRAIN_SOURCES`); "unseen" always comes from the default source, so that set stays the same across
sources. One JSON line per variant is appended to OUT (`fidelity_tuning.md`, `fidelity_domain.md` list results).

    python benchmarks/bench_fidelity_sweep.py 150 out.jsonl '{"name": "baseline"}' '{"layer_weight": 0.0}'
    python benchmarks/bench_fidelity_sweep.py 150 out.jsonl --train_source broad '{"name": "broad"}'
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_fidelity as bf  # noqa: E402
from fidelity_texts import TRAIN_SOURCES, documents, training_files  # noqa: E402

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
    num_unseen = 64
    train_source = "default"


def light(st, reference: torch.Tensor, texts: list[str]) -> dict:
    """Cosine and top-1/top-5 NN agreement only (no per-layer attention error)."""
    emb = bf.embed(st, texts, 512)
    r1, r5, o1, o5 = (bf.neighbours(x, k) for x, k in ((reference, 1), (reference, 5), (emb, 1), (emb, 5)))
    overlap = [len(set(a.tolist()) & set(b.tolist())) / 5 for a, b in zip(o5, r5, strict=True)]
    return {
        "cosine": (emb * reference).sum(-1).mean().item(),
        "top1": (o1 == r1).float().mean().item(),
        "top5": sum(overlap) / len(overlap),
        "similarity_error": bf.similarity_error(emb, reference),
    }


def unseen_documents(tokenizer, train: list[str]) -> list[str]:
    """`Sizes.num_unseen` documents of the default training source that follow the first `len(train)` ones.

    `documents` walks one seeded file order and stops at `count`, so a larger `count` extends the same list; the
    documents past the training prefix are never trained on. A few source files repeat another's docstrings (torch
    keeps deprecated copies of modules), so documents equal to a training one are skipped. Shapes:
    `len(result) == Sizes.num_unseen`.
    """
    (low, high), _, _ = bf.REGIMES["long"]
    tokenizer.model_max_length = 10**6
    count = len(train) + 2 * Sizes.num_unseen
    more = documents(training_files(), tokenizer, low, high, count, seed=1)
    tokenizer.model_max_length = 512
    seen, unseen = set(train), []
    for doc in more[len(train) :]:
        if doc not in seen:
            unseen.append(doc)
            seen.add(doc)
    if len(unseen) < Sizes.num_unseen:
        raise RuntimeError(f"expected {Sizes.num_unseen} unseen documents, found {len(unseen)}")
    return unseen[: Sizes.num_unseen]


def main(steps: int, out: Path, variants: list[dict], train_source: str = "default") -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = bf.minilm()
    data = bf.build_data(base.tokenizer, Sizes)
    ev, tr = data["long"]["eval"], data["long"]["train"]
    un = unseen_documents(base.tokenizer, tr)
    if train_source != "default":
        (low, high), _, _ = bf.REGIMES["long"]
        base.tokenizer.model_max_length = 10**6
        tr_new = TRAIN_SOURCES[train_source](base.tokenizer, low, high, Sizes.num_train["long"], 1)
        base.tokenizer.model_max_length = 512
        # the broad source includes the default packages: a document that is also an unseen one is dropped
        excluded = set(ev) | set(un)
        tr = [d for d in tr_new if d not in excluded]
        print(f"{train_source}: {len(tr_new)} documents, {len(tr_new) - len(tr)} dropped (in eval/unseen)", flush=True)
    ref_ev, ref_tr, ref_un = (bf.embed(base, t, 512) for t in (ev, tr[:64], un))
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
            "unseen": light(st, ref_un, un),
            "train_source": train_source,
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
            "unseen": light(sv, ref_un, un),
            "train_source": train_source,
        }
        write(out, row)


def write(out: Path, row: dict) -> None:
    print(json.dumps(row), flush=True)
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("steps", type=int, help="optimizer steps of stage 1 and of each stage-2 variant")
    parser.add_argument("out", type=Path, help="JSON-lines file the rows are appended to")
    parser.add_argument("variants", nargs="*", help="JSON objects of DistillConfig options, e.g. '{\"lora_rank\": 8}'")
    parser.add_argument("--train_source", default="default", choices=sorted(TRAIN_SOURCES))
    args = parser.parse_intermixed_args()
    main(args.steps, args.out, [json.loads(v) for v in args.variants] or [{}], args.train_source)
