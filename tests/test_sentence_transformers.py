"""sentence-transformers: the real package and the real all-MiniLM-L6-v2 (Transformer + mean Pooling + Normalize).

Converting a `SentenceTransformer` (Python API) or a sentence-transformers folder (`hf-lara convert`) must give a
folder that `SentenceTransformer(out)` loads with the same modules; fidelity pools through sentence-transformers.
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from sentence_transformers import SentenceTransformer

import hf_lara
from hf_lara.demo import demo_sentences, minilm_path
from hf_lara.integration.sentence_transformers import (
    check_modules,
    convert_sentence_transformer,
    load_sentence_transformer,
    transformer_model,
)

from . import tiny
from .hub_server import LocalHub
from .test_cli import run_main

TEXTS = demo_sentences()[:8]


@pytest.fixture(scope="module")
def original():
    return SentenceTransformer(str(minilm_path()), device="cpu").eval()


@pytest.fixture(scope="module")
def reference(original):
    return original.encode(TEXTS, convert_to_tensor=True)


def module_layout(st_model) -> list:
    """Module classes with their saved configuration, and `max_seq_length`."""
    return [
        *[(type(m).__name__, getattr(m, "get_config_dict", dict)()) for m in list(st_model)[1:]],
        st_model.max_seq_length,
    ]


def test_python_api_save_and_load(original, reference, tmp_path):
    torch.manual_seed(0)
    converted = convert_sentence_transformer(copy.deepcopy(original), "rfa", num_features=32)
    assert transformer_model(converted).config.lara_method == "rfa"
    in_memory = converted.encode(TEXTS, convert_to_tensor=True)
    converted.save(str(tmp_path / "out"))
    loaded = SentenceTransformer(str(tmp_path / "out"), device="cpu")
    assert [type(m).__name__ for m in loaded] == ["Transformer", "Pooling", "Normalize"]
    assert module_layout(loaded) == module_layout(original) and loaded.max_seq_length == 256
    embeddings = loaded.encode(TEXTS, convert_to_tensor=True)
    torch.testing.assert_close(embeddings, in_memory, rtol=0, atol=1e-6)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(len(TEXTS)), rtol=0, atol=1e-5)
    # an approximation, not the original: the test can tell them apart
    assert (embeddings - reference).abs().max() > 1e-3


def test_cli_softmax_conversion_equals_the_original(original, reference, tmp_path, capsys):
    out = tmp_path / "out"
    code, text, err = run_main(["convert", str(minilm_path()), str(out), "--method", "softmax"], capsys)
    assert code == 0, err
    assert "sentence-transformers modules kept" in text
    loaded = SentenceTransformer(str(out), device="cpu")
    assert module_layout(loaded) == module_layout(original)
    layout = [[(m["path"], m["type"].rsplit(".", 1)[1]) for m in json.loads((f / "modules.json").read_text())]
              for f in (out, minilm_path())]  # fmt: skip
    assert layout[0] == layout[1] == [("", "Transformer"), ("1_Pooling", "Pooling"), ("2_Normalize", "Normalize")]
    embeddings = loaded.encode(TEXTS, convert_to_tensor=True)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(len(TEXTS)), rtol=0, atol=1e-5)
    # exact softmax in hf_lara's attention vs SDPA: float32 rounding only
    torch.testing.assert_close(embeddings, reference, rtol=0, atol=1e-5)
    assert "sentence-transformers" in (out / "README.md").read_text()


def cosine(a, b) -> float:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).mean().item()


def test_fidelity_pools_through_sentence_transformers(tmp_path, capsys):
    """A CLS-pooled copy of MiniLM: the reported embedding cosine is that of the models' own `encode`."""
    src = tmp_path / "cls"
    # the large files are linked (a source may hold links), the configuration copied to be edited
    shutil.copytree(minilm_path(), src, ignore=shutil.ignore_patterns("*.safetensors", "tokenizer.json"))
    for name in ("model.safetensors", "tokenizer.json"):
        (src / name).symlink_to(minilm_path() / name)
    pooling = json.loads((src / "1_Pooling" / "config.json").read_text())
    pooling.update(pooling_mode_cls_token=True, pooling_mode_mean_tokens=False)
    (src / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    out = tmp_path / "out"
    code, _, err = run_main(["convert", str(src), str(out), "--method", "lara", "--num_landmarks", "4"], capsys)
    assert code == 0, err
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n")
    code, _, err = run_main(
        ["fidelity", str(out), "--text-file", str(texts), "--json", str(tmp_path / "r.json")], capsys
    )
    assert code == 0, err
    reported = json.loads((tmp_path / "r.json").read_text())["metrics"]["embedding_cosine"]
    teacher = SentenceTransformer(str(src), device="cpu").encode(TEXTS, convert_to_tensor=True)
    student = SentenceTransformer(str(out), device="cpu").encode(TEXTS, convert_to_tensor=True)
    expected = cosine(student, teacher)
    assert reported == pytest.approx(expected, abs=1e-5)
    # what mean pooling would have reported differs well beyond that tolerance
    teacher_mean = SentenceTransformer(str(minilm_path()), device="cpu")
    student_mean = load_sentence_transformer(out)
    student_mean[1] = teacher_mean[1]  # mean pooling, same converted Transformer
    mean_cosine = cosine(
        student_mean.encode(TEXTS, convert_to_tensor=True), teacher_mean.encode(TEXTS, convert_to_tensor=True)
    )
    assert abs(mean_cosine - expected) > 1e-4


def test_foreign_module_types_are_refused_before_import(tmp_path, capsys):
    """A modules.json naming a class outside sentence-transformers is refused: loading it would import that code."""
    src = tmp_path / "st"
    src.mkdir()
    for name in ("config.json", "modules.json", "sentence_bert_config.json"):
        shutil.copy(minilm_path() / name, src / name)
    modules = json.loads((src / "modules.json").read_text())
    modules[1]["type"] = "evil_package.Pooling"
    (src / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match="evil_package.Pooling"):
        check_modules(src)
    code, _, err = run_main(["convert", str(src), str(tmp_path / "out"), "--method", "rfa"], capsys)
    assert code == 2 and "outside sentence-transformers" in err and not (tmp_path / "out").exists()


def test_convert_returns_the_same_object(original):
    st_model = copy.deepcopy(original)
    assert convert_sentence_transformer(st_model, "softmax") is st_model
    assert isinstance(transformer_model(st_model), hf_lara.LaraModelMixin)
    with pytest.raises(ValueError, match="auto_model"):
        transformer_model(torch.nn.Sequential(torch.nn.Linear(2, 2)))


PUSH_SENTENCE_TRANSFORMER = """
import json, sys, torch, hf_lara
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
from hf_lara.hub import push_to_hub
from hf_lara.integration.sentence_transformers import convert_sentence_transformer
texts = ["the cat sat on the mat", "a big red dog ran to the park and then sat", "it was blue"]
modules = [Transformer(sys.argv[1], max_seq_length=12), Pooling(16, pooling_mode="cls"), Normalize()]
st = SentenceTransformer(modules=modules, device="cpu")
torch.manual_seed(0)
convert_sentence_transformer(st, "rfa", num_features=8)
result = push_to_hub(st, "tester/tiny-st")
remote = SentenceTransformer("tester/tiny-st", device="cpu")
same = torch.equal(st.encode(texts, convert_to_tensor=True), remote.encode(texts, convert_to_tensor=True))
layout = [type(m).__name__ for m in remote] + [remote.max_seq_length, remote[1].get_config_dict()["pooling_mode"]]
# the inner Hugging Face model, in memory, with its tokenizer
import transformers
from hf_lara.integration.sentence_transformers import transformer_model
inner = transformer_model(st)
push_to_hub(inner, "tester/tiny-hf", tokenizer=st.tokenizer)
loaded = transformers.AutoModel.from_pretrained("tester/tiny-hf").eval()
batch = transformers.AutoTokenizer.from_pretrained("tester/tiny-hf")(texts, padding=True, return_tensors="pt")
with torch.no_grad():
    inner_same = torch.equal(loaded(**batch).last_hidden_state, inner(**batch).last_hidden_state)
# `hf-lara convert HUB_ID OUT` of a sentence-transformers repository keeps its modules
from huggingface_hub import HfApi
from hf_lara.cli import main
plain = SentenceTransformer(modules=[Transformer(sys.argv[1], max_seq_length=12), Pooling(16, pooling_mode="cls"),
                                     Normalize()], device="cpu")
plain.save(sys.argv[2] + "/plain")
HfApi().create_repo("tester/plain-st")
HfApi().upload_folder(repo_id="tester/plain-st", folder_path=sys.argv[2] + "/plain")
assert main(["convert", "tester/plain-st", sys.argv[2] + "/out", "--method", "softmax"]) == 0
converted = SentenceTransformer(sys.argv[2] + "/out", device="cpu")
hub_layout = [type(m).__name__ for m in converted] + [converted.max_seq_length]
reference = SentenceTransformer("tester/plain-st", device="cpu").encode(texts, convert_to_tensor=True)
hub_error = (converted.encode(texts, convert_to_tensor=True) - reference).abs().max().item()
print(json.dumps({"files": result.files, "same": same, "layout": layout, "inner_same": inner_same,
                  "hub_layout": hub_layout, "hub_error": hub_error}))
"""


def test_push_an_in_memory_sentence_transformer_and_convert_a_hub_id(tmp_path):
    """`push_to_hub(st)` uploads sentence-transformers' own save; `SentenceTransformer(repo)` gets the same model;
    `hf-lara convert user/st-repo OUT` keeps the repository's modules."""
    src = tiny.save_bert(tmp_path / "tiny-bert")
    with LocalHub() as hub:
        code = f"import sys; sys.argv = ['x', {str(src)!r}, {str(tmp_path)!r}]" + PUSH_SENTENCE_TRANSFORMER
        proc = tiny.run_python(code, hub.env(HF_HOME=str(tmp_path / "hf")))
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        readme = hub.files("tester/tiny-st")["README.md"].decode()
    assert out["same"] and out["layout"] == ["Transformer", "Pooling", "Normalize", 12, "cls"] and out["inner_same"]
    assert {"modules.json", "1_Pooling/config.json", "sentence_bert_config.json"} <= set(out["files"])
    assert "- sentence-transformers" in readme and "hf-lara" in readme
    # converted from a Hub id: the same modules, and softmax equals the original up to float32 rounding
    assert out["hub_layout"] == ["Transformer", "Pooling", "Normalize", 12] and out["hub_error"] < 1e-5
    assert "base_model: tester/plain-st" in (tmp_path / "out" / "README.md").read_text()
