"""`recipes/finetune_classification.py` end to end through `accelerate launch`."""

from __future__ import annotations

import transformers

from .conftest import FIXTURES, results, step_losses


def test_finetune_classification(launch, tiny_checkpoints, tmp_path):
    out = tmp_path / "bert-kernel-cls"
    stdout = launch(
        "finetune_classification.py",
        "--model_name_or_path", tiny_checkpoints["bert"],
        "--method", "kernel", "--hparam", "feature_map=t2r", "--hparam", "num_features=8",
        "--layer_hparam", "1:num_features=16",
        "--train_file", FIXTURES / "classification_train.csv",
        "--validation_file", FIXTURES / "classification_validation.csv",
        "--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--learning_rate", "1e-3",
        "--logging_steps", "1",
        "--output_dir", out,
    )  # fmt: skip
    assert sorted(step_losses(stdout)) == [1, 2, 3, 4, 5]
    assert "epoch 0: accuracy" in stdout
    report = results(out)
    assert 0.0 <= report["eval_accuracy"] <= 1.0 and 0.0 <= report["eval_f1"] <= 1.0
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out)
    assert type(model).__name__ == "LaraBertForSequenceClassification"
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert model.config.lara_hparams == {"feature_map": "t2r", "num_features": 8}
    assert model.config.lara_layer_hparams == {"1": {"num_features": 16}}
    assert [model.lara_estimators()[i].num_features for i in (0, 1)] == [8, 16]
