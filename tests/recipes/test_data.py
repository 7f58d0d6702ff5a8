"""Data: GLUE through `datasets` (`--task_name`), and problems with the user's files reported by the recipe itself,
as one line naming the file and the column, before any training (in-process: `main`)."""

from __future__ import annotations

import csv

import pytest
import transformers
from datasets import ClassLabel, Dataset, Features, Value

from .conftest import FIXTURES, load_recipe

GLUE_CARD = """---
configs:
- config_name: sst2
  data_files:
  - split: train
    path: sst2/train-*
  - split: validation
    path: sst2/validation-*
---
"""


def run_main(name, argv, capsys) -> str:
    """`main(argv)` must exit with code 2; returns the last line of stderr (the recipe's message)."""
    with pytest.raises(SystemExit) as exit_info:
        load_recipe(name).main([str(a) for a in argv])
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def write(path, text: str):
    path.write_text(text)
    return path


def classification_args(checkpoint, out, train, validation=None):
    extra = ["--validation_file", validation] if validation is not None else []
    return ["--model_name_or_path", checkpoint, "--method", "rfa", "--train_file", train, *extra, "--output_dir", out]


def test_empty_and_rowless_files(tiny_checkpoints, tmp_path, capsys):
    empty = write(tmp_path / "empty.csv", "")
    line = run_main("finetune_classification", classification_args(tiny_checkpoints["bert"], tmp_path, empty), capsys)
    assert line == f"finetune_classification.py: error: `--train_file` '{empty}' is empty."
    header = write(tmp_path / "header.csv", "sentence,label\n")
    args = classification_args(tiny_checkpoints["bert"], tmp_path, FIXTURES / "classification_train.csv", header)
    line = run_main("finetune_classification", args, capsys)
    assert line.startswith(f"finetune_classification.py: error: `--validation_file` '{header}' has no rows")
    text = write(tmp_path / "empty.txt", "")
    args = ["--model_name_or_path", tiny_checkpoints["llama"], "--method", "rfa", "--train_file", text]
    line = run_main("finetune_clm", [*args, "--output_dir", tmp_path], capsys)
    assert line == f"finetune_clm.py: error: `--train_file` '{text}' is empty."


def test_empty_image_folder(tiny_checkpoints, tmp_path, capsys):
    (tmp_path / "train" / "red").mkdir(parents=True)
    args = ["--model_name_or_path", tiny_checkpoints["vit"], "--method", "rfa", "--train_dir", tmp_path / "train"]
    line = run_main("finetune_image_classification", [*args, "--output_dir", tmp_path / "out"], capsys)
    assert line.startswith(
        f"finetune_image_classification.py: error: `--train_dir` '{tmp_path / 'train'}' holds no images (it needs one sub-folder"
    )


def test_train_and_validation_columns_differ(tiny_checkpoints, tmp_path, capsys):
    validation = write(tmp_path / "dev.csv", "text,label\nA fine day.,positive\n")
    args = classification_args(tiny_checkpoints["bert"], tmp_path, FIXTURES / "classification_train.csv", validation)
    line = run_main("finetune_classification", args, capsys)
    assert line.startswith(
        f"finetune_classification.py: error: `--validation_file` '{validation}' lacks column 'sentence', unlike "
        f"`--train_file` '{FIXTURES / 'classification_train.csv'}'"
    )


def test_missing_column_names_the_file(tiny_checkpoints, tmp_path, capsys):
    train = write(tmp_path / "train.csv", "sentence,target\nA fine day.,positive\nA bad day.,negative\n")
    args = classification_args(tiny_checkpoints["bert"], tmp_path, train, train)
    line = run_main("finetune_classification", args, capsys)
    assert line.startswith(
        f"finetune_classification.py: error: `--label_column_name` 'label' is not a column of `--train_file` '{train}'"
    )
    line = run_main("finetune_clm", [*args[:2], "--method", "rfa", "--train_file", train, "--output_dir", tmp_path,
                                     "--text_column_name", "body"], capsys)  # fmt: skip
    assert line.startswith(
        f"finetune_clm.py: error: `--text_column_name` 'body' is not a column of `--train_file` '{train}'"
    )


def local_glue(root):
    """A local copy of GLUE's sst2 laid out as on the Hub (parquet per config, `ClassLabel` labels, a card's
    `configs`), built from the fixture csv; `load_dataset(root, "sst2")` reads it as it reads `nyu-mll/glue`."""
    features = Features({"sentence": Value("string"), "label": ClassLabel(names=["negative", "positive"])})
    for split in ("train", "validation"):
        with open(FIXTURES / f"classification_{split}.csv") as f:
            rows = list(csv.DictReader(f))
        data = {"sentence": [r["sentence"] for r in rows], "label": [int(r["label"] == "positive") for r in rows]}
        (root / "sst2").mkdir(parents=True, exist_ok=True)
        Dataset.from_dict(data, features=features).to_parquet(root / "sst2" / f"{split}-00000-of-00001.parquet")
    write(root / "README.md", GLUE_CARD)
    return root


def test_glue_task_through_datasets(tiny_checkpoints, tmp_path):
    """`--task_name sst2` reads GLUE with `datasets` (here a local copy via `--dataset_name`): columns from the task,
    label names from its `ClassLabel`, `--max_length`/`--pad_to_max_length` as in `run_glue_no_trainer.py`."""
    recipe = load_recipe("finetune_classification")
    out = tmp_path / "out"
    args = recipe.parse_args(
        [
            "--model_name_or_path", tiny_checkpoints["bert"], "--method", "rfa", "--hparam", "num_features=8",
            "--task_name", "sst2", "--dataset_name", str(local_glue(tmp_path / "glue")),
            "--max_length", "24", "--pad_to_max_length", "--max_train_steps", "2", "--output_dir", str(out),
        ]
    )  # fmt: skip
    recipe.training_function(args)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    with pytest.raises(SystemExit):
        recipe.parse_args(["--model_name_or_path", "x", "--output_dir", "o", "--task_name", "stsb"])
