"""Exact resume: a run restarted from a mid-epoch checkpoint replays the uninterrupted run's losses and weights.

The setting makes every source of drift visible: shuffled batches, dropout, EVA's random proposal samples in
training, gradient accumulation over an epoch whose batch count (7) is not a multiple of the accumulation (2).
"""

from __future__ import annotations

import re

import torch
from safetensors.torch import load_file

from .conftest import FIXTURES, step_losses


def test_resume_reproduces_uninterrupted_run(launch, tiny_checkpoints, tmp_path):
    common = (
        "--model_name_or_path", tiny_checkpoints["bert"],
        "--method", "eva", "--hparam", "window_size=4", "--hparam", "num_chunks=2", "--hparam", "chunk_size=2",
        "--train_file", FIXTURES / "classification_train.csv",
        "--validation_file", FIXTURES / "classification_validation.csv",
        "--num_train_epochs", "2", "--per_device_train_batch_size", "6", "--gradient_accumulation_steps", "2",
        "--learning_rate", "1e-3", "--logging_steps", "1", "--seed", "7",
    )  # fmt: skip
    full = tmp_path / "full"
    stdout_full = launch("finetune_classification.py", *common, "--checkpointing_steps", "3", "--output_dir", full)
    assert (full / "step_3").is_dir() and (full / "step_6").is_dir()
    resumed = tmp_path / "resumed"
    stdout_resumed = launch(
        "finetune_classification.py", *common, "--resume_from_checkpoint", full / "step_6", "--output_dir", resumed
    )
    assert "Resumed from checkpoint" in stdout_resumed

    losses_full, losses_resumed = step_losses(stdout_full), step_losses(stdout_resumed)
    assert sorted(losses_full) == list(range(1, 9)) and sorted(losses_resumed) == [7, 8]
    print(
        f"\nsteps 7-8: uninterrupted {[losses_full[s] for s in (7, 8)]}, resumed {[losses_resumed[s] for s in (7, 8)]}"
    )
    assert losses_resumed == {s: losses_full[s] for s in (7, 8)}
    epoch_1 = re.compile(r"epoch 1: .*")
    assert epoch_1.search(stdout_full).group() == epoch_1.search(stdout_resumed).group()

    weights_full, weights_resumed = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert weights_full.keys() == weights_resumed.keys()
    assert any(".lara_attention." in name for name in weights_full)
    for name, tensor in weights_full.items():
        torch.testing.assert_close(weights_resumed[name], tensor, rtol=0, atol=0, msg=name)
