"""Typed configs: dataclasses ↔ plain dicts / YAML, deep merges, dotted overrides.

Every config in cepdist is a dataclass whose defaults are the reference settings. `to_dict`/`from_dict`
round-trip them through plain dicts (YAML, MLflow params, checkpoints); `from_dict` rejects unknown keys by
their dotted path and converts lists to tuples and ints to floats where the field says so. `None` in a
field means "use the default that depends on context" (e.g. the task's K), never a magic 0 or "".
Presets, YAML files and command-line flags combine with `merge`, which is deep: a partial section
overrides only the keys it names."""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import yaml


def to_dict(cfg) -> dict[str, Any]:
    """Plain, YAML/JSON-safe dict (tuples become lists)."""
    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v
    return conv(cfg)


def _optional(tp) -> tuple[Any, bool]:
    """(X, True) for X | None; (tp, False) otherwise."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _number(v) -> float | None:
    """v as a float if it is a number or a string that spells one (YAML 1.1 reads `1e3` as a string)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None


def _convert(tp, v, path: str):
    """v checked against the declared type tp (int, float, str, bool, tuple[T, ...], dict) and converted."""
    def bad(expected):
        return ValueError(f"config key {path}: expected {expected}, got {v!r} ({type(v).__name__})")
    if tp is bool:
        if not isinstance(v, bool):
            raise bad("true or false")
        return v
    if tp is int:
        if isinstance(v, bool) or not (isinstance(v, int) or (_number(v) is not None and _number(v).is_integer())):
            raise bad("an integer")
        return int(_number(v)) if not isinstance(v, int) else v
    if tp is float:
        x = _number(v)
        if x is None:
            raise bad("a number")
        return x
    if tp is str:
        if not isinstance(v, str):
            raise bad("a string")
        return v
    if typing.get_origin(tp) is dict:
        if not isinstance(v, dict):
            raise bad("a mapping")
        return dict(v)
    if typing.get_origin(tp) is tuple:
        if not isinstance(v, (list, tuple)):
            raise bad("a list")
        elem = typing.get_args(tp)[0]
        return tuple(_convert(elem, x, f"{path}[{i}]") for i, x in enumerate(v))
    return v


def from_dict(cls, d: dict[str, Any] | None, where: str = ""):
    """Build dataclass `cls` from a (possibly partial) dict. Unknown keys, values of the wrong type and
    None for a field that does not accept it raise with the key's dotted path."""
    if d is not None and not isinstance(d, dict):
        raise ValueError(f"config section {where.rstrip('.') or cls.__name__} must be a mapping, "
                         f"got {type(d).__name__}")
    d = dict(d or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(where + k for k in unknown)} for {cls.__name__}; "
                         f"expected some of: {', '.join(sorted(names))}")
    kwargs = {}
    for k, v in d.items():
        tp, nullable = _optional(hints[k])
        if v is None:
            if not nullable:
                raise ValueError(f"config key {where}{k}: a value is required (it has no default that depends "
                                 "on context)")
            kwargs[k] = None
        elif dataclasses.is_dataclass(tp):
            kwargs[k] = v if isinstance(v, tp) else from_dict(tp, v, where=f"{where}{k}.")
        else:
            kwargs[k] = _convert(tp, v, f"{where}{k}")
    return cls(**kwargs)


def merge(base: dict[str, Any], over: dict[str, Any] | None) -> dict[str, Any]:
    """Deep merge of plain dicts: `over`'s keys replace `base`'s, nested mappings merge key by key."""
    out = dict(base)
    for k, v in (over or {}).items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def replace(cfg, **overrides):
    """Copy with dotted-path overrides: replace(cfg, **{"energy.beta": 10})."""
    d = to_dict(cfg)
    for path, v in overrides.items():
        node = d
        *parents, last = path.split(".")
        for p in parents:
            if p not in node or not isinstance(node[p], dict):
                raise ValueError(f"unknown config section {path!r}")
            node = node[p]
        if last not in node:
            raise ValueError(f"unknown config key {path!r}")
        node[last] = list(v) if isinstance(v, tuple) else v
    return from_dict(type(cfg), d)


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def load_yaml(cls, text: str):
    return from_dict(cls, yaml.safe_load(text))


class Errors(list):
    """Validation messages, collected so that one error names every bad option at once."""

    def __init__(self, where: str = ""):
        super().__init__()
        self.where = where

    def need(self, ok: bool, key: str, allowed: str):
        if not ok:
            self.append(f"{self.where}{key} must be {allowed}")
