"""Typed configs from YAML: nested dataclasses, dotted `key=value` overrides, errors that name the key.

`from_dict(Cls, data)` builds a dataclass tree from plain dicts and checks every value against the field's annotation
(int, float, bool, str, Path, Literal[...], Optional, list/tuple/dict of those, nested dataclasses). An unknown key
fails with the closest valid key; a wrong type names the key and the expected type. A number's range is part of its
annotation (`PositiveInt`, `Share`, ...: `Annotated` with `Bounds`), checked here with the key's dotted name;
cross-field rules live in each dataclass's `__post_init__` and raise UserError too.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml

from ldm_finetune.core.errors import UserError

_EXPONENT_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The range of a number field, as `Annotated[float, Bounds(...)]`: low (open or closed) up to high (open)."""
    low: float = 0
    high: float | None = None
    open_low: bool = False

    def check(self, value, key: str):
        low_ok = value > self.low if self.open_low else value >= self.low
        if not low_ok or (self.high is not None and value >= self.high):
            rule = f"{'>' if self.open_low else '>='} {self.low:g}" if self.high is None else \
                f"in {'(' if self.open_low else '['}{self.low:g}, {self.high:g})"
            raise UserError(f"{key}: {value} must be {rule}")
        return value


PositiveInt = Annotated[int, Bounds(open_low=True)]
PositiveFloat = Annotated[float, Bounds(open_low=True)]
NonNegativeInt = Annotated[int, Bounds()]
NonNegativeFloat = Annotated[float, Bounds()]
Share = Annotated[float, Bounds(high=1)]  # [0, 1): dropout rates
Decay = Annotated[float, Bounds(high=1, open_low=True)]  # (0, 1): EMA decays


def closest(name: str, options) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def parse_scalar(text: str) -> Any:
    """A command-line value as a YAML scalar: '3' -> 3, '1e-4' -> 0.0001, 'true' -> True, 'null' -> None."""
    value = yaml.safe_load(text) if text.strip() else ""
    if isinstance(value, str) and _EXPONENT_FLOAT.match(value):
        return float(value)  # YAML 1.1 reads '1e-4' as a string; users mean a number
    return value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set dotted keys in a nested dict from `a.b.c=value` strings; returns a new dict."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} is not of the form key.sub=value")
        key, text = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UserError(f"override {item!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = parse_scalar(text)
    return data


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config file must be a mapping of keys to values")
    return data


def from_dict(cls, data: Any, where: str = ""):
    """Build dataclass `cls` from a dict, checking keys and types; `where` is the dotted path for messages."""
    if not isinstance(data, dict):
        raise UserError(f"{where or 'config'}: expected a mapping of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise UserError(f"unknown config key {dotted!r}{closest(str(key), fields)}")
        kwargs[key] = convert(hints[key], value, dotted)
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise UserError(f"missing config key {(where + '.' if where else '') + missing[0]!r}")
    try:
        return cls(**kwargs)
    except UserError as exc:
        raise UserError(f"{where}: {exc}" if where and not str(exc).startswith(where) else str(exc)) from None


def convert(tp, value: Any, key: str):
    """Check/convert one value against a type annotation."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Annotated:
        return tp.__metadata__[0].check(convert(args[0], value, key), key)  # Bounds
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return convert(arg, value, key)
            except UserError as exc:
                errors.append(str(exc))
        raise UserError(errors[0] if len(errors) == 1 else f"{key}: {value!r} is not a valid {_name(tp)}")
    if origin is Literal:
        if isinstance(value, bool) and bool not in map(type, args):
            # YAML 1.1 reads a bare no / off / yes / on as a boolean: map it back to the option the user wrote
            words = ("no", "off", "false") if value is False else ("yes", "on", "true")
            value = next((a for a in args if a in words), value)
        if value not in args:
            choices = ", ".join(map(repr, args))
            raise UserError(f"{key}: {value!r} is not one of {choices}{closest(str(value), map(str, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise UserError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        out = [convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{key}: expected a mapping, got {value!r}")
        kt, vt = args or (Any, Any)
        return {convert(kt, k, key): convert(vt, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise UserError(f"{key}: expected a path, got {value!r}")
        return Path(value)
    raise AssertionError(f"unsupported annotation {tp!r} for {key}")


def _name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def to_dict(obj) -> Any:
    """Dataclass tree -> plain YAML-able data (Paths as strings, tuples as lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj
