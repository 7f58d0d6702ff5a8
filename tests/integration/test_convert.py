"""`hf_lara.convert` on in-memory models: in place, selected layers only, save/load round trip, re-conversion."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import hf_lara
from hf_lara.integration import ESTIMATOR_ATTR
from hf_lara.integration import FAMILIES as REGISTRY

from .utils import FAMILIES, SEQ_LEN, SETUPS, assert_close, hparams, load_base, make_inputs, run


@pytest.mark.parametrize("family", FAMILIES)
def test_convert_in_place_then_round_trip(family, base_checkpoints, tmp_path):
    setup = SETUPS[family]
    inputs = make_inputs(setup)
    model = load_base(setup, base_checkpoints[family])
    base_class, expected = type(model), run(model, inputs)
    weight = next(model.parameters())

    converted = hf_lara.convert(model, method="rfa", layers=[0], **hparams("rfa"))
    assert converted is model and next(model.parameters()) is weight
    assert type(model).__name__ == f"Lara{base_class.__name__}" and isinstance(model, base_class)
    assert model.config.model_type == f"lara_{family}" and model.config.lara_layers == [0]
    modules = REGISTRY[family].attention_modules(model)
    assert [hasattr(m, ESTIMATOR_ATTR) for m in modules] == [True, False]
    out = run(model, inputs)
    assert (out - expected).abs().max() > 1e-6  # the output changed

    model.save_pretrained(tmp_path)
    reloaded = setup.auto_class.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    assert torch.equal(run(reloaded, inputs), out)


@pytest.mark.parametrize("family", FAMILIES)
def test_softmax_convert_is_the_identity(family, base_checkpoints):
    setup = SETUPS[family]
    inputs = make_inputs(setup)
    model = load_base(setup, base_checkpoints[family])
    expected = run(model, inputs)
    assert_close(run(hf_lara.convert(model, method="softmax"), inputs), expected)


def test_convert_again_replaces_the_estimators(base_checkpoints):
    setup = SETUPS["gpt2"]
    inputs = make_inputs(setup)
    model = load_base(setup, base_checkpoints["gpt2"])
    expected = run(model, inputs)
    hf_lara.convert(model, method="rfa", **hparams("rfa"))
    hf_lara.convert(model, method="rfa", layers=[1])  # same method: earlier hyper-parameters are kept
    assert model.config.lara_hparams == hparams("rfa") and list(model.lara_estimators()) == [1]
    hf_lara.convert(model, method="softmax")
    assert model.config.lara_hparams == {} and model.config.lara_layers == [1]
    assert_close(run(model, inputs), expected)


def test_convert_keeps_device_dtype_and_mode(base_checkpoints):
    setup = SETUPS["llama"]
    model = setup.auto_class.from_pretrained(base_checkpoints["llama"], dtype=torch.float64).train()
    hf_lara.convert(model, method="rfa")
    for estimator in model.lara_estimators().values():
        assert estimator.training and estimator.projection.dtype == torch.float64
    model.eval()
    out = run(model, make_inputs(setup))
    assert out.dtype == torch.float64 and torch.isfinite(out).all()


def test_failed_convert_leaves_the_model_untouched(base_checkpoints):
    setup = SETUPS["bert"]
    model = load_base(setup, base_checkpoints["bert"])
    with pytest.raises(ValueError, match="num_features"):
        hf_lara.convert(model, method="rfa", num_features=0)
    with pytest.raises(ValueError, match="layers"):
        hf_lara.convert(model, method="rfa", layers=[5])
    assert type(model).__name__ == "BertForMaskedLM" and model.config.model_type == "bert"
    assert model.config._attn_implementation == "sdpa"
    assert not any(ESTIMATOR_ATTR in name for name, _ in model.named_modules())


def test_gradients_reach_base_weights_and_estimator_parameters(base_checkpoints):
    setup = SETUPS["llama"]
    model = load_base(setup, base_checkpoints["llama"])
    hf_lara.convert(model, method="kernel", **hparams("kernel")).train()
    inputs = make_inputs(setup)
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    for estimator in model.lara_estimators().values():
        params = list(estimator.parameters())
        assert params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_cross_attention_stays_exact_softmax(family):
    """Decoders with cross-attention: only self-attention is converted; cross-attention keeps softmax and its mask."""
    torch.manual_seed(0)
    if family == "bert":
        config = transformers.BertConfig(**SETUPS["bert"].config_kwargs, is_decoder=True, add_cross_attention=True)
        model = transformers.BertLMHeadModel(config).eval()
    else:
        config = transformers.GPT2Config(**SETUPS["gpt2"].config_kwargs, add_cross_attention=True)
        model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(3, 99, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    inputs = {
        "input_ids": ids,
        "attention_mask": mask,
        "encoder_hidden_states": torch.randn(2, 5, 32),
        "encoder_attention_mask": torch.tensor([[1] * 3 + [0] * 2, [1] * 5]),
    }
    expected = run(model, inputs) * mask[..., None]
    hf_lara.convert(model, method="softmax")
    assert len(model.lara_estimators()) == 2
    assert not any(hasattr(m, ESTIMATOR_ATTR) for n, m in model.named_modules() if "cross" in n)
    assert_close(run(model, inputs) * mask[..., None], expected)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_converted_in_place_model_still_returns_hidden_states(family, base_checkpoints):
    """Transformers files output-recording specs per class; the converted class must get them too."""
    from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY

    setup = SETUPS[family]
    inputs = make_inputs(setup)
    model = load_base(setup, base_checkpoints[family])
    with torch.no_grad():
        expected = model(**inputs, output_hidden_states=True).hidden_states
    converted_class = hf_lara.integration.families.model_class_for(REGISTRY[family], type(model))
    # forget what earlier tests may have filed when they built this class, so only `convert` can provide it
    dict.pop(_CAN_RECORD_REGISTRY, str(converted_class), None)
    hf_lara.convert(model, method="softmax")
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states
    assert hidden is not None and len(hidden) == len(expected)
    for h, e in zip(hidden, expected):
        assert_close(h, e)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_eva_with_sink_tokens_converts_and_is_padding_invariant(family, base_checkpoints, tmp_path):
    """`convert(model, "eva", sink_tokens=G)`: a window covering the input keeps the model exact; a short window
    with sinks differs from no sinks, survives a save/load round trip and gives a padded row its unpadded output."""
    setup = SETUPS[family]
    model = load_base(setup, base_checkpoints[family]).double()
    inputs = make_inputs(setup)
    expected = run(model, inputs)
    exact = hf_lara.convert(copy.deepcopy(model), "eva", window_size=SEQ_LEN, chunk_size=1, sink_tokens=2)
    assert_close(run(exact, inputs), expected, atol=1e-10, rtol=1e-10)

    plain = run(hf_lara.convert(copy.deepcopy(model), "eva", **hparams("eva")), inputs)
    hf_lara.convert(model, "eva", **hparams("eva", sink_tokens=2))
    assert model.config.lara_hparams["sink_tokens"] == 2
    assert all(e.sink_tokens == 2 for e in model.lara_estimators().values())
    out = run(model, inputs)
    assert (out - plain).abs().max() > 1e-6  # the sinks changed the output
    model.save_pretrained(tmp_path)
    reloaded = setup.auto_class.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert all(e.sink_tokens == 2 for e in reloaded.lara_estimators().values())
    assert_close(run(reloaded, inputs), out, atol=1e-12, rtol=1e-12)

    ids, mask = inputs["input_ids"], inputs["attention_mask"].clone()
    mask[1, SEQ_LEN - 3 :] = 0  # right padding: the last real tokens (bidirectional sinks) move
    padded = run(model, {"input_ids": ids, "attention_mask": mask})
    alone = run(model, {"input_ids": ids[1:, : SEQ_LEN - 3], "attention_mask": mask[1:, : SEQ_LEN - 3]})
    assert_close(padded[1:, : SEQ_LEN - 3], alone, atol=1e-10, rtol=1e-10)
