"""Shared helpers of the integration tests: tiny configs of every built-in family, small hyper-parameters."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
from transformers.utils import logging

import hf_lara

os.environ.setdefault("HF_HUB_OFFLINE", "1")
logging.set_verbosity_error()
logging.disable_progress_bar()

# Small settings that still cross chunk, window and landmark boundaries on 9-token inputs.
HPARAMS: dict[str, dict[str, Any]] = {
    "softmax": {},
    "rfa": {"num_features": 16, "chunk_size": 4},
    "ra": {},
    "lara": {"num_landmarks": 3, "chunk_size": 4},
    "eva": {"window_size": 4, "num_chunks": 2, "chunk_size": 2},
    "kernel": {"feature_map": "hedgehog", "num_features": 8, "chunk_size": 4},
}
METHODS = hf_lara.available_methods()
SEQ_LEN = 9
VOCAB = 99

TEXT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
DECODER = dict(TEXT, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
VISION = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    image_size=12,
    patch_size=4,
    num_labels=3,
)


@dataclass(frozen=True)
class Setup:
    """One family: how to build its tiny config, which Auto class to load it with, what kind of input it takes."""

    name: str
    config_class: type
    config_kwargs: dict = field(hash=False)
    auto_class: type
    kind: str  # "encoder", "decoder" or "vision"

    def config(self) -> transformers.PreTrainedConfig:
        return self.config_class(**self.config_kwargs)

    def __repr__(self) -> str:
        return self.name


SETUPS = {
    "bert": Setup(
        "bert",
        transformers.BertConfig,
        dict(TEXT, max_position_embeddings=64),
        transformers.AutoModelForMaskedLM,
        "encoder",
    ),
    "roberta": Setup(
        "roberta",
        transformers.RobertaConfig,
        dict(TEXT, max_position_embeddings=64, pad_token_id=1),
        transformers.AutoModelForSequenceClassification,
        "encoder",
    ),
    "distilbert": Setup(
        "distilbert",
        transformers.DistilBertConfig,
        dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=64),
        transformers.AutoModel,
        "encoder",
    ),
    "gpt2": Setup(
        "gpt2",
        transformers.GPT2Config,
        dict(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            scale_attn_by_inverse_layer_idx=True,
        ),
        transformers.AutoModelForCausalLM,
        "decoder",
    ),
    "llama": Setup(
        "llama",
        transformers.LlamaConfig,
        dict(DECODER, num_key_value_heads=2),
        transformers.AutoModelForCausalLM,
        "decoder",
    ),
    "mistral": Setup(
        "mistral",
        transformers.MistralConfig,
        dict(DECODER, num_key_value_heads=1, sliding_window=None),
        transformers.AutoModelForCausalLM,
        "decoder",
    ),
    "qwen2": Setup(
        "qwen2",
        transformers.Qwen2Config,
        dict(DECODER, num_key_value_heads=2),
        transformers.AutoModelForCausalLM,
        "decoder",
    ),
    "vit": Setup("vit", transformers.ViTConfig, VISION, transformers.AutoModelForImageClassification, "vision"),
    # AutoModelForImageClassification maps DeiT to two classes and picks one by `architectures`
    "deit": Setup(
        "deit",
        transformers.DeiTConfig,
        dict(VISION, architectures=["DeiTForImageClassification"]),
        transformers.AutoModelForImageClassification,
        "vision",
    ),
}
FAMILIES = list(SETUPS)


def hparams(method: str, **overrides) -> dict[str, Any]:
    return {**HPARAMS.get(method, {}), **overrides}


def make_inputs(setup: Setup, batch: int = 2, seq_len: int = SEQ_LEN, seed: int = 0) -> dict[str, torch.Tensor]:
    """Unpadded inputs: token ids avoiding special ids 0-2, or pixel values."""
    g = torch.Generator().manual_seed(seed)
    if setup.kind == "vision":
        size = setup.config_kwargs["image_size"]
        return {"pixel_values": torch.randn(batch, 3, size, size, generator=g)}
    ids = torch.randint(3, VOCAB, (batch, seq_len), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def main_output(outputs) -> torch.Tensor:
    """The head's output (logits) or the last hidden state of a bare model."""
    return outputs.logits if getattr(outputs, "logits", None) is not None else outputs.last_hidden_state


def run(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return main_output(model(**inputs))


def load_base(setup: Setup, path: str, **kwargs):
    return setup.auto_class.from_pretrained(path, **kwargs).eval()


def load_converted(setup: Setup, path: str, method: str, layers=None, **overrides):
    config = hf_lara.LaraConfig.from_pretrained(path, method=method, layers=layers, **hparams(method, **overrides))
    return setup.auto_class.from_pretrained(path, config=config).eval()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-5, msg: str = ""):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{msg}\n{m}")
