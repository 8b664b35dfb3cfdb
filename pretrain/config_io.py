"""Strict, generic loading of dataclass config trees from YAML files and CLI overrides.

A typo in a config key or a wrong value type should stop a run before it spends GPU hours,
so everything here fails loudly with a message naming the dotted key path (and the file).
Nothing in this module knows about specific config classes: it works for any dataclass tree.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
import reprlib
import types
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")

BASE_KEY = "_base_"


class ConfigError(ValueError):
    """Any invalid config input; the message names the offending key path and, if known, the file."""


class _TypeMismatch(ConfigError):
    """A value of the wrong type at `path` itself (not deeper), so unions can try the next member."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads '1e-4' and '3e5' as floats (YAML 1.1 demands a dot and an exponent sign)."""


_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789."))


def _read_mapping(path: Path) -> dict:
    """Parse one YAML file; an empty file is an empty mapping."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"YAML error in {path}{where}: {getattr(exc, 'problem', None) or exc}") from exc
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_yaml_tree(path: str | Path) -> dict:
    """Read a YAML mapping with its `_base_` files merged underneath, so configs can share defaults."""
    return _load_tree(Path(path).resolve(), ())


def _load_tree(path: Path, including: tuple[Path, ...]) -> dict:
    if path in including:
        chain = " -> ".join(str(p) for p in (*including, path))
        raise ConfigError(f"'{BASE_KEY}' inclusion cycle: {chain}")
    data = _read_mapping(path)
    bases = data.pop(BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: '{BASE_KEY}' must be a string or a list of strings, got {bases!r}")
    merged: dict = {}
    for base in bases:
        merged = deep_merge(merged, _load_tree((path.parent / base).resolve(), (*including, path)))
    return deep_merge(merged, data)


def deep_merge(base: dict, override: dict) -> dict:
    """Mappings merge key by key; any other value (lists included) in `override` replaces. Pure."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        both_mappings = isinstance(merged.get(key), dict) and isinstance(value, dict)
        merged[key] = deep_merge(merged[key], value) if both_mappings else copy.deepcopy(value)
    return merged


def parse_overrides(items: Iterable[str]) -> dict:
    """Turn ["a.b=1", "c=[2,3]"] into a nested dict; values are parsed as YAML so types survive."""
    result: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"bad override {item!r}: expected 'dotted.key=value'")
        try:
            value = yaml.load(raw, Loader=_Loader)
        except yaml.YAMLError as exc:
            raise ConfigError(f"bad override {item!r}: cannot parse value: {exc}") from exc
        for part in reversed(parts):
            value = {part: value}
        result = deep_merge(result, value)
    return result


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    """Readable annotation for error messages ('list[int]', 'int | None', not 'typing.List[...]')."""
    if tp is type(None):
        return "None"
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return f"Literal[{', '.join(map(repr, args))}]"
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]"
    return getattr(tp, "__name__", str(tp))


def _type_error(path: str, tp: Any, value: Any) -> _TypeMismatch:
    got = f"{reprlib.repr(value)} ({type(value).__name__})"
    return _TypeMismatch(path, f"{path}: expected {_type_name(tp)}, got {got}")


def _convert(tp: Any, value: Any, path: str) -> Any:
    """Check `value` against annotation `tp`, converting where YAML cannot express the type."""
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    origin, args = get_origin(tp), get_args(tp)
    if tp in (list, tuple, dict):
        origin = tp
    if origin in (Union, types.UnionType):
        return _convert_union(tp, args, value, path)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise _type_error(path, tp, value)
    if origin is list:
        if not isinstance(value, list):
            raise _type_error(path, tp, value)
        return [_convert(args[0] if args else Any, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        return _convert_tuple(tp, args, value, path)
    if origin is dict:
        if not isinstance(value, dict):
            raise _type_error(path, tp, value)
        key_tp, val_tp = args or (Any, Any)
        return {_convert(key_tp, k, path): _convert(val_tp, v, _join(path, str(k))) for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(tp, type) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value  # bool is an int subclass in Python, but never a valid int in a config
    raise _type_error(path, tp, value)


def _convert_union(tp: Any, args: tuple, value: Any, path: str) -> Any:
    if value is None and type(None) in args:
        return None
    members = [a for a in args if a is not type(None)]
    for member in members:
        try:
            return _convert(member, value, path)
        except ConfigError as exc:
            if len(members) == 1 and getattr(exc, "path", None) != path:
                raise  # Optional[X] failing deeper inside X (bad item, unknown key): more precise
    raise _type_error(path, tp, value)


def _convert_tuple(tp: Any, args: tuple, value: Any, path: str) -> tuple:
    """YAML has no tuples, so a list is accepted and converted."""
    if not isinstance(value, (list, tuple)):
        raise _type_error(path, tp, value)
    if len(args) == 2 and args[1] is Ellipsis:
        args = (args[0],) * len(value)
    elif not args:
        args = (Any,) * len(value)
    elif len(args) != len(value):
        raise _TypeMismatch(path, f"{path}: expected {_type_name(tp)}, got {len(value)} items: {value!r}")
    return tuple(_convert(t, v, f"{path}[{i}]") for i, (t, v) in enumerate(zip(args, value)))


def _unknown_key_error(path: str, key: Any, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(str(key), valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{_join(path, str(key))}'{hint}; valid keys: {', '.join(valid)}")


def from_dict(cls: type[T], data: dict | None, path: str = "") -> T:
    """Build dataclass `cls` strictly; `None` (an empty `section:` in YAML) means all defaults."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"from_dict needs a dataclass type, got {cls!r}")
    label = path or cls.__name__
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise _TypeMismatch(path, f"{label}: expected a mapping for {cls.__name__}, got {reprlib.repr(data)}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise _unknown_key_error(path, key, list(fields))
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], _join(path, name))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key '{_join(path, name)}'")
    try:
        instance = cls(**kwargs)  # __post_init__ may raise ValueError as well as validate()
        validate = getattr(instance, "validate", None)
        if callable(validate):
            validate()
    except ValueError as exc:
        raise ConfigError(f"{label}: {exc}") from exc
    return instance


def to_dict(obj: Any) -> dict:
    """Dataclass tree -> plain dict that yaml.safe_dump accepts and from_dict rebuilds exactly."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"to_dict needs a dataclass instance, got {obj!r}")
    return _to_plain(obj, "")


def _to_plain(value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = [f.name for f in dataclasses.fields(value) if f.init]
        return {name: _to_plain(getattr(value, name), _join(path, name)) for name in fields}
    if isinstance(value, dict):
        return {k: _to_plain(v, _join(path, str(k))) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if value is None or type(value) in (bool, int, float, str):  # exact types: safe_dump rejects subclasses
        return value
    raise TypeError(f"{path or '<root>'}: cannot write {type(value).__name__} to YAML")


def dump_yaml(obj: Any, path: str | Path) -> None:
    """Write the config atomically so a crash never leaves a half-written file next to a checkpoint."""
    path = Path(path)
    text = yaml.safe_dump(to_dict(obj), sort_keys=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = (), base: dict | None = None
) -> T:
    """Embedded defaults <- YAML file tree <- CLI overrides, then a strict build of `cls`."""
    merged = base or {}  # deep_merge below always returns a fresh copy
    if path is not None:
        merged = deep_merge(merged, load_yaml_tree(path))
    merged = deep_merge(merged, parse_overrides(overrides))
    try:
        return from_dict(cls, merged)
    except ConfigError as exc:
        if path is None:
            raise
        raise ConfigError(f"{exc} (config file: {path})") from exc
