"""Converted models under `torch.compile(fullgraph=True)` and `torch.export` equal the eager model.

Compilation uses dynamo's `eager` backend: `fullgraph=True` fails on any graph break (host synchronisation,
data-dependent shapes), which is the property under test, without inductor's minutes of C++ compilation on CPU.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import hf_lara

HPARAMS = {"rfa": {"num_features": 8, "chunk_size": 4}, "kernel": {"chunk_size": 4}, "lara": {"num_landmarks": 3}}


def tiny(kind: str, method: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "bert":
        config = transformers.BertConfig(
            vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24
        )
        model = transformers.BertModel(config)
    else:
        config = transformers.LlamaConfig(
            vocab_size=40,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=24,
        )
        model = transformers.LlamaForCausalLM(config)
    return hf_lara.convert(model.eval(), method, **HPARAMS[method])


def inputs(kind: str, padded: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(0, 40, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    if padded:
        mask[1, -4:] = 0 if kind == "bert" else 1
        mask[1, :4] = 0 if kind == "llama" else 1  # decoders pad on the left
    kwargs = {"input_ids": ids, "attention_mask": mask}
    if kind == "llama":
        kwargs["use_cache"] = False
    return kwargs


@pytest.mark.parametrize("method", ["rfa", "kernel", "lara"])
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_compile_fullgraph_equals_eager(kind, method):
    model = tiny(kind, method)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        for padded in (False, True):
            kwargs = inputs(kind, padded)
            torch.testing.assert_close(compiled(**kwargs)[0], model(**kwargs)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["rfa", "lara"])
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_export_with_padding_mask(kind, method):
    model = tiny(kind, method)
    kwargs = inputs(kind, padded=True)
    with torch.no_grad():
        program = torch.export.export(model, (), kwargs, strict=False)
        torch.testing.assert_close(program.module()(**kwargs)[0], model(**kwargs)[0], rtol=1e-5, atol=1e-6)
