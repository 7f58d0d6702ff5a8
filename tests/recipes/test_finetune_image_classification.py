"""`recipes/finetune_image_classification.py` end to end through `accelerate launch`, on a generated image folder."""

from __future__ import annotations

import transformers

from .conftest import results, step_losses


def test_finetune_image_classification(launch, tiny_checkpoints, image_folders, tmp_path):
    out = tmp_path / "vit-lara"
    stdout = launch(
        "finetune_image_classification.py",
        "--model_name_or_path", tiny_checkpoints["vit"],
        "--method", "lara", "--hparam", "num_landmarks=4", "--hparam", "adaptive=true",
        "--train_dir", image_folders["train"], "--validation_dir", image_folders["validation"],
        "--num_train_epochs", "1", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
        "--logging_steps", "1",
        "--output_dir", out,
    )  # fmt: skip
    assert sorted(step_losses(stdout)) == [1, 2, 3, 4]
    assert 0.0 <= results(out)["eval_accuracy"] <= 1.0
    model = transformers.AutoModelForImageClassification.from_pretrained(out)
    assert type(model).__name__ == "LaraViTForImageClassification"
    assert model.config.id2label == {0: "blue", 1: "red"} and model.config.lara_hparams["adaptive"] is True
    assert transformers.AutoImageProcessor.from_pretrained(out) is not None
