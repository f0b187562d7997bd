"""Build nested dataclasses from plain dicts (TOML tables, `--set` overrides) with clear errors.

One mechanism serves every config in the project (recipes, augmentation specs): unknown keys get a
"did you mean", wrong types name the dotted key and the expected type, and range checks live in
each dataclass's `__post_init__` (raising UserError).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

from beton_trainer.common.errors import UserError, did_you_mean

__all__ = ["check_range", "from_dict", "to_dict"]

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` (after `from __future__` strings are resolved)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except UserError as exc:
                errors.append(str(exc))
        names = " or ".join(_type_name(a) for a in args)
        raise UserError(f"'{key}' must be {names}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            hint = did_you_mean(str(value), [str(a) for a in args])
            raise UserError(f"'{key}' must be one of {list(args)}, got {value!r}{hint}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"'{key}' must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise UserError(f"'{key}' must have {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"'{key}' must be a table, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, key)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"'{key}' must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise UserError(f"'{key}' must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"'{key}' must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"'{key}' must be a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: Any, prefix: str = "") -> T:
    """Instantiate dataclass `cls` from `data`, validating keys and types recursively."""
    where = prefix or cls.__name__
    if not isinstance(data, dict):
        raise UserError(f"'{where}' must be a table of settings, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            raise UserError(f"unknown setting '{dotted}'{did_you_mean(key, fields)}; "
                            f"valid keys here: {', '.join(sorted(fields))}")
        kwargs[key] = _coerce(value, hints[key], dotted)
    try:
        return cls(**kwargs)
    except UserError as exc:  # range checks name the bare field: give it its full dotted key
        msg = str(exc)
        for name in fields:
            if prefix and msg.startswith(f"'{name}'"):
                msg = f"'{prefix}.{name}'" + msg[len(name) + 2:]
                break
        raise UserError(msg) from None


def to_dict(obj: Any) -> Any:
    """The inverse of from_dict: nested plain dicts/lists suitable for TOML or JSON."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def check_range(key: str, value: float, lo: float | None = None, hi: float | None = None,
                *, lo_open: bool = False) -> None:
    """Raise UserError naming `key` when value is outside [lo, hi] (or (lo, hi] with lo_open)."""
    if lo is not None and (value <= lo if lo_open else value < lo):
        bound = f"> {lo}" if lo_open else f">= {lo}"
        raise UserError(f"'{key}' must be {bound}, got {value}")
    if hi is not None and value > hi:
        raise UserError(f"'{key}' must be <= {hi}, got {value}")
