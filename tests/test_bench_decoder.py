"""The pure helpers of `benchmarks/bench_decoder.py`: repeated spans, copy prompts, masks and scored perplexity."""

from __future__ import annotations

import math
import random

import pytest
import torch

from .benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_decoder")


@pytest.mark.parametrize("n", [200, 257, 384, 512])
def test_repeat_layout_keeps_its_constraints(bench, n):
    rng = random.Random(0)
    lengths = set()
    for _ in range(300):
        s, t, length = bench.repeat_layout(n, rng)
        assert 64 <= length <= 200 and s >= 8 and t - s >= 128 and t >= s + length and t + length <= n
        lengths.add(length)
    assert len(lengths) > 1 or n == 200  # 200 = 8 + 128 + 64: only the shortest span fits


def test_repeat_layout_none_when_nothing_fits(bench):
    assert bench.repeat_layout(199, random.Random(0)) is None  # 8 + 128 + 64 = 200 tokens needed
    ids = torch.arange(150)
    out, where = bench.with_repeat(ids, random.Random(0))
    assert where is None and torch.equal(out, ids)


def test_with_repeat_copies_the_span_only(bench):
    ids = torch.arange(1000, 1512)
    out, (s, t, length) = bench.with_repeat(ids, random.Random(3))
    assert torch.equal(ids, torch.arange(1000, 1512))  # input untouched
    expected = ids.tolist()
    expected[t : t + length] = expected[s : s + length]
    assert out.tolist() == expected


def test_copy_prompt_ends_with_a_far_cue(bench):
    ids = torch.arange(400)  # distinct tokens: the cue tells where its source is
    rng = random.Random(1)
    for _ in range(50):
        prompt, source = bench.copy_prompt(ids, rng, 320, cue=8, gap=128, new=32)
        s = int(prompt[-8])
        assert prompt.shape == (320,) and torch.equal(prompt[:312], ids[:312])
        assert torch.equal(prompt[-8:], torch.arange(s, s + 8)) and 8 <= s and 312 - s >= 128
        assert torch.equal(source, torch.arange(s + 8, s + 40))


def test_sliding_window_mask_matches_a_loop(bench):
    n, window, sinks = 12, 3, 2
    mask = bench.sliding_window_mask(n, window, sinks)[0, 0]
    for i in range(n):
        for j in range(n):
            assert bool(mask[i, j]) == (j <= i and (i - j < window or j < sinks))


def test_agreement_exact_and_prefix(bench):
    teacher = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]])
    student = torch.tensor([[1, 2, 3, 4], [1, 9, 3, 4]])
    assert bench.agreement(student, teacher) == pytest.approx({"exact": 0.5, "prefix": (1 + 0.25) / 2})


def test_perplexity_scores_the_chosen_targets(bench):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    docs = [torch.randint(0, 50, (30,)), torch.randint(0, 50, (20,))]
    targets = [(5, 12), (1, 20)]
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids, (lo, hi) in zip(docs, targets):
            logp = model(input_ids=ids[None]).logits[0].double().log_softmax(-1)
            nll -= sum(logp[k - 1, ids[k]].item() for k in range(lo, hi))
            count += hi - lo
    assert bench.perplexity(model, docs, targets=targets) == pytest.approx(math.exp(nll / count), rel=1e-5)
    full = bench.perplexity(model, docs)
    assert bench.perplexity(model, docs, window=64, sinks=0) == pytest.approx(full, rel=1e-5)
    assert bench.perplexity(model, docs, window=2, sinks=1) != pytest.approx(full, rel=1e-3)


def _tiny_llama(vocab: int = 50, layers: int = 1):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=None, eos_token_id=0, pad_token_id=0)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_score_top1_is_the_argmax_of_the_scored_positions(bench):
    model = _tiny_llama()
    docs = [torch.randint(0, 50, (30,)), torch.randint(0, 50, (20,))]
    targets = [(5, 12), (1, 20)]
    _, top1 = bench.score(model, docs, targets=targets)
    with torch.no_grad():
        for ids, (lo, hi), pred in zip(docs, targets, top1):
            logits = model(input_ids=ids[None]).logits[0].double()
            assert pred.tolist() == [int(logits[k - 1].argmax()) for k in range(lo, hi)]


def test_top1_agreement_counts_positions_over_all_docs(bench):
    predictions = [torch.tensor([1, 2, 3]), torch.tensor([4, 5])]
    reference = [torch.tensor([1, 0, 3]), torch.tensor([0, 0])]
    assert bench.top1_agreement(predictions, reference) == pytest.approx(2 / 5)


def test_first_difference(bench):
    teacher = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])
    student = torch.tensor([[1, 2, 3, 4], [1, 9, 3, 4], [0, 2, 3, 4]])
    assert bench.first_difference(student, teacher) == [4, 1, 0]


def test_greedy_window_matches_generate_and_a_truncated_context(bench):
    prompts = torch.randint(1, 50, (3, 20))
    deep = _tiny_llama(layers=2)  # a window wider than the sequence: plain greedy decoding
    assert torch.equal(bench.greedy_window(deep, prompts, 6, window=64, sinks=0), bench.greedy(deep, prompts, 6))
    # one layer, window w, no sinks: RoPE scores depend on relative positions only, so each next token is the one
    # predicted from the last w tokens alone (with more layers the receptive field grows beyond w)
    model, window, ids = _tiny_llama(layers=1), 5, prompts.clone()
    with torch.no_grad():
        for _ in range(6):
            logits = model(input_ids=ids[:, -window:]).logits[:, -1].double()
            ids = torch.cat([ids, logits.argmax(dim=-1, keepdim=True)], dim=1)
    assert torch.equal(bench.greedy_window(model, prompts, 6, window=window, sinks=0), ids[:, 20:])


@pytest.mark.parametrize("random_share", [0.0, 1.0])
def test_add_repeats_copies_spans_and_marks_the_predictable_tokens(bench, random_share):
    x = torch.arange(16 * 128).view(16, 128) + 5000  # distinct tokens, outside the random-span vocabulary
    original = x.clone()
    settings = {"recall_share": 1.0, "random_span_share": random_share, "vocab_size": 100}
    copies = bench.add_repeats(x, settings, random.Random(0), torch.Generator().manual_seed(0), **bench.SHORT_LAYOUT)
    for row in range(16):
        (changed,) = torch.nonzero(x[row] != original[row], as_tuple=True)
        marked = torch.nonzero(copies[row]).flatten()
        t, end = int(marked[0]) - 1, int(marked[-1]) + 1  # the copy's first token is not marked
        length = end - t
        assert 16 <= length <= 48 and torch.equal(marked, torch.arange(t + 1, end))
        s = int(torch.nonzero((x[row] == x[row, t]) & (torch.arange(128) < t))[0]) if random_share else None
        if random_share:  # the source was overwritten as well, by tokens < 100
            assert (x[row, t:end] < 100).all() and torch.equal(x[row, s : s + length], x[row, t:end]) and t - s >= 32
        else:  # only the copy changed, into the text of an earlier span
            assert changed.min() >= t and changed.max() < end
            s = int(x[row, t]) - 5000 - 128 * row
            assert torch.equal(x[row, t:end], original[row, s : s + length]) and t - s >= 32
    none = bench.add_repeats(original.clone(), {**settings, "recall_share": 0.0}, random.Random(0), None)
    assert not none.any()


def test_teacher_cache_key_of_the_v3_teacher_is_unchanged(bench):
    import argparse
    import hashlib
    import json

    v3 = argparse.Namespace(train_chars=4_000_000, teacher_steps=400, recall_share=0.75, teacher_layers=4,
                            random_span_share=0.5, short_steps=0, teacher_lr=3e-3)  # fmt: skip
    settings = bench.teacher_settings(v3)
    assert "short_steps" not in settings  # new options enter the key only when used
    assert hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16] == "f99013bd203bd7d5"


def _tiny_gqa_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def test_greedy_window_cached_equals_full_forwards(bench):
    model = _tiny_gqa_llama()
    prompts = torch.randint(0, 64, (3, 40), generator=torch.Generator().manual_seed(1))
    for window, sinks in [(8, 2), (16, 0), (64, 4)]:
        expected = bench.greedy_window(model, prompts, 12, window, sinks)  # one full masked forward per token
        got = bench.greedy_window_cached(model, prompts, 12, window, sinks)
        assert torch.equal(got, expected)
    assert torch.equal(bench.greedy_window_cached(model, prompts, 12, 64, 4), bench.greedy(model, prompts, 12))


def test_method_hparams_gives_eva_sinks_for_smollm2_only(bench):
    assert "sink_tokens" not in bench.method_hparams("eva", "trained")
    assert bench.method_hparams("eva", "smollm2")["sink_tokens"] == bench.SINKS
    assert bench.method_hparams("rfa", "smollm2") == bench.METHODS["rfa"]
    assert "sink_tokens" not in bench.METHODS["eva"]  # the table is not mutated


def test_method_hparams_takes_typed_overrides(bench):
    """`METHOD:KEY=VALUE` overrides the table (typed as the estimator declares), e.g. block-aligned causal EVA."""
    hparams = bench.method_hparams("eva:local_windows=1:chunk_size=8", "smollm2")
    assert hparams == {**bench.METHODS["eva"], "sink_tokens": bench.SINKS, "local_windows": 1, "chunk_size": 8}
    assert bench.method_hparams("eva", "smollm2")["local_windows"] == 2
    with pytest.raises(ValueError, match="Unknown hyper-parameter 'local_window'"):
        bench.method_hparams("eva:local_window=1", "smollm2")


def test_keep_softmax_is_a_variant_item_not_a_hyper_parameter(bench):
    method = "eva:keep_softmax=2:local_windows=1"
    assert bench.keep_softmax_of(method) == 2
    assert bench.keep_softmax_of("eva:local_windows=1") == 0
    assert bench.method_hparams(method, "smollm2") == bench.method_hparams("eva:local_windows=1", "smollm2")
    with pytest.raises(ValueError, match="keep_softmax` takes a number of layers"):
        bench.keep_softmax_of("eva:keep_softmax=two")


def test_doc_range_parses_and_rejects(bench):
    import argparse

    assert bench.doc_range("512,640") == (512, 640)
    for bad in ("640,512", "0,5", "512", "a,b"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.doc_range(bad)


def test_conditions_note_names_the_command_and_load(bench):
    conditions = {
        "command": "python benchmarks/bench_decoder.py --teacher smollm2",
        "torch_threads": 1,
        "cpu_count": 2,
        "load_average": {"start": [2.4, 3.0, 4.0], "end": None},
        "wall_minutes": 10.9,
        "cpu_minutes": 9.0,
        "eval_docs": 12,
        "eval_tokens": {"min": 526, "median": 608, "max": 625},
        "keys_outside_window_at_last_position": {"min": 1 - 64 / 526, "median": 1 - 64 / 608},
        "repeat_docs": 12,
        "repeat_scored_tokens": {"min": 72, "max": 182, "total": 1600},
    }
    note = bench.conditions_note(conditions)
    assert "`python benchmarks/bench_decoder.py --teacher smollm2`" in note
    assert "load average 2.4 at the start, nan at the end" in note and "88 %+" in note and "1600 scored" in note
