"""Tiny random models of every built-in family, saved once per session as stand-ins for pretrained checkpoints."""

from __future__ import annotations

import pytest
import torch

from .utils import SETUPS


@pytest.fixture(scope="session")
def base_checkpoints(tmp_path_factory) -> dict[str, str]:
    """Family -> folder of a tiny randomly initialised model of the family's head class, like a Hub checkpoint."""
    root = tmp_path_factory.mktemp("base")
    paths = {}
    for name, setup in SETUPS.items():
        torch.manual_seed(1234)
        model = setup.auto_class.from_config(setup.config())
        path = root / name
        model.save_pretrained(path)
        paths[name] = str(path)
    return paths
