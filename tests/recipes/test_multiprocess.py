"""Two real processes (`torchrun --nproc_per_node 2`, gloo on CPU): DDP with every method; FSDP configs on CPU."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import FIXTURES, RECIPES, results, step_losses

#: Every method, with settings small enough for the tiny BERT's short inputs.
METHODS = {
    "softmax": [],
    "rfa": ["num_features=8"],
    "ra": [],
    "lara": ["num_landmarks=4"],
    "eva": ["window_size=4", "chunk_size=2"],
    "kernel": ["num_features=8"],
}


def torchrun(*args) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        Path(__file__).with_name("ddp_driver.py"), *args,
    ]  # fmt: skip


def assert_ranks_agree(out: Path) -> dict:
    """Both ranks hold the same weights, and the saved model is those weights."""
    rank0, rank1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    assert rank0.keys() == rank1.keys()
    for name, tensor in rank0.items():
        torch.testing.assert_close(rank1[name], tensor, rtol=0, atol=0, msg=name)
    for name, tensor in load_file(out / "model.safetensors").items():
        torch.testing.assert_close(tensor, rank0[name], rtol=0, atol=0, msg=name)
    return rank0


def test_every_method_fine_tunes_under_ddp(tiny_checkpoints, recipe_env, tmp_path):
    """LARA's proposal means get no gradient in an encoder; DDP must still train it (and every other method)."""
    out = tmp_path / "ddp"
    command = torchrun(
        RECIPES / "finetune_classification.py", "--each_method", json.dumps(METHODS),
        "--model_name_or_path", tiny_checkpoints["bert"],
        "--train_file", FIXTURES / "classification_train.csv",
        "--validation_file", FIXTURES / "classification_validation.csv",
        "--max_length", "32", "--per_device_train_batch_size", "4", "--max_train_steps", "3",
        "--learning_rate", "1e-3", "--logging_steps", "1", "--output_dir", out,
    )  # fmt: skip
    env = {**recipe_env, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(list(map(str, command)), env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    stdout = done.stdout + done.stderr
    original = load_file(Path(tiny_checkpoints["bert"]) / "model.safetensors")
    for method in METHODS:
        assert f"method {method}: done" in stdout
        weights = assert_ranks_agree(out / method)
        name = "bert.encoder.layer.0.attention.self.query.weight"
        assert not torch.equal(weights[name], original[name]), f"{method}: nothing trained"
    assert sorted(step_losses(stdout)) == [1, 2, 3]  # printed once per step and method: same step numbers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_stay_in_sync(tiny_checkpoints, recipe_env, tmp_path):
    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        Path(__file__).with_name("ddp_driver.py"), RECIPES / "distill_attention.py",
        "--model_name_or_path", tiny_checkpoints["bert"],
        "--method", "kernel", "--hparam", "feature_map=hedgehog", "--hparam", "num_features=8",
        "--train_file", FIXTURES / "text_train.txt", "--validation_file", FIXTURES / "text_validation.txt",
        "--max_seq_length", "32", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
        "--max_train_steps", "6", "--stages", "1,2", "--stage1_share", "0.5", "--learning_rate", "2e-2",
        "--logging_steps", "1", "--output_dir", out,
    ]  # fmt: skip
    env = {**recipe_env, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(list(map(str, command)), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    stdout = done.stdout + done.stderr

    assert "on 2 process(es) (MULTI_CPU)" in stdout and "stages 1,2" in stdout
    losses = step_losses(stdout)
    print(f"\nDDP (2 processes) distillation losses: {losses}")
    assert sorted(losses) == list(range(1, 7))
    assert losses[3] < losses[1]  # stage 1 (steps 1-3) learns; stage 2's loss on this tiny random model is ~0
    rank0 = assert_ranks_agree(out)
    original = load_file(Path(tiny_checkpoints["bert"]) / "model.safetensors")
    estimators = [name for name in rank0 if ".lara_attention." in name]
    assert estimators and not any("lora_" in name for name in rank0)
    # LoRA merged into the attention projections; the embeddings carry no adapter
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(rank0[name], original[name])
    name = "bert.embeddings.word_embeddings.weight"
    torch.testing.assert_close(rank0[name], original[name], rtol=0, atol=0)
    assert len(results(out)["after"]["per_layer_relative_error"]) == 2


@pytest.mark.skipif(torch.accelerator.is_available(), reason="with accelerators the FSDP config shards for real")
def test_fsdp_config_on_cpu_stops_with_a_clear_error(tiny_checkpoints, recipe_env, tmp_path):
    """Accelerate drops the FSDP plugin on CPU and would silently train plain DDP: the recipe refuses instead."""
    from accelerate.test_utils.testing import get_launch_command

    out = tmp_path / "fsdp"
    command = [
        *get_launch_command(config_file=str(RECIPES / "configs" / "fsdp.yaml")),
        RECIPES / "finetune_classification.py", "--model_name_or_path", tiny_checkpoints["bert"], "--method", "rfa",
        "--train_file", FIXTURES / "classification_train.csv", "--max_train_steps", "1", "--output_dir", out,
    ]  # fmt: skip
    env = {**recipe_env, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(list(map(str, command)), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert (
        "finetune_classification.py: error: The Accelerate config asks for FSDP, but on this machine Accelerate runs "
        "MULTI_CPU (no GPU: FSDP is not available on CPU)" in done.stderr
    )
    assert not (out / "model.safetensors").exists()
