"""sentence-transformers models: convert the Transformer module in place, keep every other module.

A sentence-transformers folder is `modules.json` plus one folder per module (`1_Pooling/`, `2_Normalize/`, ...),
`sentence_bert_config.json` (`max_seq_length`, `do_lower_case`) and the Hugging Face model at the root. Converting
only the inner `PreTrainedModel` and saving it with `save_pretrained` would drop all of that, and
`SentenceTransformer(out)` would silently fall back to mean pooling without normalisation. So the
`SentenceTransformer` is converted as a whole and saved with its own `save`:

>>> from sentence_transformers import SentenceTransformer
>>> st = SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2", device="cpu")
>>> convert_sentence_transformer(st, "lara", num_landmarks=8)
>>> st.save("minilm-lara")  # SentenceTransformer("minilm-lara") has the same Pooling, Normalize, max_seq_length
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedModel

from .convert import convert

#: Module types a converted folder may name in `modules.json`: sentence-transformers' own classes. Loading a folder
#: imports the classes it names, so anything else (which would run another package's import-time code) is refused.
TRUSTED_MODULE_PREFIX = "sentence_transformers."


def is_sentence_transformer_folder(path: str | Path) -> bool:
    """True when `path` is a local folder saved by sentence-transformers (it has a `modules.json`)."""
    return (Path(path) / "modules.json").is_file()


def check_modules(path: str | Path) -> list[dict[str, Any]]:
    """The entries of `path/modules.json`, after checking that each names a sentence-transformers class.

    Raises:
        `ValueError` for a malformed `modules.json` or a module type outside `sentence_transformers`.
    """
    file = Path(path) / "modules.json"
    try:
        modules = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{file} is not a readable sentence-transformers module list: {error}") from None
    if not isinstance(modules, list) or not all(
        isinstance(m, dict) and isinstance(m.get("type"), str) for m in modules
    ):
        raise ValueError(f"{file} must be a JSON list of modules with a `type` each.")
    foreign = [m["type"] for m in modules if not m["type"].startswith(TRUSTED_MODULE_PREFIX)]
    if foreign:
        raise ValueError(
            f"{file} names module types outside sentence-transformers ({', '.join(foreign)}); hf_lara only loads "
            "folders made of sentence-transformers' own modules, so that loading one imports no other code."
        )
    return modules


def transformer_folder(path: str | Path) -> Path:
    """The folder of the Transformer module of a sentence-transformers folder: the root, or `0_Transformer/` in
    folders saved by older versions."""
    for module in check_modules(path):
        if module["type"].rsplit(".", 1)[-1] == "Transformer":
            return Path(path) / module.get("path", "")
    return Path(path)


def load_sentence_transformer(path: str | Path, device: str = "cpu"):
    """`SentenceTransformer(path)` for a local folder, after `check_modules`.

    No remote code is trusted and the Transformer module reads safetensors weights only (never a pickle file).
    """
    from sentence_transformers import SentenceTransformer

    check_modules(path)
    return SentenceTransformer(
        str(path),
        device=device,
        trust_remote_code=False,
        local_files_only=True,
        model_kwargs={"use_safetensors": True},
    )


def transformer_model(st_model: nn.Module) -> PreTrainedModel:
    """The Hugging Face model inside a `SentenceTransformer` (its first module with an `auto_model`)."""
    for module in st_model.children():
        inner = getattr(module, "auto_model", None)
        if isinstance(inner, PreTrainedModel):
            return inner
    raise ValueError(
        f"`st_model` ({type(st_model).__name__}) holds no Transformer module with a Hugging Face model "
        "(`auto_model`); pass a `SentenceTransformer` built on a Transformers checkpoint."
    )


def convert_sentence_transformer(
    st_model: nn.Module, method: str, layers: list[int] | None = None, **hparams: Any
) -> nn.Module:
    """Convert the self-attention of a `SentenceTransformer`'s Transformer module in place (see `hf_lara.convert`).

    Pooling, normalisation, `max_seq_length` and the tokenizer are kept, so `st_model.encode` and
    `st_model.save(folder)` work as before; `SentenceTransformer(folder)` loads the converted model back (with
    `import hf_lara` done first, which registers the converted architectures).

    Args:
        st_model (`SentenceTransformer`): the model to convert.
        method (`str`): the estimator (`hf_lara.available_methods()`).
        layers (`list[int]`, *optional*): self-attention layers to convert (default: all).
        **hparams: the estimator's hyper-parameters.

    Returns:
        `st_model`, converted.
    """
    convert(transformer_model(st_model), method, layers=layers, **hparams)
    return st_model
