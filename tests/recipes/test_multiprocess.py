"""Two real processes (`torchrun --nproc_per_node 2`, gloo on CPU) distil attention with DDP."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from .conftest import FIXTURES, RECIPES, results, step_losses


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
        "--method", "kernel", "--method_args", "feature_map=hedgehog", "num_features=8",
        "--train_file", FIXTURES / "text_train.txt", "--validation_file", FIXTURES / "text_validation.txt",
        "--max_seq_length", "32", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
        "--max_train_steps", "6", "--learning_rate", "2e-2", "--logging_steps", "1",
        "--output_dir", out,
    ]  # fmt: skip
    env = {**recipe_env, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(list(map(str, command)), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    stdout = done.stdout + done.stderr

    assert "on 2 process(es) (MULTI_CPU)" in stdout
    losses = step_losses(stdout)
    print(f"\nDDP (2 processes) distillation losses: {losses}")
    assert sorted(losses) == list(range(1, 7))
    assert losses[6] < losses[1]
    # each rank's weights, and the saved model, are identical
    rank0, rank1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    assert rank0.keys() == rank1.keys()
    changed = 0
    for name, tensor in rank0.items():
        torch.testing.assert_close(rank1[name], tensor, rtol=0, atol=0, msg=name)
    saved = load_file(out / "model.safetensors")
    for name, tensor in saved.items():
        torch.testing.assert_close(tensor, rank0[name], rtol=0, atol=0, msg=name)
    original = load_file(Path(tiny_checkpoints["bert"]) / "model.safetensors")
    for name, tensor in rank0.items():
        if ".lara_attention." in name:
            changed += 1
        elif name in original:
            torch.testing.assert_close(tensor, original[name], rtol=0, atol=0, msg=f"frozen {name} changed")
    assert changed > 0
    assert len(results(out)["after"]["per_layer_relative_error"]) == 2
