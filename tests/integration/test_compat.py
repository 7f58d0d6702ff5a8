"""Each contact with non-public or version-dependent Transformers API (`integration/compat.py`) still holds here."""

from __future__ import annotations

import inspect
import warnings

import pytest
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


def test_peft_saves_through_its_card_update_which_reads_model_tags(tmp_path):
    """`called_by_peft_card`: every `PeftModel.save_pretrained` runs `create_or_update_model_card`, which reads
    `model_tags` of the base model; the frame seen from that read is peft's method."""
    peft = pytest.importorskip("peft")
    assert callable(getattr(peft.PeftModel, compat.PEFT_CARD_METHOD))

    seen = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)
            self.config = {"model_type": "probe"}

        @property
        def model_tags(self):
            seen.append(compat.called_by_peft_card())
            return None

    model = peft.get_peft_model(Probe(), peft.LoraConfig(r=2, target_modules=["linear"]))
    model.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
    assert True in seen


def test_lora_wrap_of_a_converted_model_raises_no_future_warning():
    """`peft_wrapping`: peft reads `is_gradient_checkpointing` (deprecated in transformers 5.24) on every wrap; the
    stage-2 LoRA wrap of `hf_lara.distill` shows users no warning they cannot act on."""
    import hf_lara
    from hf_lara.distill import add_lora

    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    model = hf_lara.convert(transformers.BertModel(config), "kernel")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        wrapped = add_lora(model, rank=2)
    assert type(wrapped).__module__.startswith("peft")
