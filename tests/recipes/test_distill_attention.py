"""`recipes/distill_attention.py` end to end: a decoder through both stages and an exact resume, through `accelerate
launch`, and attention transfer on the real all-MiniLM-L6-v2."""

from __future__ import annotations

import pytest
import torch
import transformers
from safetensors.torch import load_file

import hf_lara
from hf_lara import distill

from .conftest import FIXTURES, results, step_losses

TEXT = ("--train_file", FIXTURES / "text_train.txt", "--validation_file", FIXTURES / "text_validation.txt")


def decoder_args(tiny_checkpoints) -> list:
    return [
        "--model_name_or_path", tiny_checkpoints["llama"],
        "--method", "lara", "--hparam", "num_landmarks=4", "--hparam", "chunk_size=8",
        *TEXT,
        "--stages", "1,2", "--stage1_share", "0.5", "--attn_rows_weight", "0.1", "--lora_rank", "4",
        "--max_seq_length", "24", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
        "--max_train_steps", "4", "--logging_steps", "1", "--learning_rate", "1e-2", "--seed", "3",
    ]  # fmt: skip


def test_distill_decoder_both_stages_and_exact_resume(launch, tiny_checkpoints, tmp_path):
    """Causal LARA: stage 1 trains its proposal means (the adaptive maps stay frozen) with the Hedgehog row loss,
    stage 2 LoRA adapters (merged into the saved weights). A run resumed from a checkpoint inside stage 2 replays the
    uninterrupted run's losses and ends with the same weights."""
    out = tmp_path / "llama-lara"
    stdout = launch("distill_attention.py", *decoder_args(tiny_checkpoints), "--checkpointing_steps", "3",
                    "--output_dir", out)  # fmt: skip
    assert "relative error before -> after" in stdout and "embedding cosine" in stdout
    losses = step_losses(stdout)
    assert sorted(losses) == [1, 2, 3, 4]
    # the causal path uses the proposal means only: 2 layers x (H=4, C=4, D=8)
    assert "Training 256 estimator parameters in 2 layers and " in stdout and "stages 1,2" in stdout
    report = results(out)
    assert report["steps"] == {"1": 2, "2": 2} and len(report["after"]["per_layer_relative_error"]) == 2
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "LaraLlamaForCausalLM" and model.config.lara_method == "lara"
    assert len(model.lara_estimators()) == 2
    original = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"])
    assert all(e.proposal_mean.abs().sum() > 0 for e in model.lara_estimators().values()), "stage 1 trained nothing"
    # stage 2 merged its adapters into the projections; the embeddings carry none
    q_proj = model.model.layers[0].self_attn.q_proj.weight, original.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(*q_proj)
    torch.testing.assert_close(model.model.embed_tokens.weight, original.model.embed_tokens.weight)
    assert not any("lora_" in name for name in load_file(out / "model.safetensors"))

    resumed = tmp_path / "resumed"
    stdout_resumed = launch("distill_attention.py", *decoder_args(tiny_checkpoints),
                            "--resume_from_checkpoint", out / "step_3", "--output_dir", resumed)  # fmt: skip
    assert "Resumed from checkpoint" in stdout_resumed
    print(f"\nuninterrupted {losses}\nresumed       {step_losses(stdout_resumed)}")
    assert step_losses(stdout_resumed) == {4: losses[4]}
    full, again = load_file(out / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert full.keys() == again.keys()
    for name, tensor in full.items():
        torch.testing.assert_close(again[name], tensor, rtol=0, atol=0, msg=name)


def test_distill_improves_minilm(launch, minilm_path, tmp_path):
    """Hedgehog feature maps distilled on a few sentences: every layer's attention error drops, the embedding nears
    the original."""
    out = tmp_path / "minilm-hedgehog"
    stdout = launch(
        "distill_attention.py",
        "--model_name_or_path", minilm_path,
        "--method", "kernel", "--hparam", "feature_map=hedgehog",
        *TEXT,
        "--stages", "1", "--max_train_steps", "30", "--learning_rate", "1e-2", "--per_device_train_batch_size", "8",
        "--logging_steps", "10",
        "--output_dir", out,
    )  # fmt: skip
    report = results(out)
    before, after = report["before"], report["after"]
    print("\nall-MiniLM-L6-v2, kernel/hedgehog, 30 steps: per-layer relative attention-output error")
    for layer, b, a in zip(after["layers"], before["per_layer_relative_error"], after["per_layer_relative_error"]):
        print(f"  layer {layer}: {b:.4f} -> {a:.4f}")
    print(f"  embedding cosine: {before['embedding_cosine']:.4f} -> {after['embedding_cosine']:.4f}")
    assert after["layers"] == list(range(6))
    for layer, b, a in zip(after["layers"], before["per_layer_relative_error"], after["per_layer_relative_error"]):
        assert a < 0.9 * b, f"layer {layer}: error {b:.4f} -> {a:.4f}"
    assert after["embedding_cosine"] > before["embedding_cosine"] + 0.05
    losses = step_losses(stdout)
    assert losses[30] < losses[10]
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
    """Stage 1 trains only the estimator parameters the layer's mode (causal or not) uses."""
    auto = transformers.AutoModelForCausalLM if family == "llama" else transformers.AutoModelForMaskedLM
    model = hf_lara.convert(auto.from_pretrained(tiny_checkpoints[family]), method, **hparams)
    trainable = {id(p) for p in distill.estimator_parameters(model)}
    names = {name for name, p in model.named_parameters() if id(p) in trainable}
    assert len(names) == len(trainable) and all(p.grad is None for p in model.parameters())
    assert {name.split(".lara_attention.")[1] for name in names} == expected
    assert all(".lara_attention." in name for name in names)
    assert len(names) == 2 * len(expected)  # two layers
