"""The Accelerate configs in `recipes/configs/` load with Accelerate's own parser and point at valid DeepSpeed files."""

from __future__ import annotations

import json

import pytest
from accelerate.commands.config.config_args import ClusterConfig

from .conftest import ROOT

CONFIGS = ROOT / "recipes" / "configs"
EXPECTED = {
    "cpu": "NO",
    "single_gpu": "NO",
    "multi_gpu": "MULTI_GPU",
    "fsdp": "FSDP",
    "deepspeed_zero2": "DEEPSPEED",
    "deepspeed_zero3": "DEEPSPEED",
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads(name):
    config = ClusterConfig.from_yaml_file(str(CONFIGS / f"{name}.yaml"))  # unknown keys raise
    assert config.distributed_type.value == EXPECTED[name]
    if name == "fsdp":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        # full state dicts resume with torch.load(weights_only=True); sharded ones through DCP's pickled metadata
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    if name.startswith("deepspeed"):
        stage = int(name[-1])
        path = ROOT / config.deepspeed_config["deepspeed_config_file"]
        settings = json.loads(path.read_text())
        assert settings["zero_optimization"]["stage"] == stage
        # batch sizes and accumulation come from the recipe's arguments
        assert settings["train_micro_batch_size_per_gpu"] == settings["gradient_accumulation_steps"] == "auto"
        if stage == 3:
            assert settings["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
