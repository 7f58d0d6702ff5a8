"""`hf_lara/arguments.py`: one parser for hyper-parameters and layers, used by `hf-lara` and the recipes."""

from __future__ import annotations

import pytest

from hf_lara.arguments import flags_as_hparams, parse_bool, parse_hparams, parse_layers, parse_method_hparams
from hf_lara.attention import build_attention
from hf_lara.cli import main


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("TRUE", True), ("True", True), ("1", True), ("false", False), ("False", False), ("0", False)],
)
def test_bool_spellings(text, expected):
    assert parse_bool(text, "adaptive") is expected


@pytest.mark.parametrize("text", ["yes", "no", "2", "", "t", "on", "truee"])
def test_bool_rejects_everything_else(text):
    with pytest.raises(ValueError, match=r"`adaptive` must be a boolean \(true, false, 1 or 0\)"):
        parse_bool(text, "adaptive")


def test_values_take_the_declared_types():
    # `adaptive=False` used to reach the estimator as the string "False", which bool() read as True
    hparams = parse_hparams(["adaptive=False", "num_landmarks=32", "alpha_coeff=1", "mis=opt", "redraw=1"], "lara")
    assert hparams == {"adaptive": False, "num_landmarks": 32, "alpha_coeff": 1.0, "mis": "opt", "redraw": True}
    assert type(hparams["alpha_coeff"]) is float and type(hparams["num_landmarks"]) is int
    assert parse_hparams(["num_features=none"], "kernel") == {"num_features": None}
    assert parse_hparams(["num_features=16"], "kernel") == {"num_features": 16}
    assert parse_hparams(["window_size=4", "window_size=8"], "eva") == {"window_size": 8}


@pytest.mark.parametrize(
    ("items", "method", "message"),
    [
        (["adaptive=yes"], "lara", "`adaptive` must be a boolean"),
        (["num_features=many"], "rfa", "`num_features` must be an integer, got 'many'"),
        (["alpha_coeff=big"], "lara", "`alpha_coeff` must be a number"),
        (["bogus=1"], "kernel", "Unknown hyper-parameter 'bogus' for method `kernel`; valid: feature_map, "),
        (["num_features"], "rfa", "`--hparam` takes KEY=VALUE"),
        (["=3"], "rfa", "`--hparam` takes KEY=VALUE"),
        (["x=1"], "performer", "Unknown attention method 'performer'. Valid methods: eva, kernel, lara"),
    ],
)
def test_bad_hparams(items, method, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_hparams(items, method)


def test_method_hparams():
    assert parse_method_hparams(["eva.window_size=32", "lara.adaptive=TRUE", "eva.adaptive=0"]) == {
        "eva": {"window_size": 32, "adaptive": False},
        "lara": {"adaptive": True},
    }
    with pytest.raises(ValueError, match="takes METHOD.KEY=VALUE"):
        parse_method_hparams(["window_size=32"])


def test_layers_one_syntax():
    assert parse_layers("0,2") == [0, 2] and parse_layers("3") == [3] and parse_layers("0, 2,") == [0, 2]
    for bad in ("0 2", "a,b", "-1", ""):
        with pytest.raises(ValueError, match="`--layers` takes comma-separated layer indices"):
            parse_layers(bad)


def test_flags_as_hparams():
    assert flags_as_hparams(["--window-size", "16", "--adaptive=false"]) == ["window_size=16", "adaptive=false"]
    with pytest.raises(ValueError, match="needs a value"):
        flags_as_hparams(["--window_size"])


@pytest.mark.parametrize(
    ("method", "name", "value"),
    [("lara", "adaptive", "false"), ("lara", "redraw", 1), ("eva", "adaptive", "true"), ("rfa", "orthogonal", 0)],
)
def test_estimators_check_types(method, name, value):
    """The Python API refuses non-booleans instead of coercing them with bool() (`'false'` used to mean True)."""
    with pytest.raises(TypeError, match=f"`{name}` must be True or False, got {value!r}"):
        build_attention(method, num_heads=2, head_dim=8, **{name: value})
    assert getattr(build_attention(method, num_heads=2, head_dim=8, **{name: False}), name) is False


def test_cli_uses_the_parser(tmp_path, capsys):
    """`convert` and `bench` read values through `hf_lara.arguments` (typed, strict booleans) before loading."""
    convert = ["convert", str(tmp_path / "missing"), str(tmp_path / "out"), "--method", "lara"]
    assert main([*convert, "--hparam", "adaptive=yes"]) == 2
    assert "`adaptive` must be a boolean (true, false, 1 or 0), got 'yes'" in capsys.readouterr().err
    assert main([*convert, "--adaptive", "maybe"]) == 2
    assert "`adaptive` must be a boolean" in capsys.readouterr().err
    assert main([*convert, "--layers", "0 2"]) == 2
    assert "`--layers` takes comma-separated layer indices" in capsys.readouterr().err
    assert main(["bench", "--hparam", "eva.adaptive=maybe", "--lengths", "8"]) == 2
    assert "`adaptive` must be a boolean" in capsys.readouterr().err
