"""The text builders of `benchmarks/fidelity_texts.py`: packing docstrings into documents of a token range, the
prose of package descriptions, the licence filter of the broad training source, and the unseen documents of
`bench_fidelity_sweep.py` (never a training document)."""

from __future__ import annotations

import email.message

import pytest

from .benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def texts():
    return load_benchmark("fidelity_texts")


class WordTokenizer:
    """One token per whitespace-separated word (so token counts are word counts)."""

    def __call__(self, text: str, truncation: bool = False) -> dict:
        return {"input_ids": list(range(len(text.split())))}


def test_pack_joins_parts_until_the_word_target_and_keeps_a_document_in_range(texts):
    # low 17, high 34: target int(25.5 / 1.7) = 15 words; 6 + 6 < 15 <= 6 + 6 + 6 = 18 words, in range
    parts = ["a b c d e f", "g h i j k l", "m n o p q r", "never reached"]
    doc, more = texts._pack(iter(parts), WordTokenizer(), 17, 34)
    assert doc == "a b c d e f g h i j k l m n o p q r"
    assert more


def test_pack_cuts_a_document_over_the_range_and_reports_exhausted_parts(texts):
    # target int((10 + 20) / 2 / 1.7) = 8 words; one part of 40 words > 20: cut to int(40 * 20 / 40 * 0.95) = 19
    words = [f"w{i}" for i in range(40)]
    doc, more = texts._pack(iter([" ".join(words)]), WordTokenizer(), 10, 20)
    assert doc == " ".join(words[:19])
    assert more
    assert texts._pack(iter(["too few words"]), WordTokenizer(), 10, 20) == (None, False)


def test_documents_take_one_document_per_file(texts, tmp_path):
    # two files of four 8-word docstrings each; low 20, high 40 -> target int(30 / 1.7) = 17 words: 8 + 8 < 17 <=
    # 8 + 8 + 8 = 24 words, in range, so the module docstring and the next two
    paths = []
    for name in ("a", "b"):
        docs = [f"{name} {k} word word word word word word" for k in range(3)]
        body = "".join(f'def f{k}():\n    """{d}"""\n\n' for k, d in enumerate(docs))
        path = tmp_path / f"{name}.py"
        path.write_text(f'"""{name} module docstring has eight words in it."""\n\n{body}')
        paths.append(path)
    out = texts.documents(paths, WordTokenizer(), 20, 40, count=5, seed=0)
    assert sorted(out) == sorted(
        [
            f"{n} module docstring has eight words in it. {n} 0 word word word word word word "
            f"{n} 1 word word word word word word"
            for n in ("a", "b")
        ]
    )


def test_prose_paragraphs_keep_running_text_only(texts):
    description = "\n".join(
        [
            "Project title",
            "=============",
            "",
            "This package reads [fonts](https://example.org/fonts) and writes them back out",
            "again, see https://example.org for details about everything.",
            "",
            "```python",
            "import package  # code is not prose at all, even long lines of it",
            "```",
            "",
            ".. image:: https://example.org/badge.svg",
            "",
            "    indented code block that is long enough to be a paragraph of text",
            "",
            "| a | table | row | with | many | cells | in | it |",
            "",
            "## Short heading",
            "",
            "The second paragraph of the description has enough words to be kept here.",
        ]
    )
    assert texts._prose_paragraphs(description) == [
        "This package reads fonts and writes them back out again, see for details about everything.",
        "The second paragraph of the description has enough words to be kept here.",
    ]


def _distribution(**fields: str | list[str]):
    meta = email.message.Message()
    for key, value in fields.items():
        for v in value if isinstance(value, list) else [value]:
            meta[key.replace("_", "-")] = v

    class Distribution:
        metadata = meta

    return Distribution()


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"License_Expression": "MIT"}, True),
        ({"License_Expression": "Apache-2.0 OR BSD-2-Clause"}, True),
        ({"Classifier": ["License :: OSI Approved :: BSD License"]}, True),
        ({"License": "PSF-2.0"}, True),
        ({"License_Expression": "MPL-2.0 AND MIT"}, False),
        ({"Classifier": ["License :: OSI Approved :: GNU General Public License v3 (GPLv3)"]}, False),
        ({"License": "Proprietary"}, False),
        ({}, False),
    ],
)
def test_permissive_accepts_permissive_licences_only(texts, fields, expected):
    assert texts._permissive(_distribution(**fields)) is expected


def test_broad_distributions_leave_out_the_skipped_ones(texts):
    names = {d.metadata["Name"].lower().replace("_", "-") for d in texts._broad_distributions()}
    assert not names & {n.replace("_", "-") for n in texts.BROAD_SKIP}
    assert all(texts._permissive(d) for d in texts._broad_distributions())


def test_unseen_documents_skip_training_documents_and_repeats(monkeypatch):
    sweep = load_benchmark("bench_fidelity_sweep")
    train = [f"doc{i}" for i in range(4)]
    # the source repeats a training document and one of its own past the training prefix
    later = ["doc1", "new0", "new0", "new1", "doc3", "new2", "new3"]
    monkeypatch.setattr(sweep, "training_files", lambda: [])
    monkeypatch.setattr(sweep, "documents", lambda files, tok, low, high, count, seed: (train + later)[:count])
    monkeypatch.setattr(sweep.Sizes, "num_unseen", 3)

    class Tokenizer:
        model_max_length = 512

    assert sweep.unseen_documents(Tokenizer(), train) == ["new0", "new1", "new2"]
    monkeypatch.setattr(sweep.Sizes, "num_unseen", 5)
    with pytest.raises(RuntimeError, match="expected 5 unseen documents, found 4"):
        sweep.unseen_documents(Tokenizer(), train)


def test_every_training_source_is_named_in_the_fidelity_report():
    bench = load_benchmark("bench_fidelity")
    assert set(bench.TRAIN_SOURCE_NAMES) == set(load_benchmark("fidelity_texts").TRAIN_SOURCES)
