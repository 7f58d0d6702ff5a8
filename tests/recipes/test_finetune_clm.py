"""`recipes/finetune_clm.py` end to end through `accelerate launch`."""

from __future__ import annotations

import math

import transformers

from .conftest import FIXTURES, results, step_losses


def test_finetune_clm(launch, tiny_checkpoints, tmp_path):
    out = tmp_path / "llama-eva-clm"
    stdout = launch(
        "finetune_clm.py",
        "--model_name_or_path", tiny_checkpoints["llama"],
        "--method", "eva", "--hparam", "window_size=8", "--hparam", "chunk_size=4",
        "--train_file", FIXTURES / "text_train.txt",
        "--validation_file", FIXTURES / "text_validation.txt",
        "--block_size", "32", "--per_device_train_batch_size", "4", "--max_train_steps", "4",
        "--learning_rate", "3e-3", "--logging_steps", "1",
        "--output_dir", out,
    )  # fmt: skip
    losses = step_losses(stdout)
    assert sorted(losses) == [1, 2, 3, 4] and losses[4] < losses[1]
    report = results(out)
    assert math.isclose(report["eval_perplexity"], math.exp(report["eval_loss"]), rel_tol=1e-9)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "LaraLlamaForCausalLM" and model.config.lara_method == "eva"
    assert transformers.AutoTokenizer.from_pretrained(out) is not None
