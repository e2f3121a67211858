"""Building a config dataclass from a JSON object with one-line errors (pure Python, no dependencies)."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

__all__ = ["from_json_object"]

T = TypeVar("T")


def from_json_object(cls: type[T], data: Any, what: str) -> T:
    """``cls(**data)`` once ``data`` is a dict of ``cls``'s field names.

    Args:
        cls: a dataclass.
        data: the decoded JSON value.
        what: how the config is named in messages (``"calibration"``, ``"decomposer"``, …).

    Raises:
        ValueError: ``data`` is not an object, or names unknown fields (the message lists the valid ones).
    """
    if not isinstance(data, dict):
        raise ValueError(f"a {what} config must be a JSON object; got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {what} field(s) {unknown}; valid: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        if not _fits(value, hints[name]):
            raise ValueError(
                f"{what} field {name!r} must be {_describe(hints[name])}; "
                f"got {value!r} ({type(value).__name__})"
            )
    return cls(**data)


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON-decoded ``value`` can stand for a field annotated ``hint`` (ints pass for floats,
    lists for tuples, objects for nested configs; ``bool`` is never a number)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin in (tuple, list):
        items = [a for a in args if a is not Ellipsis] or [Any]
        return isinstance(value, list | tuple) and all(_fits(v, items[0]) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if dataclasses.is_dataclass(hint):
        return isinstance(value, dict | hint)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _describe(hint: Any) -> str:
    """``float | None`` → ``a number or null``; words for the message."""
    words = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) in (tuple, list):
        return "a list"
    if dataclasses.is_dataclass(hint):
        return "a JSON object"
    return words.get(hint, getattr(hint, "__name__", str(hint)))
