"""The one command-line convention of hf_lara, shared by `hf-lara convert`, `hf-lara bench` and every recipe.

- Hyper-parameters: `--hparam KEY=VALUE`, repeatable (`--hparam METHOD.KEY=VALUE` in `bench`, which runs several
  methods). Where a command accepts them (`convert`), `--KEY VALUE` and `--KEY=VALUE` mean the same.
- Each value is read with the type the estimator declares for it (the annotations of its `__init__`):
  booleans take `true`/`false`/`1`/`0` in any case and nothing else; integers and floats must parse as such;
  optional values take `none`.
- Layers: `--layers 0,2`, comma-separated indices.
- Per-layer hyper-parameters: `--layer-hparam LAYER:KEY=VALUE`, repeatable, e.g. `--layer-hparam 5:num_chunks=128`.

Every problem is a `ValueError` naming the flag, the value received and what is accepted.

>>> from hf_lara.arguments import parse_hparams, parse_layers
>>> parse_hparams(["adaptive=FALSE", "num_landmarks=32"], "lara")
{'adaptive': False, 'num_landmarks': 32}
>>> parse_layers("0,2")
[0, 2]
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from collections.abc import Sequence
from typing import Any

from .attention import available_methods
from .attention.base import ESTIMATORS

#: Spellings of booleans, compared case-insensitively.
TRUE_WORDS, FALSE_WORDS = ("true", "1"), ("false", "0")
#: Spellings of `None` for optional hyper-parameters.
NONE_WORDS = ("none", "null")
#: Constructor arguments of every estimator that are not hyper-parameters.
NOT_HPARAMS = ("self", "num_heads", "head_dim", "return")


def parse_bool(text: str, name: str) -> bool:
    """`true`/`1` -> True, `false`/`0` -> False (any case); anything else is a `ValueError` naming `name`."""
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"`{name}` must be a boolean (true, false, 1 or 0), got {text!r}.")


def hparam_types(method: str) -> dict[str, Any]:
    """`{name: annotation}` of the hyper-parameters `method`'s estimator declares, e.g. `{'adaptive': bool, ...}`."""
    if method not in ESTIMATORS:
        raise ValueError(f"Unknown attention method {method!r}. Valid methods: {', '.join(available_methods())}.")
    hints = typing.get_type_hints(ESTIMATORS[method].__init__)
    return {name: hint for name, hint in hints.items() if name not in NOT_HPARAMS}


def parse_value(text: str, hint: Any, name: str) -> Any:
    """`text` read as the annotated type `hint` (`bool`, `int`, `float`, `str`, `X | None`; else JSON)."""
    options = (
        typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else ()
    )
    if options:
        if type(None) in options and text.strip().lower() in NONE_WORDS:
            return None
        concrete = [option for option in options if option is not type(None)]
        return parse_value(text, concrete[0] if len(concrete) == 1 else Any, name)
    if hint is bool:
        return parse_bool(text, name)
    if hint is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"`{name}` must be an integer, got {text!r}.") from None
    if hint is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"`{name}` must be a number, got {text!r}.") from None
    if hint is str:
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def split_item(item: str, flag: str = "--hparam") -> tuple[str, str]:
    """`"KEY=VALUE"` -> `("KEY", "VALUE")`, refusing items without `=` or without a key."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"`{flag}` takes KEY=VALUE, e.g. `{flag} num_features=64`, got {item!r}.")
    return key, value.strip()


def parse_hparams(items: Sequence[str] | None, method: str) -> dict[str, Any]:
    """`["num_features=32", "redraw=true"]` -> `{"num_features": 32, "redraw": True}` for `method`.

    Keys must be hyper-parameters of `method`; values take their declared types. A key given twice keeps the last.
    """
    types_ = hparam_types(method)
    hparams = {}
    for item in items or []:
        key, value = split_item(item)
        if key not in types_:
            valid = ", ".join(types_) or "none"
            raise ValueError(f"Unknown hyper-parameter {key!r} for method `{method}`; valid: {valid}.")
        hparams[key] = parse_value(value, types_[key], key)
    return hparams


def parse_method_hparams(items: Sequence[str] | None) -> dict[str, dict[str, Any]]:
    """`["eva.window_size=32", "lara.adaptive=true"]` -> `{"eva": {"window_size": 32}, "lara": {"adaptive": True}}`."""
    grouped: dict[str, list[str]] = {}
    for item in items or []:
        method, dot, rest = item.partition(".")
        if not dot or "=" not in rest or "=" in method:
            raise ValueError(f"`--hparam` takes METHOD.KEY=VALUE, e.g. `--hparam eva.window_size=32`, got {item!r}.")
        grouped.setdefault(method.strip(), []).append(rest)
    return {method: parse_hparams(rest, method) for method, rest in grouped.items()}


def add_layer_hparam(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """`--layer-hparam LAYER:KEY=VALUE` (also `--layer_hparam`; repeatable, read by `parse_layer_hparams`)."""
    parser.add_argument(
        "--layer-hparam",
        "--layer_hparam",
        dest="layer_hparam",
        action="append",
        metavar="LAYER:KEY=VALUE",
        help="hyper-parameter of one converted layer, overriding --hparam there (repeatable), e.g. 5:num_chunks=128",
    )


def parse_layer_hparams(items: Sequence[str] | None, method: str) -> dict[int, dict[str, Any]]:
    """`["5:num_chunks=128", "5:window_size=32"]` -> `{5: {"num_chunks": 128, "window_size": 32}}` for `method`."""
    grouped: dict[int, list[str]] = {}
    for item in items or []:
        layer, colon, rest = item.partition(":")
        if not colon or not layer.strip().isdigit() or "=" not in rest:
            raise ValueError(
                f"`--layer-hparam` takes LAYER:KEY=VALUE, e.g. `--layer-hparam 5:num_chunks=128`, got {item!r}."
            )
        grouped.setdefault(int(layer), []).append(rest)
    return {layer: parse_hparams(rest, method) for layer, rest in grouped.items()}


def parse_layers(text: str, name: str = "--layers") -> list[int]:
    """`"0,2"` -> `[0, 2]`: comma-separated, non-negative, at least one."""
    try:
        layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"`{name}` takes comma-separated layer indices such as `0,2`, got {text!r}.") from None
    if not layers or min(layers) < 0:
        raise ValueError(f"`{name}` takes comma-separated layer indices >= 0 such as `0,2`, got {text!r}.")
    return layers


def parse_ints(text: str, name: str, minimum: int = 0) -> list[int]:
    """`"512,2048"` -> `[512, 2048]`, every value at least `minimum`."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"`{name}` takes comma-separated integers, got {text!r}.") from None
    if not values or min(values) < minimum:
        raise ValueError(f"`{name}` takes comma-separated integers >= {minimum}, got {text!r}.")
    return values


def flags_as_hparams(extras: Sequence[str]) -> list[str]:
    """`["--window_size", "16", "--adaptive=false"]` -> `["window_size=16", "adaptive=false"]` (dashes read as `_`)."""
    items, rest = [], list(extras)
    while rest:
        flag = rest.pop(0)
        if not flag.startswith("--") or len(flag) == 2:
            raise ValueError(
                f"Unrecognized argument {flag!r}; hyper-parameters are `--KEY VALUE` or `--hparam KEY=VALUE`."
            )
        key, sep, value = flag[2:].partition("=")
        if not sep:
            if not rest or rest[0].startswith("--"):
                raise ValueError(f"Hyper-parameter `--{key}` needs a value.")
            value = rest.pop(0)
        items.append(f"{key.replace('-', '_')}={value}")
    return items
