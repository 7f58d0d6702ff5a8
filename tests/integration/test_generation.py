"""Decoding converted Llama and GPT-2 over the KV cache: left-padded `generate` and a manual prefill + step loop."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import DynamicCache

import hf_lara
from hf_lara.integration.compat import CACHE_KWARG

from .utils import METHODS, SETUPS, assert_close, load_converted, make_inputs

PROMPT_LENGTHS = [7, 4, 6]
NEW_TOKENS = 6
LAYERS = {"all": None, "hybrid": [1]}  # "hybrid": layer 0 keeps exact softmax through the fallback
# the fallback does not depend on the method: one method covers the hybrid case
CASES = [(m, "all") for m in METHODS] + [("rfa", "hybrid")]
pytestmark = pytest.mark.filterwarnings("error::FutureWarning")


def left_padded(prompts: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt) :], mask[row, longest - len(prompt) :] = prompt, 1
    return ids, mask


def greedy(model, ids, mask):
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
            do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
    return out.sequences[:, ids.shape[1] :], torch.stack(out.logits, dim=1)


@pytest.mark.parametrize(("method", "layers"), CASES)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_left_padded_generate_equals_each_prompt_alone(family, method, layers, base_checkpoints):
    setup = SETUPS[family]
    model = load_converted(setup, base_checkpoints[family], method, layers=LAYERS[layers])
    prompts = [make_inputs(setup, batch=1, seq_len=n, seed=i)["input_ids"][0] for i, n in enumerate(PROMPT_LENGTHS)]
    tokens, logits = greedy(model, *left_padded(prompts, pad=0))
    for row, prompt in enumerate(prompts):
        alone_tokens, alone_logits = greedy(model, prompt[None], torch.ones(1, len(prompt), dtype=torch.long))
        assert_close(logits[row], alone_logits[0], atol=2e-5, rtol=1e-4, msg=f"prompt {row} logits")
        assert torch.equal(tokens[row], alone_tokens[0]), f"prompt {row}"


@pytest.mark.parametrize(("method", "layers"), CASES)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cached_prefill_and_steps_equal_the_full_forward(family, method, layers, base_checkpoints):
    setup = SETUPS[family]
    model = load_converted(setup, base_checkpoints[family], method, layers=LAYERS[layers])
    prompts = [make_inputs(setup, batch=1, seq_len=n + 4, seed=i)["input_ids"][0] for i, n in enumerate([9, 6])]
    ids, mask = left_padded(prompts, pad=0)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        prefill = ids.shape[1] - 4
        cache = DynamicCache(config=model.config)
        step_logits = [
            model(input_ids=ids[:, :prefill], attention_mask=mask[:, :prefill], position_ids=positions[:, :prefill],
                  use_cache=True, **{CACHE_KWARG: cache}).logits
        ]  # fmt: skip
        for t in range(prefill, ids.shape[1]):
            out = model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1],
                        position_ids=positions[:, t : t + 1], use_cache=True, **{CACHE_KWARG: cache})  # fmt: skip
            step_logits.append(out.logits)
    cached = torch.cat(step_logits, dim=1)
    assert_close(cached * mask[..., None], full * mask[..., None], msg="cached decoding vs full forward")


def test_layers_left_on_softmax_keep_sliding_window_and_cache_offsets():
    """Mistral with a window shorter than the input: unconverted layers equal the original, cached or not."""
    torch.manual_seed(0)
    config = transformers.MistralConfig(**dict(SETUPS["mistral"].config_kwargs, sliding_window=4))
    model = transformers.MistralForCausalLM(config).eval()
    ids, mask = left_padded([make_inputs(SETUPS["mistral"], 1, n, seed=n)["input_ids"][0] for n in (10, 7)], pad=0)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    expected_tokens, expected_logits = greedy(model, ids, mask)
    hf_lara.convert(model, method="softmax", layers=[])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert_close(out * mask[..., None], expected * mask[..., None])
    tokens, logits = greedy(model, ids, mask)
    assert torch.equal(tokens, expected_tokens)
    assert_close(logits, expected_logits)
