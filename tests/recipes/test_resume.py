"""Exact, safe resume: a run restarted from a checkpoint replays the uninterrupted run's losses and weights; `latest`
skips a checkpoint whose save was interrupted; damaged checkpoints and pickles planted in them are refused.

The setting makes every source of drift visible: shuffled batches, dropout, EVA's random proposal samples in
training, gradient accumulation over an epoch whose batch count (7) is not a multiple of the accumulation (2).
"""

from __future__ import annotations

import json
import pickle
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from .conftest import FIXTURES, load_recipe, step_losses

PROGRESS = "training_progress.json"


def common_args(tiny_checkpoints) -> list[str]:
    return [
        "--model_name_or_path", tiny_checkpoints["bert"],
        "--method", "eva", "--hparam", "window_size=4", "--hparam", "num_chunks=2", "--hparam", "chunk_size=2",
        "--train_file", str(FIXTURES / "classification_train.csv"),
        "--validation_file", str(FIXTURES / "classification_validation.csv"),
        "--num_train_epochs", "2", "--per_device_train_batch_size", "6", "--gradient_accumulation_steps", "2",
        "--learning_rate", "1e-3", "--logging_steps", "1", "--seed", "7",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def full_run(launch, tiny_checkpoints, tmp_path_factory):
    """The uninterrupted run: 8 steps over 2 epochs, checkpoints `step_3` and `step_6`."""
    full = tmp_path_factory.mktemp("full")
    stdout = launch(
        "finetune_classification.py",
        *common_args(tiny_checkpoints),
        "--checkpointing_steps",
        "3",
        "--output_dir",
        full,
    )
    return full, stdout


def assert_same_run(full, stdout_full, resumed, stdout_resumed, first_step: int) -> None:
    losses_full, losses_resumed = step_losses(stdout_full), step_losses(stdout_resumed)
    assert sorted(losses_full) == list(range(1, 9)) and sorted(losses_resumed) == list(range(first_step, 9))
    print(f"\nuninterrupted {losses_full}\nresumed       {losses_resumed}")
    assert losses_resumed == {s: losses_full[s] for s in range(first_step, 9)}
    epoch_1 = re.compile(r"epoch 1: .*")
    assert epoch_1.search(stdout_full).group() == epoch_1.search(stdout_resumed).group()
    weights_full, weights_resumed = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert weights_full.keys() == weights_resumed.keys()
    assert any(".lara_attention." in name for name in weights_full)
    for name, tensor in weights_full.items():
        torch.testing.assert_close(weights_resumed[name], tensor, rtol=0, atol=0, msg=name)


def test_checkpoints_hold_plain_progress(full_run):
    """Progress is JSON written last; nothing pickled by a registered object; no leftovers of the atomic save."""
    full, _ = full_run
    assert sorted(p.name for p in full.iterdir() if p.is_dir()) == ["step_3", "step_6"]
    assert json.loads((full / "step_6" / PROGRESS).read_text()) == {"epoch": 1, "batches": 4, "completed_steps": 6}
    assert json.loads((full / "step_3" / PROGRESS).read_text()) == {"epoch": 0, "batches": 6, "completed_steps": 3}
    assert not list(full.glob("*/custom_checkpoint_*"))


def test_resume_reproduces_uninterrupted_run(full_run, launch, tiny_checkpoints, tmp_path):
    full, stdout_full = full_run
    resumed = tmp_path / "resumed"
    stdout_resumed = launch(
        "finetune_classification.py",
        *common_args(tiny_checkpoints),
        "--resume_from_checkpoint", full / "step_6", "--output_dir", resumed,
    )  # fmt: skip
    assert "Resumed from checkpoint" in stdout_resumed
    assert_same_run(full, stdout_full, resumed, stdout_resumed, first_step=7)


def interrupted_copy(full, out):
    """`out` as a run killed while writing `step_6` leaves it: `step_3` whole, `step_6` cut short, no progress file
    (the old recipes picked such a folder as `latest`, by modification time, and crashed)."""
    out.mkdir()
    shutil.copytree(full / "step_3", out / "step_3")
    shutil.copytree(full / "step_6", out / "step_6")
    (out / "step_6" / PROGRESS).unlink()
    weights = out / "step_6" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    shutil.copytree(out / "step_6", out / "step_9.partial")


def test_latest_is_the_newest_complete_checkpoint(full_run, launch, tiny_checkpoints, tmp_path):
    full, stdout_full = full_run
    resumed = tmp_path / "resumed"
    interrupted_copy(full, resumed)
    stdout_resumed = launch(
        "finetune_classification.py",
        *common_args(tiny_checkpoints),
        "--resume_from_checkpoint", "latest", "--output_dir", resumed,
    )  # fmt: skip
    assert f"Resumed from checkpoint: {resumed / 'step_3'} (step 3)" in stdout_resumed
    assert_same_run(full, stdout_full, resumed, stdout_resumed, first_step=4)


def resume_in_process(tiny_checkpoints, checkpoint, out):
    recipe = load_recipe("finetune_classification")
    args = recipe.parse_args(
        [*common_args(tiny_checkpoints), "--resume_from_checkpoint", str(checkpoint), "--output_dir", str(out)]
    )
    recipe.training_function(args)


def test_damaged_checkpoint_is_refused(full_run, tiny_checkpoints, tmp_path):
    full, _ = full_run
    out = tmp_path / "out"
    interrupted_copy(full, out)
    with pytest.raises(ValueError, match=f"step_6' is incomplete or damaged \\(no {PROGRESS}, which is written last"):
        resume_in_process(tiny_checkpoints, out / "step_6", out)
    # complete by its marker but a file damaged afterwards
    shutil.copy(full / "step_6" / PROGRESS, out / "step_6" / PROGRESS)
    with pytest.raises(ValueError, match="step_6' is damaged: "):
        resume_in_process(tiny_checkpoints, out / "step_6", out)
    # `latest` with nothing complete
    shutil.rmtree(out / "step_3")
    (out / "step_6" / PROGRESS).unlink()
    with pytest.raises(ValueError, match="`--resume_from_checkpoint latest`: no complete step_N or epoch_N"):
        resume_in_process(tiny_checkpoints, "latest", out)


class Payload:
    """Unpickling this creates `path`: proof that code from the checkpoint ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.parametrize(
    ("how", "planted"),
    [
        ("explicit", "custom_checkpoint_0.pkl"),  # what `register_for_checkpointing` objects are saved as
        ("latest", "custom_checkpoint_0.pkl"),
        ("explicit", "pytorch_model_fsdp_0/.metadata"),  # sharded FSDP state: torch.distributed.checkpoint metadata
    ],
)
def test_planted_pickle_never_runs(how, planted, full_run, tiny_checkpoints, tmp_path):
    full, _ = full_run
    out, marker = tmp_path / "out", tmp_path / "code_ran"
    shutil.copytree(full / "step_3", out / "step_3")
    (out / "step_3" / planted).parent.mkdir(exist_ok=True)
    if planted.endswith(".pkl"):
        torch.save(Payload(marker), out / "step_3" / planted)  # as Accelerate's save_custom_state writes it
    else:
        (out / "step_3" / planted).write_bytes(pickle.dumps(Payload(marker)))  # as torch.distributed.checkpoint does
    name = planted.rsplit("/", 1)[-1]
    with pytest.raises(ValueError, match=f"holds {re.escape(name)}: pickled objects"):
        resume_in_process(tiny_checkpoints, out / "step_3" if how == "explicit" else "latest", out)
    assert not marker.exists()


def test_interrupted_save_leaves_no_checkpoint(tmp_path, monkeypatch):
    """A save killed half-way leaves `step_N.partial`, never `step_N`; `latest` stays on the previous checkpoint, and
    saving over an existing checkpoint replaces it whole."""
    import argparse
    import importlib

    from accelerate import Accelerator

    load_recipe("finetune_classification")  # puts recipes/ on sys.path, as when a recipe runs
    utils = importlib.import_module("recipe_utils")
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(torch.nn.Linear(3, 2), torch.optim.SGD(torch.nn.Linear(3, 2).parameters()))
    args = argparse.Namespace(output_dir=str(tmp_path), resume_from_checkpoint="latest")
    utils.save_checkpoint(accelerator, args, utils.TrainingProgress(0, 6, 3), "step_3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_3"]

    real_save_state = accelerator.save_state

    def killed(output_dir):
        real_save_state(output_dir)  # everything written but the progress file ...
        raise KeyboardInterrupt  # ... when the process is stopped

    monkeypatch.setattr(accelerator, "save_state", killed)
    with pytest.raises(KeyboardInterrupt):
        utils.save_checkpoint(accelerator, args, utils.TrainingProgress(1, 4, 6), "step_6")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_3", "step_6.partial"]
    assert utils.resolve_checkpoint(args) == tmp_path / "step_3"

    monkeypatch.setattr(accelerator, "save_state", real_save_state)
    utils.save_checkpoint(accelerator, args, utils.TrainingProgress(1, 4, 6), "step_6")
    utils.save_checkpoint(accelerator, args, utils.TrainingProgress(0, 7, 4), "step_3")  # a rerun overwrites step_3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_3", "step_6"]
    assert json.loads((tmp_path / "step_3" / PROGRESS).read_text())["completed_steps"] == 4
    assert utils.resolve_checkpoint(args) == tmp_path / "step_6"
