"""Per-layer hyper-parameters (`layer_hparams`, saved as `config.lara_layer_hparams`): each converted layer gets
the shared hyper-parameters updated by its own entry, through `convert`, `from_pretrained`, save/load and the CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers

import hf_lara
from hf_lara.arguments import parse_layer_hparams
from hf_lara.cli import main
from hf_lara.fidelity import attention_fidelity

from .utils import SETUPS, assert_close, hparams, load_base, make_inputs, run

# a window covering the 9-token inputs makes EVA exact softmax (bidirectional and causal)
EXACT_EVA = {"window_size": 16, "chunk_size": 2}


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_an_override_applies_to_its_layer_only(family, base_checkpoints):
    """Layer 1 overridden to a window covering the input is exact softmax; layer 0 keeps the shared budget."""
    setup = SETUPS[family]
    inputs = make_inputs(setup)
    base = load_base(setup, base_checkpoints[family])
    model = hf_lara.convert(copy.deepcopy(base), "eva", layer_hparams={1: EXACT_EVA}, **hparams("eva"))
    assert model.config.lara_layer_hparams == {"1": EXACT_EVA}
    assert {i: e.window_size for i, e in model.lara_estimators().items()} == {0: hparams("eva")["window_size"], 1: 16}
    # each layer fed the teacher's hidden states and compared with softmax on the same queries, keys and values
    errors = attention_fidelity(model, inputs).attention_error
    shared = attention_fidelity(hf_lara.convert(copy.deepcopy(base), "eva", **hparams("eva")), inputs)
    assert errors[1] < 1e-10 < shared.attention_error[1]
    assert errors[0] == pytest.approx(shared.attention_error[0], rel=1e-5) and errors[0] > 1e-7
    all_exact = hf_lara.convert(
        copy.deepcopy(base), "eva", layer_hparams={0: EXACT_EVA, 1: EXACT_EVA}, **hparams("eva")
    )
    assert_close(run(all_exact, inputs), run(base, inputs))


def test_save_load_keeps_per_layer_shapes(base_checkpoints, tmp_path):
    setup = SETUPS["bert"]
    inputs = make_inputs(setup)
    model = hf_lara.convert(
        load_base(setup, base_checkpoints["bert"]), "rfa", num_features=8, layer_hparams={1: {"num_features": 24}}
    )
    assert {i: e.num_features for i, e in model.lara_estimators().items()} == {0: 8, 1: 24}
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["lara_layer_hparams"] == {"1": {"num_features": 24}}
    loaded = setup.auto_class.from_pretrained(tmp_path).eval()
    assert {i: e.num_features for i, e in loaded.lara_estimators().items()} == {0: 8, 1: 24}
    assert torch.equal(run(loaded, inputs), run(model, inputs))


def test_from_pretrained_builds_each_layer_from_its_own_hparams(base_checkpoints):
    """Estimators missing from the checkpoint are initialised as their own layer's fresh estimator (shapes differ)."""
    setup = SETUPS["bert"]
    path = base_checkpoints["bert"]
    config = hf_lara.LaraConfig.from_pretrained(
        path, method="kernel", feature_map="hedgehog", num_features=8, layer_hparams={0: {"num_features": 12}}
    )
    model = setup.auto_class.from_pretrained(path, config=config).eval()
    maps = {i: e.feature_map.weight.shape for i, e in model.lara_estimators().items()}
    assert maps[0][1] == 12 and maps[1][1] == 8
    assert torch.isfinite(run(model, make_inputs(setup))).all()


def test_an_old_config_without_the_field_loads(base_checkpoints, tmp_path):
    setup = SETUPS["bert"]
    model = hf_lara.convert(load_base(setup, base_checkpoints["bert"]), "rfa", num_features=8)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved.pop("lara_layer_hparams", None)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = setup.auto_class.from_pretrained(tmp_path)
    assert loaded.config.lara_layer_hparams == {}


@pytest.mark.parametrize(
    ("layer_hparams", "kwargs", "match"),
    [
        (
            {7: {"num_features": 8}},
            {},
            r"`layer_hparams` keys must be indices below 2 \(the model's attention layers\), got \[7\]",
        ),
        ({1: {}}, {"layers": [0]}, r"layer\(s\) \[1\], which are not converted"),
        ({"first": {}}, {}, "keyed by layer indices"),
        ({1: {"num_featurez": 8}}, {}, r"Unknown hyper-parameter.*'num_featurez'.*\(layer 1\).*num_features"),
        ({1: {"num_features": -3}}, {}, "in layer 1.*num_features"),
    ],
)
def test_bad_layer_hparams_raise_before_the_model_changes(base_checkpoints, layer_hparams, kwargs, match):
    model = load_base(SETUPS["bert"], base_checkpoints["bert"])
    with pytest.raises(ValueError, match=match):
        hf_lara.convert(model, "rfa", layer_hparams=layer_hparams, **kwargs)
    assert type(model) is transformers.BertForMaskedLM


def test_keep_softmax_drops_the_entries_of_kept_layers(base_checkpoints):
    setup = SETUPS["bert"]
    inputs = make_inputs(setup)
    model = hf_lara.convert(
        load_base(setup, base_checkpoints["bert"]),
        "rfa",
        num_features=2,
        layer_hparams={0: {"num_features": 4}, 1: {"num_features": 6}},
        keep_softmax=1,
        calibration=[inputs],
    )
    (kept,) = model.lara_calibration.kept_softmax
    overrides = {0: {"num_features": 4}, 1: {"num_features": 6}}
    assert model.config.lara_layer_hparams == {str(1 - kept): overrides[1 - kept]}
    assert model.config.lara_layers == [1 - kept]


def test_parse_layer_hparams():
    assert parse_layer_hparams(["5:num_chunks=128", "5:adaptive=false", "0:window_size=8"], "eva") == {
        5: {"num_chunks": 128, "adaptive": False},
        0: {"window_size": 8},
    }
    for item in ["num_chunks=128", "x:num_chunks=1", "5:num_chunks"]:
        with pytest.raises(ValueError, match="LAYER:KEY=VALUE"):
            parse_layer_hparams([item], "eva")
    with pytest.raises(ValueError, match="Unknown hyper-parameter 'nope'"):
        parse_layer_hparams(["5:nope=1"], "eva")


def test_cli_convert_writes_layer_hparams_to_config_and_card(base_checkpoints, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["convert", base_checkpoints["bert"], str(out), "--method", "rfa", "--hparam", "num_features=8"]
    assert main([*argv, "--layer-hparam", "1:num_features=16"]) == 0
    assert json.loads((out / "config.json").read_text())["lara_layer_hparams"] == {"1": {"num_features": 16}}
    assert "| hyper-parameters of layer 1 | `num_features=16` |" in (out / "README.md").read_text()
    capsys.readouterr()
    assert main(["fidelity", str(out), "--num-samples", "4"]) == 0  # names the per-layer overrides too
    assert "`rfa` {'num_features': 8}, layer 1: {'num_features': 16} on 4 texts" in capsys.readouterr().out
    assert main([*argv, "--layer-hparam", "2:num_features=16", "--overwrite"]) == 2
