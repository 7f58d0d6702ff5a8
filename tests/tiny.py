"""Tiny random checkpoints (with a real tokenizer) standing in for pretrained models in the fidelity/hub/CLI tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import transformers

WORDS = "the a cat dog sat on mat ran to park big small red blue and then it was".split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
TEXTS = ["the cat sat on the mat", "a big red dog ran to the park and then sat", "it was blue"]
BERT = dict(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24)
GPT2 = dict(vocab_size=len(VOCAB), n_embd=16, n_layer=2, n_head=2, n_positions=64, bos_token_id=2, eos_token_id=3)
# small settings that still approximate (not exact) on these short inputs
HPARAMS = {
    "rfa": {"num_features": 8},
    "lara": {"num_landmarks": 2},
    "eva": {"window_size": 2, "num_chunks": 4, "chunk_size": 1},
}


def tokenizer(folder: Path) -> transformers.BertTokenizer:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return transformers.BertTokenizer(str(folder / "vocab.txt"))


def save_bert(folder: Path, seed: int = 0) -> Path:
    """A tiny `BertForMaskedLM` and its tokenizer saved in `folder`."""
    torch.manual_seed(seed)
    model = transformers.BertForMaskedLM(transformers.BertConfig(**BERT))
    model.save_pretrained(folder)
    tokenizer(folder).save_pretrained(folder)
    return folder


def batch(tok, texts=TEXTS) -> dict[str, torch.Tensor]:
    enc = tok(list(texts), padding=True, return_tensors="pt")
    return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}


def run_python(code: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (so `huggingface_hub` reads `env` at import), from the repository root."""
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=Path(__file__).parents[1],
    )
