"""Each contact with non-public or version-dependent Transformers API (`integration/compat.py`) still holds here."""

from __future__ import annotations

import inspect
import warnings

import torch
import transformers

from hf_lara.integration import compat

from .utils import SETUPS, make_inputs


def test_cache_keyword_is_the_one_models_and_masks_take():
    for forward in (transformers.LlamaModel.forward, transformers.GPT2Model.forward, transformers.BertModel.forward):
        assert compat.CACHE_KWARG in inspect.signature(forward).parameters
    assert compat.CACHE_KWARG in inspect.signature(transformers.masking_utils.create_causal_mask).parameters


def test_output_cache_reads_the_cache_without_a_warning():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(SETUPS["llama"].config()).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        out = model(**make_inputs(SETUPS["llama"]), use_cache=True)
        cache = compat.output_cache(out)
    assert isinstance(cache, transformers.DynamicCache) and cache.get_seq_length() == 9
    assert compat.cache_from_kwargs({compat.CACHE_KWARG: cache}) is cache
    assert compat.cache_from_kwargs({"past_key_values": cache}) is cache


def test_auto_model_mappings_cover_the_auto_classes():
    mappings = compat.auto_model_mappings()
    for auto_class in (transformers.AutoModel, transformers.AutoModelForCausalLM, transformers.AutoModelForMaskedLM):
        assert auto_class in mappings
    assert mappings[transformers.AutoModelForCausalLM][transformers.LlamaConfig] is transformers.LlamaForCausalLM


def test_initialized_flag_is_the_one_transformers_sets_on_loaded_weights(base_checkpoints):
    """`from_pretrained` flags what it loaded with the attribute `mark_initialized` sets (and then skips it)."""
    model = transformers.AutoModelForMaskedLM.from_pretrained(base_checkpoints["bert"])
    assert all(compat.is_initialized(p) for p in model.parameters())
    fresh = torch.zeros(2)
    assert not compat.is_initialized(fresh)
    compat.mark_initialized(fresh)
    assert compat.is_initialized(fresh)
