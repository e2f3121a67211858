"""Building a config dataclass from a JSON object with one-line errors (pure Python, no dependencies)."""

from __future__ import annotations

import dataclasses
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
    return cls(**data)
