"""Constant-memory decoding with `LaraCache`: recurrent layers keep a `LinearState`, the others a KV cache.

Every call uses the cache keyword of the installed Transformers (`compat.CACHE_KWARG`): a FutureWarning is an error.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import DynamicLayer

import hf_lara
from hf_lara.attention.eva import EVAState
from hf_lara.attention.linear import LinearState
from hf_lara.attention.window import WindowState
from hf_lara.integration.cache import LaraStateLayer
from hf_lara.integration.compat import CACHE_KWARG, output_cache

from .test_generation import left_padded
from .utils import SETUPS, assert_close, load_converted, make_inputs

RECURRENT = ["rfa", "kernel", "lara"]
FAMILIES = ["llama", "gpt2"]  # the tiny Llama uses grouped-query attention (4 query heads, 2 KV heads)
PROMPT_LENGTHS = [7, 4, 6]
NEW_TOKENS = 5
pytestmark = pytest.mark.filterwarnings("error::FutureWarning")


def greedy(model, ids: torch.Tensor, mask: torch.Tensor, **kwargs):
    """Greedy (or beam) `generate`: new tokens `(B, NEW_TOKENS)`, logits `(B, NEW_TOKENS, V)` and the cache."""
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
            do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True, **kwargs,
        )  # fmt: skip
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits, dim=1), output_cache(out)


def prompts(family: str) -> list[torch.Tensor]:
    return [make_inputs(SETUPS[family], 1, n, seed=i)["input_ids"][0] for i, n in enumerate(PROMPT_LENGTHS)]


def held_bytes(cache) -> int:
    """Bytes of every tensor the cache's layers hold, found by walking their attributes (states included)."""
    total = 0
    for layer in cache.layers:
        for value in vars(layer).values():
            tensors = [value.kvz, value.shift] if isinstance(value, LinearState) else [value]
            total += sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
    return total


@pytest.fixture(scope="module")
def models(base_checkpoints):
    cache: dict[tuple, torch.nn.Module] = {}

    def get(family: str, method: str, layers=None):
        key = (family, method, None if layers is None else tuple(layers))
        if key not in cache:
            cache[key] = load_converted(SETUPS[family], base_checkpoints[family], method, layers=layers)
        return cache[key]

    return get


@pytest.mark.parametrize("method", RECURRENT)
@pytest.mark.parametrize("family", FAMILIES)
def test_state_generate_equals_each_prompt_alone_and_the_kv_path(family, method, models):
    model = models(family, method)
    batch = prompts(family)
    ids, mask = left_padded(batch, pad=0)
    tokens, logits, cache = greedy(model, ids, mask)
    assert isinstance(cache, hf_lara.LaraCache)
    assert all(isinstance(layer, LaraStateLayer) for layer in cache.layers)
    assert cache.get_seq_length() == ids.shape[1] + NEW_TOKENS - 1
    kv_tokens, kv_logits, kv_cache = greedy(model, ids, mask, cache_implementation="dynamic")
    assert type(kv_cache) is DynamicCache
    assert torch.equal(tokens, kv_tokens)
    assert_close(logits, kv_logits, msg="state vs KV logits")
    for row, prompt in enumerate(batch):
        alone_tokens, alone_logits, _ = greedy(model, prompt[None], torch.ones(1, len(prompt), dtype=torch.long))
        assert torch.equal(tokens[row], alone_tokens[0]), f"prompt {row}"
        assert_close(logits[row], alone_logits[0], atol=2e-5, rtol=1e-4, msg=f"prompt {row} logits")


@pytest.mark.parametrize("method", RECURRENT)
@pytest.mark.parametrize("family", FAMILIES)
def test_manual_prefill_and_steps_equal_the_full_forward(family, method, models):
    """`use_cache=True` without a cache gets a `LaraCache`; prefill + one token at a time equals one forward."""
    model = models(family, method)
    ids, mask = left_padded([make_inputs(SETUPS[family], 1, n, seed=n)["input_ids"][0] for n in (13, 9)], pad=0)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    prefill = ids.shape[1] - 5
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        out = model(input_ids=ids[:, :prefill], attention_mask=mask[:, :prefill], position_ids=positions[:, :prefill],
                    use_cache=True)  # fmt: skip
        cache, logits = output_cache(out), [out.logits]
        assert isinstance(cache, hf_lara.LaraCache)
        for t in range(prefill, ids.shape[1]):
            out = model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1],
                        position_ids=positions[:, t : t + 1], use_cache=True, **{CACHE_KWARG: cache})  # fmt: skip
            logits.append(out.logits)
    stepped = torch.cat(logits, dim=1)
    assert_close(stepped * mask[..., None], full * mask[..., None], msg="state decoding vs full forward")


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_memory_does_not_grow_with_decoded_tokens(family, models):
    model = models(family, "rfa")
    ids = make_inputs(SETUPS[family], 2, 6)["input_ids"]
    cache = hf_lara.LaraCache(model)
    sizes = []
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, **{CACHE_KWARG: cache})
        for _ in range(20):
            sizes.append(held_bytes(cache))
            out = model(input_ids=out.logits[:, -1:].argmax(-1), use_cache=True, **{CACHE_KWARG: cache})
    assert cache.get_seq_length() == ids.shape[1] + 20
    assert len(set(sizes)) == 1 and sizes[0] == cache.nbytes() > 0
    # B * H * S * (D + 2) fp32 numbers per layer, S = 16 features, D = 8
    assert sizes[0] == len(cache.layers) * 2 * 4 * 16 * (8 + 2) * 4


@pytest.mark.parametrize("family", FAMILIES)
def test_beam_search_matches_the_kv_path(family, models):
    model = models(family, "rfa")
    ids, mask = left_padded(prompts(family)[:2], pad=0)
    tokens, _, cache = greedy(model, ids, mask, num_beams=2)
    kv_tokens, _, _ = greedy(model, ids, mask, num_beams=2, cache_implementation="dynamic")
    assert isinstance(cache, hf_lara.LaraCache)
    assert torch.equal(tokens, kv_tokens)


def _feed(model, cache, new: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed tokens `new` `(B, n)` one by one after `mask` `(B, seen)`: last-position logits `(B, n, V)`, new mask."""
    logits = []
    for i in range(new.shape[1]):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(input_ids=new[:, i : i + 1], attention_mask=mask, use_cache=True, **{CACHE_KWARG: cache})
        logits.append(out.logits[:, -1])
    return torch.stack(logits, dim=1), mask


@pytest.mark.parametrize("family", FAMILIES)
def test_window_hybrid_beam_search_and_kept_states(family, base_checkpoints):
    """Window hybrid: beam search reorders `WindowState`s whose buffers are in mid-use as the KV path reorders
    keys; states kept from mid-decoding and put back after another continuation ran on them continue exactly as
    a run that never branched (a step never writes the buffer rows an earlier state sees)."""
    model = load_converted(SETUPS[family], base_checkpoints[family], "rfa", window_size=3, sink_tokens=1)
    ids, mask = left_padded(prompts(family)[:2], pad=0)
    tokens, _, cache = greedy(model, ids, mask, num_beams=2)
    kv_tokens, _, _ = greedy(model, ids, mask, num_beams=2, cache_implementation="dynamic")
    assert isinstance(cache, hf_lara.LaraCache) and torch.equal(tokens, kv_tokens)
    with torch.no_grad():
        reference = hf_lara.LaraCache(model)
        model(input_ids=ids, attention_mask=mask, use_cache=True, **{CACHE_KWARG: reference})
        want, _ = _feed(model, reference, tokens, mask)
        cache = hf_lara.LaraCache(model)
        model(input_ids=ids, attention_mask=mask, use_cache=True, **{CACHE_KWARG: cache})
        first, after = _feed(model, cache, tokens[:, :2], mask)
        kept = [(layer.state, layer.seen) for layer in cache.layers]
        _feed(model, cache, tokens[:, [4, 3, 2]], after)  # another continuation from the same states
        for layer, (state, seen) in zip(cache.layers, kept, strict=True):
            layer.state, layer.seen = state, seen
        rest, _ = _feed(model, cache, tokens[:, 2:], after)
    assert_close(torch.cat([first, rest], dim=1), want, msg="kept states vs an unbranched run")


@pytest.mark.parametrize("family", FAMILIES)
def test_hybrid_model_keeps_kv_for_the_softmax_layer(family, models):
    model = models(family, "kernel", layers=[0])
    batch = prompts(family)
    ids, mask = left_padded(batch, pad=0)
    tokens, logits, cache = greedy(model, ids, mask)
    state, kv = cache.layers
    assert isinstance(state, LaraStateLayer) and type(kv) is DynamicLayer
    assert kv.keys.shape[2] == cache.get_seq_length() == state.seen
    kv_tokens, kv_logits, _ = greedy(model, ids, mask, cache_implementation="dynamic")
    assert torch.equal(tokens, kv_tokens)
    assert_close(logits, kv_logits)
    for row, prompt in enumerate(batch):
        alone_tokens, _, _ = greedy(model, prompt[None], torch.ones(1, len(prompt), dtype=torch.long))
        assert torch.equal(tokens[row], alone_tokens[0]), f"prompt {row}"


@pytest.mark.parametrize("method", ["ra", "softmax"])
def test_methods_without_recurrence_keep_the_kv_cache(method, models):
    model = models("llama", method)
    batch = prompts("llama")
    ids, mask = left_padded(batch, pad=0)
    tokens, _, cache = greedy(model, ids, mask)
    assert type(cache) is DynamicCache
    for row, prompt in enumerate(batch):
        alone_tokens, _, _ = greedy(model, prompt[None], torch.ones(1, len(prompt), dtype=torch.long))
        assert torch.equal(tokens[row], alone_tokens[0]), f"prompt {row}"
    # an explicit LaraCache has no state layer for them: plain KV decoding
    assert not any(isinstance(layer, LaraStateLayer) for layer in hf_lara.LaraCache(model).layers)


def test_user_dynamic_cache_keeps_the_kv_path(models):
    model = models("llama", "rfa")
    ids, mask = left_padded(prompts("llama"), pad=0)
    tokens, _, _ = greedy(model, ids, mask)
    user_cache = DynamicCache(config=model.config)
    kv_tokens, _, cache = greedy(model, ids, mask, **{CACHE_KWARG: user_cache})
    assert cache is user_cache and cache.layers[0].keys.shape[2] == cache.get_seq_length()
    assert torch.equal(tokens, kv_tokens)


@pytest.mark.parametrize("method", RECURRENT)
def test_explicit_lara_cache_as_in_its_docstring_equals_the_full_forward(method, models):
    """Create a `LaraCache`, prefill, then step: the states fill and the logits equal one full forward."""
    model = models("llama", method)
    ids = make_inputs(SETUPS["llama"], 2, 11, seed=3)["input_ids"]
    with torch.no_grad():
        full = model(input_ids=ids).logits
        cache = hf_lara.LaraCache(model)
        logits = [model(input_ids=ids[:, :7], use_cache=True, **{CACHE_KWARG: cache}).logits]
        assert all(layer.state is not None and layer.seen == 7 for layer in cache.layers)
        for t in range(7, ids.shape[1]):
            logits.append(model(input_ids=ids[:, t : t + 1], use_cache=True, **{CACHE_KWARG: cache}).logits)
    assert_close(torch.cat(logits, dim=1), full, msg="explicit LaraCache vs full forward")


@pytest.mark.parametrize("layers", [None, [0], []], ids=["all", "hybrid", "none"])
def test_static_cache_is_refused(layers, models):
    """Preallocated key slots cannot be masked by the estimators (nor offset by the fallback): a clear error."""
    model = models("llama", "rfa", layers=layers)
    ids, mask = left_padded(prompts("llama")[:2], pad=0)
    with pytest.raises(
        NotImplementedError, match=r"dynamic cache, got a `StaticCache`.*cache_implementation='dynamic'"
    ):
        greedy(model, ids, mask, cache_implementation="static")
    cache = StaticCache(config=model.config, max_cache_len=32)
    with pytest.raises(NotImplementedError, match="StaticLayer"), torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=True, **{CACHE_KWARG: cache})


@pytest.mark.parametrize("method", RECURRENT)
@pytest.mark.parametrize("family", FAMILIES)
def test_window_hybrid_generates_with_its_state_as_with_the_kv_path(family, method, base_checkpoints):
    """`window_size` + `sink_tokens`: `generate()` keeps a constant-size `WindowState` and agrees with the KV path
    (which re-runs the full windowed estimator over every cached key) and with each prompt run alone."""
    model = load_converted(SETUPS[family], base_checkpoints[family], method, window_size=3, sink_tokens=1)
    batch = prompts(family)
    ids, mask = left_padded(batch, pad=0)
    tokens, logits, cache = greedy(model, ids, mask)
    assert isinstance(cache, hf_lara.LaraCache)
    assert all(isinstance(layer.state, WindowState) for layer in cache.layers)
    kv_tokens, kv_logits, _ = greedy(model, ids, mask, cache_implementation="dynamic")
    assert torch.equal(tokens, kv_tokens)
    assert_close(logits, kv_logits, msg="window state vs KV logits")
    for row, prompt in enumerate(batch):
        alone_tokens, _, _ = greedy(model, prompt[None], torch.ones(1, len(prompt), dtype=torch.long))
        assert torch.equal(tokens[row], alone_tokens[0]), f"prompt {row}"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sinks", [0, 3], ids=["no-sinks", "3-sinks"])
def test_eva_generates_from_its_summaries_as_with_the_kv_path(family, sinks, base_checkpoints):
    """Causal EVA (windows of 4, chunks of 2, so prompts and new tokens close windows; optionally 3 sink tokens)
    decodes with an `EVAState`: `generate()` agrees with the KV path (the full estimator over every cached key) and
    with each prompt alone, and prefill + one token at a time equals one left-padded full forward."""
    model = load_converted(
        SETUPS[family], base_checkpoints[family], "eva", window_size=4, chunk_size=2, sink_tokens=sinks
    )
    batch = prompts(family)
    ids, mask = left_padded(batch, pad=0)
    tokens, logits, cache = greedy(model, ids, mask)
    assert isinstance(cache, hf_lara.LaraCache)
    assert all(isinstance(layer.state, EVAState) for layer in cache.layers)
    # summaries of each row's windows before its exact span (the open window and the one before it, anchored at
    # its first real token), 2 chunks per window
    real = torch.tensor([len(p) for p in batch]) + NEW_TOKENS - 1
    assert cache.layers[0].state.count.tolist() == ((real // 4 - 1).clamp_min(0) * 2).tolist()
    assert cache.layers[0].state.sink_keys.shape[2] == sinks
    kv_tokens, kv_logits, _ = greedy(model, ids, mask, cache_implementation="dynamic")
    assert torch.equal(tokens, kv_tokens)
    assert_close(logits, kv_logits, msg="EVA state vs KV logits")
    for row, prompt in enumerate(batch):
        alone_tokens, _, _ = greedy(model, prompt[None], torch.ones(1, len(prompt), dtype=torch.long))
        assert torch.equal(tokens[row], alone_tokens[0]), f"prompt {row}"
    ids, mask = left_padded([make_inputs(SETUPS[family], 1, n, seed=n)["input_ids"][0] for n in (13, 9)], pad=0)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        out = model(input_ids=ids[:, :6], attention_mask=mask[:, :6], position_ids=positions[:, :6], use_cache=True)
        cache, stepped = output_cache(out), [out.logits]
        for t in range(6, ids.shape[1]):
            out = model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1],
                        position_ids=positions[:, t : t + 1], use_cache=True, **{CACHE_KWARG: cache})  # fmt: skip
            stepped.append(out.logits)
    stepped = torch.cat(stepped, dim=1)
    assert_close(stepped * mask[..., None], full * mask[..., None], msg="EVA state decoding vs full forward")
