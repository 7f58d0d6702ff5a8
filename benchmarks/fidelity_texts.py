"""Licence-clean text for `bench_fidelity.py`, built offline from installed sources (no download, no import of them).

* **Evaluation**: docstrings of Python's standard library (PSF licence), read with `ast` from `sysconfig`'s stdlib.
* **Training**: docstrings of numpy (BSD-3-Clause), torch (BSD-3-Clause) and transformers (Apache-2.0).

The two sources are disjoint by construction (different packages). Documents are docstrings of one source file
joined in file order until they reach a token-count target; short texts are single sentences of those docstrings.
"""

from __future__ import annotations

import ast
import random
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path

TRAIN_PACKAGES = ("numpy", "torch", "transformers")


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return []
    nodes = [
        tree,
        *(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef)),
    ]
    texts = []
    for node in nodes:
        doc = ast.get_docstring(node)
        if doc:
            # prose only: drop doctest lines and markup-heavy lines, collapse whitespace
            lines = [ln for ln in doc.splitlines() if not ln.strip().startswith((">>>", "...", "..", ":"))]
            text = " ".join(" ".join(lines).split())
            if len(text.split()) >= 8:
                texts.append(text)
    return texts


def _files(roots: list[Path], exclude: tuple[str, ...] = ()) -> Iterator[Path]:
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).parts
            if any(p in exclude for p in parts):
                continue
            yield path


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "test", "tests", "idlelib", "lib2to3", "ensurepip", "__pycache__", "turtledemo")
    return list(_files([root], skip))


def training_files() -> list[Path]:
    import importlib.util

    roots = []
    for name in TRAIN_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            roots.append(Path(list(spec.submodule_search_locations)[0]))
    return list(_files(roots, ("tests", "testing", "__pycache__")))


def documents(files: list[Path], tokenizer, low: int, high: int, count: int, seed: int) -> list[str]:
    """Up to `count` documents of `low`..`high` tokens, each made of consecutive docstrings of one file."""
    rng = random.Random(seed)
    files = list(files)
    rng.shuffle(files)
    docs = []
    target_words = int((low + high) / 2 / 1.7)
    for path in files:
        parts, words = [], 0
        for text in _docstrings(path):
            parts.append(text)
            words += len(text.split())
            if words >= target_words:
                doc = " ".join(parts)
                n = len(tokenizer(doc, truncation=False)["input_ids"])
                if low <= n <= high:
                    docs.append(doc)
                elif n > high:
                    # cut to the word count that fits
                    cut = " ".join(doc.split()[: int(len(doc.split()) * high / n * 0.95)])
                    if low <= len(tokenizer(cut)["input_ids"]) <= high:
                        docs.append(cut)
                break
        if len(docs) >= count:
            break
    return docs


_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def sentences(files: list[Path], tokenizer, low: int, high: int, count: int, seed: int) -> list[str]:
    """Up to `count` distinct sentences of `low`..`high` tokens, at most two per file."""
    rng = random.Random(seed)
    files = list(files)
    rng.shuffle(files)
    out, seen = [], set()
    for path in files:
        taken = 0
        for text in _docstrings(path):
            for sentence in _SENTENCE.split(text):
                if sentence in seen or not re.search(r"[a-z]{3}", sentence):
                    continue
                n = len(tokenizer(sentence)["input_ids"])
                if low <= n <= high:
                    out.append(sentence)
                    seen.add(sentence)
                    taken += 1
                if taken >= 2:
                    break
            if taken >= 2:
                break
        if len(out) >= count:
            break
    return out
