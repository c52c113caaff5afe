"""Typed configs: nested dataclasses <- YAML file + ``--section.key value`` overrides.

A config class is a plain dataclass whose fields may be other dataclasses; the YAML mirrors
it. Unknown keys are errors that suggest the closest valid key; values are checked against
the field types (``int``, ``float``, ``bool``, ``str``, ``Literal``, ``list``, ``dict``,
``X | None``) with the key's dotted name in the message.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tunelab.errors import TunelabError

T = TypeVar("T")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or a syntax error is a clear error."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError as e:
        raise TunelabError(f"config file {path} does not exist; check the path.") from e
    except yaml.YAMLError as e:
        raise TunelabError(f"config file {path} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TunelabError(
            f"config file {path} must hold a mapping of keys, not {type(data).__name__}."
        )
    return data


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--train.lr", "1e-4", "--data.packing=true"]`` -> nested dict (values parsed as YAML)."""
    result: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise TunelabError(
                f"unexpected argument {arg!r}; overrides look like --section.key VALUE."
            )
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise TunelabError(f"--{key} needs a value, e.g. --{key} VALUE.")
            value, i = args[i + 1], i + 1
        i += 1
        node = result
        *parents, leaf = key.replace("-", "_").split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise TunelabError(f"--{key} conflicts with another override of {part!r}.")
        node[leaf] = _parse_scalar(value)
    return result


def _parse_scalar(value: str) -> Any:
    """A YAML scalar, or a flow list / mapping (``[a, b]``, ``{k: v}``); anything else that
    YAML would read as a structure (``"Note: be brief"``, ``"- x"``) stays the string it is."""
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    if isinstance(parsed, dict | list) and not value.lstrip().startswith(("[", "{")):
        return value
    quoted = value.strip().startswith(("'", '"'))
    if isinstance(parsed, str | None) and "#" in value and not quoted:
        return value  # YAML took " #..." for a comment: "Rule #1 is brevity" is text
    return parsed


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge ``override`` into a copy of ``base``."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, checking keys and types (``prefix`` for messages)."""
    if not isinstance(data, dict):
        raise TunelabError(f"{prefix.rstrip('.') or 'config'} must be a mapping of keys.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        norm = str(key).replace("-", "_")
        if norm not in fields:
            raise TunelabError(_unknown_key_message(prefix + str(key), norm, list(fields), prefix))
        kwargs[norm] = _coerce(hints[norm], value, prefix + norm)
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise TunelabError(f"missing required key {prefix + missing[0]}; add it to the config.")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise TunelabError(f"{prefix.rstrip('.') or 'config'}: {e}") from e


def to_dict(obj: Any) -> Any:
    """Dataclass (nested) -> plain dict, for saving the resolved config."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _unknown_key_message(shown: str, key: str, valid: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if not close:  # a valid key with words added or dropped: lr_rate -> lr
        close = [v for v in valid if key.startswith(v + "_") or v.startswith(key + "_")][:1]
    hint = (
        f"did you mean {prefix}{close[0]}?" if close else f"valid keys: {', '.join(sorted(valid))}"
    )
    return f"unknown config key {shown!r}: {hint}"


def _shape_fits(tp: Any, value: Any) -> bool:
    origin = typing.get_origin(tp)
    if isinstance(value, list):
        return origin is list
    if isinstance(value, dict):
        return origin is dict or dataclasses.is_dataclass(tp)
    return origin not in (list, dict) and not dataclasses.is_dataclass(tp)


def _coerce(tp: Any, value: Any, name: str) -> Any:
    """Check ``value`` against type ``tp``, converting where it is unambiguous (int -> float)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        candidates = [a for a in args if a is not type(None)]
        # Try the branch whose shape fits the value first, so its error is the one reported.
        candidates.sort(key=lambda a: not _shape_fits(a, value))
        first_error = None
        for arg in candidates:
            try:
                return _coerce(arg, value, name)
            except TunelabError as e:
                first_error = first_error or e
        raise first_error
    if origin is typing.Literal:
        if value not in args:
            raise TunelabError(f"{name}: {value!r} is not one of {', '.join(map(repr, args))}.")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=name + ".")
    if origin is list:
        if not isinstance(value, list):
            raise TunelabError(f"{name}: expected a list, got {value!r}.")
        return [_coerce(args[0], v, f"{name}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise TunelabError(f"{name}: expected a mapping, got {value!r}.")
        return {k: _coerce(args[1], v, f"{name}.{k}") for k, v in value.items()} if args else value
    if tp is Any:
        return value
    if tp is float and isinstance(value, int | float | str) and not isinstance(value, bool):
        try:
            return float(value)  # also "1e-4", which YAML 1.1 reads as a string
        except ValueError:
            pass
    if tp is str and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if tp in (int, float, bool, str) and not (
        isinstance(value, tp) and not (tp is int and isinstance(value, bool))
    ):
        raise TunelabError(f"{name}: expected {tp.__name__}, got {value!r}.")
    return value
