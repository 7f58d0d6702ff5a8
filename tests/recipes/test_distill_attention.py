"""`recipes/distill_attention.py` end to end: a decoder through `accelerate launch`, and the real all-MiniLM-L6-v2."""

from __future__ import annotations

import pytest
import torch
import transformers

import hf_lara

from .conftest import FIXTURES, load_recipe, results, step_losses

TEXT = ("--train_file", FIXTURES / "text_train.txt", "--validation_file", FIXTURES / "text_validation.txt")


def test_distill_decoder_with_attention_rows(launch, tiny_checkpoints, tmp_path):
    """Causal LARA trains its proposal means (the adaptive maps stay frozen); the Hedgehog row loss runs."""
    out = tmp_path / "llama-lara"
    stdout = launch(
        "distill_attention.py",
        "--model_name_or_path", tiny_checkpoints["llama"],
        "--method", "lara", "--hparam", "num_landmarks=4", "--hparam", "chunk_size=8",
        *TEXT,
        "--attn_rows_weight", "0.1",
        "--max_seq_length", "24",
        "--max_train_steps", "3", "--logging_steps", "1", "--learning_rate", "1e-2",
        "--output_dir", out,
    )  # fmt: skip
    assert "relative error before -> after" in stdout and "embedding cosine" in stdout
    assert sorted(step_losses(stdout)) == [1, 2, 3]
    # the causal path uses the proposal means only: 2 layers x (H=4, C=4, D=8)
    assert "Training 256 estimator parameters in 2 layers" in stdout
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "LaraLlamaForCausalLM" and model.config.lara_method == "lara"
    assert len(model.lara_estimators()) == 2
    original = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"])
    trained = {i: e.proposal_mean for i, e in model.lara_estimators().items()}
    assert all(m.abs().sum() > 0 for m in trained.values()), "proposal means never left their zero init"
    # frozen weights are saved unchanged
    torch.testing.assert_close(
        model.model.layers[0].self_attn.q_proj.weight, original.model.layers[0].self_attn.q_proj.weight
    )
    report = results(out)
    assert len(report["after"]["per_layer_relative_error"]) == 2


def test_distill_improves_minilm(launch, minilm_path, tmp_path):
    """Hedgehog feature maps distilled on a few sentences: every layer's attention error drops, the embedding nears
    the original."""
    out = tmp_path / "minilm-hedgehog"
    stdout = launch(
        "distill_attention.py",
        "--model_name_or_path", minilm_path,
        "--method", "kernel", "--hparam", "feature_map=hedgehog",
        *TEXT,
        "--max_train_steps", "60", "--learning_rate", "1e-2", "--per_device_train_batch_size", "8",
        "--logging_steps", "20",
        "--output_dir", out,
    )  # fmt: skip
    report = results(out)
    before, after = report["before"], report["after"]
    print("\nall-MiniLM-L6-v2, kernel/hedgehog, 60 steps: per-layer relative attention-output error")
    for layer, b, a in zip(after["layers"], before["per_layer_relative_error"], after["per_layer_relative_error"]):
        print(f"  layer {layer}: {b:.4f} -> {a:.4f}")
    print(f"  embedding cosine: {before['embedding_cosine']:.4f} -> {after['embedding_cosine']:.4f}")
    assert after["layers"] == list(range(6))
    for layer, b, a in zip(after["layers"], before["per_layer_relative_error"], after["per_layer_relative_error"]):
        assert a < 0.9 * b, f"layer {layer}: error {b:.4f} -> {a:.4f}"
    assert after["embedding_cosine"] > before["embedding_cosine"] + 0.05
    losses = step_losses(stdout)
    assert losses[60] < losses[20]
    model = transformers.AutoModel.from_pretrained(out)
    assert isinstance(model.config, hf_lara.LaraConfig) and model.config.lara_hparams == {"feature_map": "hedgehog"}


@pytest.mark.parametrize(
    ("family", "method", "hparams", "expected"),
    [
        ("bert", "kernel", {"feature_map": "hedgehog"}, {"feature_map.weight", "feature_map.bias"}),
        (
            "bert",
            "eva",
            {"window_size": 8, "chunk_size": 8},
            {"chunk_key_proj.weight", "chunk_key_proj.bias", "proposal_proj.weight", "proposal_proj.bias"},
        ),
        (
            "bert",
            "lara",
            {"adaptive": True},
            {"adapt_q.weight", "adapt_q.bias", "adapt_k.weight", "adapt_k.bias", "proposal_mean"},
        ),
        ("llama", "lara", {"adaptive": True}, {"proposal_mean"}),
    ],
    ids=["kernel", "eva", "lara-encoder", "lara-decoder"],
)
def test_trainable_parameters(family, method, hparams, expected, tiny_checkpoints):
    """Only the estimator parameters the layer's mode (causal or not) uses are trained; everything else is frozen."""
    recipe = load_recipe("distill_attention")
    auto = transformers.AutoModelForCausalLM if family == "llama" else transformers.AutoModelForMaskedLM
    model = hf_lara.convert(auto.from_pretrained(tiny_checkpoints[family]), method, **hparams)
    trainable = recipe.trainable_parameters(model)
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    assert len(names) == len(trainable) and all(p.grad is None for p in trainable)
    assert {name.split(".lara_attention.")[1] for name in names} == expected
    assert all(".lara_attention." in name for name in names)
    assert len(names) == 2 * len(expected)  # two layers
