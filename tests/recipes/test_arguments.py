"""Bad arguments fail with a clear message before any training starts (in-process: `parse_args`/`training_function`)."""

from __future__ import annotations

import pytest

from .conftest import FIXTURES, load_recipe

TEXT_RECIPES = ("distill_attention", "finetune_clm", "finetune_classification")
ALL_RECIPES = (*TEXT_RECIPES, "finetune_image_classification")
CSV = ("--train_file", str(FIXTURES / "classification_train.csv"))
TXT = ("--train_file", str(FIXTURES / "text_train.txt"))


def base_args(checkpoint, out, *extra):
    return ["--model_name_or_path", checkpoint, "--output_dir", str(out), *extra]


@pytest.mark.parametrize("name", ALL_RECIPES)
def test_no_dataset(name, tiny_checkpoints, tmp_path):
    recipe = load_recipe(name)
    with pytest.raises(ValueError, match="No training data: pass `--dataset_name`"):
        recipe.parse_args(base_args(tiny_checkpoints["bert"], tmp_path, "--method", "kernel"))


@pytest.mark.parametrize("name", ALL_RECIPES)
def test_unknown_method(name, tiny_checkpoints, tmp_path, capsys):
    recipe = load_recipe(name)
    with pytest.raises(SystemExit):
        recipe.parse_args(base_args(tiny_checkpoints["bert"], tmp_path, *TXT, "--method", "performer"))
    error = capsys.readouterr().err
    assert "argument --method: invalid choice: 'performer'" in error and "kernel" in error


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ("--method", "kernel", "--hparam", "bogus=1"),
            "Unknown hyper-parameter 'bogus' for method `kernel`; valid: feature_map",
        ),
        (("--method", "kernel", "--hparam", "feature_map"), "takes KEY=VALUE"),
        (("--method", "eva", "--hparam", "window_size=6", "--hparam", "chunk_size=4"), "multiple of `chunk_size`"),
        (("--method", "kernel", "--layers", "5"), "`--layers` must be indices below 2"),
        ((), "is not an hf_lara-converted checkpoint"),
        (("--method", "kernel", "--checkpointing_steps", "often"), "`--checkpointing_steps` must be"),
        (("--method", "kernel", "--per_device_train_batch_size", "0"), "`--per_device_train_batch_size` must be"),
    ],
    ids=[
        "unknown-hparam",
        "not-key-value",
        "bad-hparam-value",
        "bad-layer",
        "base-without-method",
        "checkpointing",
        "batch",
    ],
)
def test_bad_conversion_and_training_args(extra, message, tiny_checkpoints, tmp_path):
    recipe = load_recipe("finetune_classification")
    with pytest.raises(ValueError, match=message):
        recipe.parse_args(base_args(tiny_checkpoints["bert"], tmp_path, *CSV, *extra))


def test_bad_files(tiny_checkpoints, tmp_path):
    recipe = load_recipe("finetune_clm")
    with pytest.raises(ValueError, match="`--train_file` must be a csv, json, jsonl, txt file"):
        recipe.parse_args(
            base_args(tiny_checkpoints["llama"], tmp_path, "--method", "rfa", "--train_file", "data.parquet")
        )
    with pytest.raises(ValueError, match="does not exist"):
        recipe.parse_args(
            base_args(tiny_checkpoints["llama"], tmp_path, "--method", "rfa", "--train_file", "missing.txt")
        )
    image = load_recipe("finetune_image_classification")
    with pytest.raises(ValueError, match="`--train_dir` 'nowhere' is not a folder"):
        image.parse_args(base_args(tiny_checkpoints["vit"], tmp_path, "--method", "rfa", "--train_dir", "nowhere"))


@pytest.mark.parametrize(
    ("name", "checkpoint", "extra", "message"),
    [
        (
            "distill_attention",
            "bert",
            (*TXT, "--text_column_name", "body"),
            "`--text_column_name` 'body' is not a column",
        ),
        ("finetune_clm", "llama", (*CSV, "--text_column_name", "text"), "`--text_column_name` 'text' is not a column"),
        ("finetune_classification", "bert", (*CSV, "--label_column_name", "class"), "`--label_column_name` 'class'"),
        (
            "finetune_classification",
            "bert",
            ("--train_file", str(FIXTURES / "untitled_texts.json")),
            "No text column found",
        ),
    ],
    ids=["distill-text", "clm-text", "classification-label", "classification-no-text"],
)
def test_missing_columns(name, checkpoint, extra, message, tiny_checkpoints, tmp_path):
    recipe = load_recipe(name)
    args = recipe.parse_args(base_args(tiny_checkpoints[checkpoint], tmp_path / "out", "--method", "kernel", *extra))
    with pytest.raises(ValueError, match=message):
        recipe.training_function(args)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize(
    ("method", "method_args"),
    [("rfa", []), ("softmax", []), ("rfa", ["learn_features=false", "window_size=2"])],
    ids=["rfa", "softmax", "rfa-window"],
)
def test_distill_nothing_to_train(method, method_args, tiny_checkpoints, tmp_path):
    """Estimators without parameters (fixed random features, softmax) are refused."""
    recipe = load_recipe("distill_attention")
    extra = ["--method", method, *[a for item in method_args for a in ("--hparam", item)], *TXT]
    args = recipe.parse_args(base_args(tiny_checkpoints["bert"], tmp_path / "out", *extra))
    with pytest.raises(ValueError, match=f"Nothing to train: the `{method}` estimators"):
        recipe.training_function(args)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_hparams_and_layers_use_the_package_parser(tiny_checkpoints, tmp_path):
    """`--hparam` values are typed as in `hf-lara convert` (`adaptive=False` used to become the string "False",
    which the estimator read as True) and `--layers` is `0,1` as in the CLI."""
    recipe = load_recipe("finetune_classification")
    extra = ("--method", "lara", "--hparam", "adaptive=False", "--hparam", "num_landmarks=4", "--layers", "0,1")
    extra += ("--layer_hparam", "1:num_landmarks=8", "--layer-hparam", "1:adaptive=true")
    args = recipe.parse_args(base_args(tiny_checkpoints["bert"], tmp_path, *CSV, *extra))
    assert args.hparams == {"adaptive": False, "num_landmarks": 4} and args.layers == [0, 1]
    assert args.layer_hparams == {1: {"num_landmarks": 8, "adaptive": True}}
    with pytest.raises(
        ValueError, match=r"`--layer_hparam` must be indices below 2 \(the model's layers\), got \[7\]"
    ):
        recipe.parse_args(
            base_args(
                tiny_checkpoints["bert"], tmp_path, *CSV, "--method", "lara", "--layer_hparam", "7:num_landmarks=8"
            )
        )
    with pytest.raises(ValueError, match="`--layer_hparam` and `--layers` need `--method`"):
        recipe.parse_args(base_args(tiny_checkpoints["bert"], tmp_path, *CSV, "--layer_hparam", "1:num_landmarks=8"))
    with pytest.raises(ValueError, match=r"`adaptive` must be a boolean \(true, false, 1 or 0\), got 'no'"):
        recipe.parse_args(
            base_args(tiny_checkpoints["bert"], tmp_path, *CSV, "--method", "lara", "--hparam", "adaptive=no")
        )
    with pytest.raises(SystemExit):  # `0 1` is not the layer syntax: argparse refuses the stray `1`
        recipe.parse_args(
            base_args(tiny_checkpoints["bert"], tmp_path, *CSV, "--method", "lara", "--layers", "0", "1")
        )


@pytest.mark.parametrize(
    ("name", "flags"),
    [
        (
            "finetune_classification",
            ["--task_name", "--max_length", "--pad_to_max_length", "--train_file", "--validation_file"],
        ),
        ("finetune_clm", ["--dataset_name", "--block_size", "--no_keep_linebreaks", "--validation_split_percentage"]),
        ("distill_attention", ["--max_seq_length", "--dataset_config_name", "--preprocessing_num_workers"]),
        (
            "finetune_image_classification",
            ["--train_dir", "--validation_dir", "--train_val_split", "--image_column_name"],
        ),
    ],
)
def test_names_follow_transformers_no_trainer_scripts(name, flags, capsys):
    """The flags of Transformers' `run_*_no_trainer.py` counterparts, plus the shared training ones."""
    with pytest.raises(SystemExit):
        load_recipe(name).parse_args(["--help"])
    help_text = capsys.readouterr().out
    shared = [
        "--per_device_train_batch_size",
        "--learning_rate",
        "--num_train_epochs",
        "--gradient_accumulation_steps",
    ]
    shared += ["--checkpointing_steps", "--resume_from_checkpoint", "--output_dir", "--seed", "--with_tracking"]
    shared += ["--report_to", "--max_train_steps", "--lr_scheduler_type", "--num_warmup_steps", "--hub_model_id"]
    for flag in [*flags, *shared]:
        assert f"{flag} " in help_text or f"{flag}\n" in help_text, flag


def test_find_unused_parameters_sees_per_layer_hparams(tiny_checkpoints, tmp_path):
    """A converted checkpoint whose shared estimator has no parameters but one layer's has (EVA without / with
    adaptive projections) still needs DDP's `find_unused_parameters`."""
    import argparse

    import transformers

    import hf_lara

    recipe_utils = load_recipe("finetune_classification")  # imports `estimators_have_parameters` by name
    model = transformers.AutoModel.from_pretrained(tiny_checkpoints["bert"])
    for name, layer_hparams in [("shared", {}), ("layer1", {1: {"adaptive": True}})]:
        hf_lara.convert(model, "eva", adaptive=False, layer_hparams=layer_hparams)
        model.save_pretrained(tmp_path / name)
    probe = argparse.Namespace(method=None, hparams={}, layer_hparams={}, layers=None)
    assert not recipe_utils.estimators_have_parameters(
        argparse.Namespace(**vars(probe), model_name_or_path=tmp_path / "shared")
    )
    assert recipe_utils.estimators_have_parameters(
        argparse.Namespace(**vars(probe), model_name_or_path=tmp_path / "layer1")
    )
    # converting in the recipe (`--method eva --hparam adaptive=false [--layer_hparam 1:adaptive=true]`)
    base = argparse.Namespace(method="eva", hparams={"adaptive": False}, layers=None)
    for layer_hparams, expected in [({}, False), ({1: {"adaptive": True}}, True)]:
        args = argparse.Namespace(
            **vars(base), layer_hparams=layer_hparams, model_name_or_path=tiny_checkpoints["bert"]
        )
        assert recipe_utils.estimators_have_parameters(args) is expected
