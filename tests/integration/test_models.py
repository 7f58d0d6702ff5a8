"""Converted models of every family x method: forward, save/load round trip, exactness, padding, initialisation."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

import hf_lara
from hf_lara.integration import ESTIMATOR_ATTR

from .utils import FAMILIES, METHODS, SEQ_LEN, SETUPS, assert_close, load_base, load_converted, make_inputs, run


def saved_keys(path: str) -> set[str]:
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_save_load_round_trip(family, method, base_checkpoints, tmp_path):
    setup = SETUPS[family]
    base = load_base(setup, base_checkpoints[family])
    model = load_converted(setup, base_checkpoints[family], method)
    assert type(model).__name__ == "Lara" + type(base).__name__
    assert model.config.model_type == f"lara_{family}" and model.config._attn_implementation == "hf_lara"
    inputs = make_inputs(setup)
    out = run(model, inputs)
    assert out.shape == run(base, inputs).shape and torch.isfinite(out).all()

    model.save_pretrained(tmp_path)
    # the folder holds what loading needs and nothing else; the added weights are exactly the `lara_attention.*` ones
    expected_files = {"config.json", "model.safetensors"} | (
        {"generation_config.json"} if model.can_generate() else set()
    )
    assert set(os.listdir(tmp_path)) == expected_files
    added = saved_keys(tmp_path) - saved_keys(base_checkpoints[family])
    assert all(f".{ESTIMATOR_ATTR}." in key for key in added)
    # (ViT/DeiT save under their pre-v5 module names, so compare names from the estimator on)
    expected_added = {k for k in model.state_dict() if f".{ESTIMATOR_ATTR}." in k}
    assert sorted(k.split(ESTIMATOR_ATTR)[1] for k in added) == sorted(
        k.split(ESTIMATOR_ATTR)[1] for k in expected_added
    )
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["lara_method"] == method and saved["model_type"] == f"lara_{family}"

    reloaded = setup.auto_class.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    assert reloaded.config._attn_implementation == "hf_lara"
    assert (reloaded.config.lara_method, reloaded.config.lara_hparams) == (method, model.config.lara_hparams)
    assert torch.equal(run(reloaded, inputs), out)


@pytest.mark.parametrize("family", FAMILIES)
def test_softmax_and_covering_eva_reproduce_the_original(family, base_checkpoints):
    setup = SETUPS[family]
    inputs = make_inputs(setup)
    expected = run(load_base(setup, base_checkpoints[family]), inputs)
    softmax = load_converted(setup, base_checkpoints[family], "softmax")
    assert_close(run(softmax, inputs), expected, msg="softmax conversion")
    if "eva" in METHODS:
        # a window covering the whole input (image: 9 patches + class/distillation tokens) makes EVA exact softmax
        eva = load_converted(setup, base_checkpoints[family], "eva", window_size=32, num_chunks=2, chunk_size=4)
        assert_close(run(eva, inputs), expected, msg="eva with a covering window")


def padded_batch(setup, lengths: list[int]) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """A padded batch (right padding for encoders, left for decoders) and each sequence alone."""
    pad = setup.config().pad_token_id or 0
    left = setup.kind == "decoder"
    longest = max(lengths)
    ids = torch.full((len(lengths), longest), pad)
    mask = torch.zeros_like(ids)
    alone = []
    for row, n in enumerate(lengths):
        seq = make_inputs(setup, batch=1, seq_len=n, seed=row)["input_ids"][0]
        span = slice(longest - n, longest) if left else slice(0, n)
        ids[row, span], mask[row, span] = seq, 1
        alone.append(
            with_positions(setup, {"input_ids": seq[None], "attention_mask": torch.ones(1, n, dtype=torch.long)})
        )
    return with_positions(setup, {"input_ids": ids, "attention_mask": mask}), alone


def with_positions(setup, inputs):
    """Decoders get position ids that skip left padding, as `generate` does."""
    if setup.kind == "decoder":
        inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    return inputs


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", [f for f in FAMILIES if SETUPS[f].kind != "vision"])
def test_padded_batch_equals_each_sequence_alone(family, method, base_checkpoints):
    setup = SETUPS[family]
    model = load_converted(setup, base_checkpoints[family], method)
    lengths = [SEQ_LEN, 5, 7]
    batch, alone = padded_batch(setup, lengths)
    out = run(model, batch)
    longest = max(lengths)
    for row, (n, single) in enumerate(zip(lengths, alone, strict=True)):
        span = slice(longest - n, longest) if setup.kind == "decoder" else slice(0, n)
        expected = run(model, single)[0]
        if out.dim() == 2:  # sequence classification: one output per sequence
            assert_close(out[row], expected, msg=f"row {row}")
        else:
            assert_close(out[row, span], expected, msg=f"row {row}")


@pytest.mark.parametrize("family", ["bert", "llama", "vit"])
def test_teacher_switch_and_hybrid_layers(family, base_checkpoints):
    setup = SETUPS[family]
    inputs = make_inputs(setup)
    expected = run(load_base(setup, base_checkpoints[family]), inputs)
    model = load_converted(setup, base_checkpoints[family], "rfa", layers=[1])
    assert list(model.lara_estimators()) == [1]
    student = run(model, inputs)
    assert (student - expected).abs().max() > 1e-6  # the estimator is in use
    model.set_attn_implementation("sdpa")
    assert_close(run(model, inputs), expected, msg="teacher")
    model.set_attn_implementation("hf_lara")
    assert torch.equal(run(model, inputs), student)
    # an explicit implementation at load time also gives the teacher
    teacher = setup.auto_class.from_pretrained(
        base_checkpoints[family], config=model.config, attn_implementation="sdpa"
    )
    assert_close(run(teacher.eval(), inputs), expected, msg="teacher loaded with attn_implementation='sdpa'")


def test_new_estimators_get_their_own_init_not_the_family_init(base_checkpoints):
    setup = SETUPS["bert"]
    if "eva" in METHODS:
        eva = load_converted(setup, base_checkpoints["bert"], "eva")
        for estimator in eva.lara_estimators().values():
            for proj in (estimator.chunk_key_proj, estimator.proposal_proj):
                assert torch.equal(proj.weight, torch.eye(proj.weight.shape[0]))  # identity, not normal(0, 0.02)
                assert torch.equal(proj.bias, torch.zeros_like(proj.bias))
    if "kernel" in METHODS:
        kernel = load_converted(setup, base_checkpoints["bert"], "kernel", feature_init="identity")
        fresh = kernel.config.build_estimator(4, 8).state_dict()
        for estimator in kernel.lara_estimators().values():
            assert all(torch.equal(t, fresh[name]) for name, t in estimator.state_dict().items())
    rfa = load_converted(setup, base_checkpoints["bert"], "rfa")
    for estimator in rfa.lara_estimators().values():
        omega = estimator.projection
        assert torch.isfinite(omega).all() and 0.5 < omega.pow(2).mean() < 2  # N(0, 1) rows, not garbage


@pytest.mark.parametrize("method", ["rfa", "softmax"])
def test_converted_checkpoint_loads_into_the_plain_base_class(method, base_checkpoints, tmp_path):
    setup = SETUPS["llama"]
    inputs = make_inputs(setup)
    model = load_converted(setup, base_checkpoints["llama"], method)
    model.save_pretrained(tmp_path)
    plain = type(model).lara_base_class.from_pretrained(tmp_path).eval()
    assert type(plain).__name__ == "LlamaForCausalLM" and plain.config._attn_implementation == "sdpa"
    assert_close(run(plain, inputs), run(load_base(setup, base_checkpoints["llama"]), inputs))


def test_every_estimator_has_the_model_dtype_and_a_persistent_state(base_checkpoints, tmp_path):
    setup = SETUPS["qwen2"]
    model = setup.auto_class.from_pretrained(
        base_checkpoints["qwen2"],
        config=hf_lara.LaraConfig.from_pretrained(base_checkpoints["qwen2"], method="rfa"),
        dtype=torch.bfloat16,
    )
    estimators = model.lara_estimators()
    assert len(estimators) == 2 and all(e.projection.dtype == torch.bfloat16 for e in estimators.values())
    model.save_pretrained(tmp_path)
    reloaded = setup.auto_class.from_pretrained(tmp_path, dtype=torch.bfloat16)
    for i, estimator in reloaded.lara_estimators().items():
        assert torch.equal(estimator.projection, estimators[i].projection)
