"""`hf_lara.cards`: rendering, offline validation, `ModelCard.load` round trip, idempotent updates, packaging."""

from __future__ import annotations

import copy
import zipfile
from pathlib import Path

import pytest
import torch
import transformers
from huggingface_hub import EvalResult, ModelCard

import hf_lara
from hf_lara.cards import (
    REPO_PLACEHOLDER,
    auto_class_name,
    build_card,
    is_hf_lara_card,
    template_path,
    update_card,
    validate_card,
)
from hf_lara.fidelity import attention_fidelity

from . import tiny

ROOT = Path(__file__).parents[1]
EVAL = EvalResult(
    task_type="fill-mask",
    dataset_type="wikitext",
    dataset_name="WikiText-2",
    metric_type="perplexity",
    metric_value=9.5,
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tok = tiny.tokenizer(tmp_path_factory.mktemp("tok"))
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(transformers.BertConfig(**tiny.BERT)).eval()
    hf_lara.convert(model, "lara", layers=[1], num_landmarks=2)
    return model, attention_fidelity(model, tiny.batch(tok))


def test_template_copies_are_identical():
    # model_cards/ is the canonical copy; the package ships hf_lara/templates/ (found when installed)
    assert (ROOT / "model_cards" / template_path().name).read_text() == template_path().read_text()


def test_card_content(converted):
    model, report = converted
    card = build_card(model, base_model="org/base-model", fidelity=report, eval_results=[EVAL], license="apache-2.0")
    validate_card(card)
    data = card.data.to_dict()
    assert data["base_model"] == "org/base-model" and data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "fill-mask"
    assert data["tags"] == ["hf-lara", "linear-attention", "lara"]
    assert data["hf_lara"]["method"] == "lara" and data["hf_lara"]["hparams"] == {"num_landmarks": 2}
    assert data["hf_lara"]["layers"] == [1]
    assert data["hf_lara"]["fidelity"]["attention_error"][1] == pytest.approx(report.attention_error[1], rel=1e-3)
    assert card.data.eval_results[0].metric_value == 9.5 and data["model-index"][0]["name"] == "base-model-lara"
    text = card.text
    for needle in (
        "`num_landmarks=2`",
        "[1] (1 converted)",
        "LaraBertForMaskedLM",
        f"| attention rel. MSE | 0 | {report.attention_error[1]:.3g} |",
        "| embedding_cosine |",
        "zero-shot conversion",
        "| fill-mask | WikiText-2 | perplexity | 9.5 |",
        "pip install hf-lara",
        "import hf_lara",
        "from transformers import AutoModelForMaskedLM",
        f'AutoModelForMaskedLM.from_pretrained("{REPO_PLACEHOLDER}")',
        "Random Feature Attention",
        "Linear Complexity Randomized Self-attention Mechanism",
        "Efficient Attention via Control Variates",
    ):
        assert needle in text, needle


def test_minimal_card_validates(converted):
    model, _ = converted
    card = build_card(model.config)
    validate_card(card)
    assert "base_model" not in card.data.to_dict() and "Not measured yet" in card.text
    assert "model-index" not in card.data.to_dict()


def test_round_trip_through_model_card_load(converted, tmp_path):
    model, report = converted
    card = build_card(model, base_model="org/base-model", fidelity=report, eval_results=[EVAL], recipe="Distilled.")
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    validate_card(loaded)
    assert str(loaded) == str(card)
    assert loaded.data.to_dict() == card.data.to_dict()
    assert loaded.data.eval_results[0].metric_value == 9.5 and is_hf_lara_card(loaded)


def test_update_is_idempotent_and_keeps_facts(converted):
    model, report = converted
    card = build_card(model, base_model="org/base-model", recipe="Distilled for 1 epoch.", eval_results=[EVAL])
    with_fidelity = update_card(card, model.config, fidelity=report)
    assert update_card(with_fidelity, model.config).text == with_fidelity.text
    pushed = update_card(with_fidelity, model.config, repo_id="me/tiny-lara")
    assert 'from_pretrained("me/tiny-lara")' in pushed.text
    assert update_card(pushed, model.config).text == pushed.text  # the repo id is kept too
    data = pushed.data.to_dict()
    assert data["base_model"] == "org/base-model" and data["hf_lara"]["recipe"] == "Distilled for 1 epoch."
    assert data["hf_lara"]["fidelity"] == with_fidelity.data.to_dict()["hf_lara"]["fidelity"]
    assert pushed.data.eval_results[0].metric_value == 9.5
    with pytest.raises(ValueError, match="not written by hf_lara"):
        update_card(ModelCard("---\nlicense: mit\n---\n# hi\n"), model.config)


def test_card_says_which_layers_keep_softmax_and_why(tmp_path):
    tok = tiny.tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**tiny.BERT)).eval()
    hf_lara.convert(model, "rfa", num_features=8, keep_softmax=1, calibration=tiny.batch(tok))
    report = model.lara_calibration
    (kept,) = report.kept_softmax
    assert report.errors[kept] == max(report.errors.values())
    card = build_card(model)  # the model's `lara_calibration` by default
    validate_card(card)
    record = card.data.to_dict()["hf_lara"]["calibration"]
    assert record["kept_softmax"] == [kept] and record["num_tokens"] == report.num_tokens
    assert record["errors"] == {str(k): pytest.approx(e, rel=1e-3) for k, e in report.errors.items()}
    assert f"**Kept on exact softmax** (quadratic in the length): layer {kept}. `keep_softmax=1` chose" in card.text
    assert f"**{record['errors'][str(kept)]}** (softmax)" in card.text
    assert f"on {report.num_tokens} calibration tokens" in card.text
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    with_fidelity = update_card(loaded, model.config, fidelity=attention_fidelity(model, tiny.batch(tok)))
    assert with_fidelity.data.to_dict()["hf_lara"]["calibration"] == record
    assert "**Kept on exact softmax**" in with_fidelity.text
    plain = build_card(hf_lara.convert(transformers.BertModel(transformers.BertConfig(**tiny.BERT)), "rfa"))
    assert "calibration" not in plain.data.to_dict()["hf_lara"] and "Kept on exact softmax" not in plain.text


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("# no front matter\n", "no YAML front matter"),
        ("---\n- a\n- b\n---\nbody\n", "must be a YAML mapping"),
        ("---\nlibrary_name: transformers\ntags: hf-lara\nhf_lara: {method: rfa}\n---\n", "tags"),
        ("---\nlibrary_name: transformers\ntags: [x]\nhf_lara: {method: rfa}\n---\n", "hf-lara"),
        ("---\ntags: [hf-lara]\nhf_lara: {method: rfa}\n---\n", "library_name"),
        ("---\nlibrary_name: transformers\ntags: [hf-lara]\n---\n", "record"),
        (
            "---\nlibrary_name: transformers\ntags: [hf-lara]\nhf_lara: {method: rfa}\nbase_model: 'not a//repo'\n---\n",
            "base_model",
        ),
        (
            "---\nlibrary_name: transformers\ntags: [hf-lara]\nhf_lara: {method: rfa}\n"
            "model-index:\n- name: x\n  results:\n  - task: {}\n---\n",
            "model.index",
        ),
    ],
)
def test_validation_rejects(text, match):
    with pytest.raises(ValueError, match=match):
        validate_card(text)


def test_bad_inputs(converted):
    model, _ = converted
    with pytest.raises(ValueError, match="converted config"):
        build_card(transformers.BertConfig(**tiny.BERT))
    with pytest.raises(ValueError, match="base_model"):
        build_card(model, base_model="no spaces allowed/here !")


def test_auto_class_names(converted):
    model, _ = converted
    assert auto_class_name(model.config, "LaraBertForMaskedLM") == "AutoModelForMaskedLM"
    assert auto_class_name(model.config, "LaraBertModel") == "AutoModel"
    gpt2 = hf_lara.convert(transformers.GPT2LMHeadModel(transformers.GPT2Config(**tiny.GPT2)), "rfa")
    assert auto_class_name(gpt2.config, type(gpt2).__name__) == "AutoModelForCausalLM"
    saved = copy.deepcopy(gpt2.config)
    saved.architectures = ["LaraGPT2LMHeadModel"]
    assert auto_class_name(saved) == "AutoModelForCausalLM"


def test_wheel_ships_template_and_sentences(tmp_path):
    """A non-editable build carries the card template and the demo sentences inside the package."""
    import shutil
    import subprocess
    import sys

    # build from a copy, so that no build/ folder lands in the checkout
    source = tmp_path / "src"
    shutil.copytree(ROOT / "hf_lara", source / "hf_lara", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {result.stderr.strip().splitlines()[-1:]}")
    (wheel,) = tmp_path.glob("hf_lara-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "hf_lara/templates/hf_lara_model_card.md" in names
    assert "hf_lara/data/demo_sentences.txt" in names
