"""Typed configs: dataclasses <-> YAML, with ``key=value`` command-line overrides.

Every concern has its own dataclass (training, generator, probes, ...); a run's config nests them.
``load_config(Cls, "run.yaml", ["train.lr=1e-4", "mode=delta_only"])`` reads the YAML, applies the
overrides (dotted paths into nested dataclasses), converts every value to its field's declared type
and rejects unknown keys, naming the file and key. ``save_config`` writes the resolved config (YAML,
atomically) next to a run so it can be reproduced.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .atomic import write_text
from .errors import LLGBMError

T = TypeVar("T")


class ConfigError(LLGBMError):
    """A config file or override is malformed, names an unknown key, or has a value of the wrong type."""


def to_dict(cfg: Any) -> dict:
    """A dataclass as plain YAML-able data (tuples become lists)."""

    def plain(x):
        if dataclasses.is_dataclass(x):
            return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    return plain(cfg)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` to type ``tp`` (int, float, bool, str, Optional, tuple/list, Literal, dataclass)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: unsupported type {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            number = float(value) if tp is float else value if isinstance(value, int) else int(str(value), 0)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
        return number
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _join(where: str, key: str) -> str:
    """Location of a key for messages: ``file.yaml: train.lr`` (or ``train.lr`` without a file).
    A file location ends with ":" (see ``load_config``)."""
    if where == "config":
        return key
    return f"{where} {key}" if where.endswith(":") else f"{where}.{key}"


def from_dict(cls: type[T], data: Any, where: str = "config") -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types are ``ConfigError``s."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where.rstrip(':')}: expected a mapping of {cls.__name__} fields, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in data if k not in names]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(names)})"
        raise ConfigError(f"{_join(where, str(unknown[0]))}: unknown key{hint}")
    kwargs = {k: _coerce(v, hints[k], _join(where, k)) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, LLGBMError):
            raise
        raise ConfigError(f"{where.rstrip(':')}: {e}") from None


def apply_override(data: dict, override: str) -> None:
    """Apply one ``dotted.key=value`` override to nested dict ``data`` in place (value parsed as YAML)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r}: empty key")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        node[parts[-1]] = raw


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] = ()) -> T:
    """Read ``cls`` from a YAML file (or defaults when ``path`` is None) and apply ``key=value`` overrides."""
    data: dict = {}
    where = "config"
    if path is not None:
        path = Path(path)
        where = str(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}: not valid YAML{at}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    for override in overrides:
        apply_override(data, override)
    return from_dict(cls, data, where if path is None else f"{where}:")


def save_config(cfg: Any, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (atomically)."""
    write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return Path(path)
