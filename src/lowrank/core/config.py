"""The one validation path of the config dataclasses, their versioned dict form and its migrations.

Every config (method configs, ``CalibrationConfig``, ``DecomposerConfig``) subclasses :class:`Config`
and declares its checks on the fields instead of writing them in ``__post_init__``:

* the annotation is the type (``int`` never accepts ``True``; ``float`` accepts ints);
* ``metadata={"choices": (...)}`` (or a callable returning them) lists the valid values;
* ``metadata={"range": "(0, 1]"}`` is an interval, brackets closed, parentheses open, ``inf`` unbounded
  (an unbounded side still refuses ``inf`` and ``nan``);
* the ClassVar ``exclusive`` lists groups of fields of which at most one is set away from its default.

``Config.__post_init__`` checks all of them once; a failure is one ``ValueError`` line naming the config,
the field, the bad value and what is valid. Cross-field checks stay in the subclasses' ``__post_init__``,
after ``super().__post_init__()``.

``to_dict`` writes ``"version": N``. ``from_dict`` reads any version up to the class's ``version``,
upgrading one step at a time through the class's ``migrations`` (``{from_version: fn(dict) -> dict}``);
a dict without a version is version 0, the form written before configs were versioned. Pure Python.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

__all__ = ["Config", "validate_fields", "field_problem", "from_json_object", "upgrade", "nested_fields"]

T = TypeVar("T")
Migration = Callable[[dict[str, Any]], dict[str, Any]]


def unversioned(data: dict[str, Any]) -> dict[str, Any]:
    """Version 0 → 1: configs written before the version key are read unchanged."""
    return data


class Config:
    """Base of the config dataclasses: declared field checks, ``to_dict``/``from_dict`` with a version.

    Subclasses are ``@dataclass(kw_only=True)`` classes; one that overrides ``__post_init__`` calls
    ``super().__post_init__()`` first (after any coercion the declared checks should see).
    """

    label: ClassVar[str] = ""
    """How the config is named in messages (``"calibration"``); default: the class name."""
    version: ClassVar[int] = 1
    """Version of the dict form ``to_dict`` writes; raise it when a field is renamed or its meaning changes,
    and add the step from the previous version to ``migrations``."""
    migrations: ClassVar[dict[int, Migration]] = {0: unversioned}
    """``{v: fn}``: ``fn`` turns the field dict of version ``v`` (no ``version`` key) into version v + 1."""
    exclusive: ClassVar[tuple[tuple[str, ...], ...]] = ()
    """Groups of fields of which at most one is set away from its default (the CLI: a flag of a group clears
    the others given by ``--config``)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        missing = [v for v in range(cls.version) if v not in cls.migrations]
        if missing:
            raise TypeError(f"{cls.__name__}: version {cls.version} needs migrations from versions {missing}")

    @classmethod
    def config_label(cls) -> str:
        return cls.label or cls.__name__

    def __post_init__(self) -> None:
        for name, kind in nested_fields(type(self)).items():
            value = getattr(self, name)
            if isinstance(value, dict) and hasattr(kind, "from_dict"):
                setattr(self, name, kind.from_dict(value))
        validate_fields(self)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict with a ``"version"`` key; nested configs serialise through their ``to_dict``."""
        out: dict[str, Any] = {"version": type(self).version}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, Config):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        """Inverse of :meth:`to_dict`, for any version up to ``cls.version`` (one-line ``ValueError``)."""
        return from_json_object(cls, upgrade(cls, data), cls.config_label())  # type: ignore[attr-defined]


@functools.cache
def nested_fields(cls: type) -> dict[str, type]:
    """``{field name: config class}`` of the fields of ``cls`` that hold a nested config dataclass (a dict
    given for one is converted by the nested class's ``from_dict``)."""
    hints = _hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        for candidate in (hints.get(f.name), *typing.get_args(hints.get(f.name))):
            if isinstance(candidate, type) and dataclasses.is_dataclass(candidate):
                out[f.name] = candidate
    return out


def upgrade(cls: type[Config], data: Any) -> dict[str, Any]:
    """The field dict of ``data`` (a ``to_dict`` of any version) migrated to ``cls.version``, no version key.

    Raises:
        ValueError: ``data`` is not an object, its version is not an integer >= 0, or it is newer than this
            code reads.
    """
    label = cls.config_label()
    if not isinstance(data, dict):
        raise ValueError(f"a {label} config must be a JSON object; got {type(data).__name__}")
    data = dict(data)
    version = data.pop("version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"{label} config field 'version' must be an integer >= 0; got {version!r}")
    if version > cls.version:
        raise ValueError(
            f"{label} config saved by a newer lowrank (version {version}; this one reads up to {cls.version})"
        )
    for step in range(version, cls.version):
        data = cls.migrations[step](data)
    return data


def from_json_object(cls: type[T], data: Any, what: str) -> T:
    """``cls(**data)`` once ``data`` is a dict of ``cls``'s field names (the values are checked by ``cls``).

    Raises:
        ValueError: ``data`` is not an object, or names unknown fields (the message lists the valid ones).
    """
    if not isinstance(data, dict):
        raise ValueError(f"a {what} config must be a JSON object; got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {what} field(s) {unknown}; valid: {sorted(names)}")
    return cls(**data)


def validate_fields(config: Any) -> None:
    """Check every field of the dataclass ``config`` against its annotation and metadata, and the groups in
    its ``exclusive``; raise a one-line ``ValueError`` at the first problem."""
    cls = type(config)
    label = cls.config_label() if hasattr(cls, "config_label") else cls.__name__
    hints = _hints(cls)
    for f in dataclasses.fields(config):
        problem = field_problem(getattr(config, f.name), hints[f.name], f.metadata)
        if problem:
            raise ValueError(f"{label} field {f.name!r} {problem}")
    for group in getattr(cls, "exclusive", ()):
        given = [f for f in dataclasses.fields(config) if f.name in group and _set(config, f)]
        if len(given) > 1:
            shown = ", ".join(f"{f.name}={getattr(config, f.name)!r}" for f in given)
            names = " and ".join(repr(f.name) for f in given)
            raise ValueError(f"{label} fields {names} are exclusive (give one, not both); got {shown}")


def field_problem(value: Any, hint: Any, metadata: typing.Mapping[str, Any]) -> str | None:
    """What is wrong with ``value`` for a field annotated ``hint`` with ``metadata`` (``"must be …; got …"``),
    or None."""
    if not _fits(value, hint):
        return f"must be {_describe(hint)}; got {value!r} ({type(value).__name__})"
    if value is None:
        return None
    choices = metadata.get("choices")
    if choices is not None:
        choices = tuple(choices() if callable(choices) else choices)
        if value not in choices:
            return f"must be one of {choices!r}; got {value!r}"
    if "range" in metadata and isinstance(value, int | float):
        interval = _interval(metadata["range"])
        if not interval.contains(value):
            integer = _fits(1, hint) and not _fits(0.5, hint)
            return f"must be {interval.words(integer)}; got {value!r}"
    return None


def _set(config: Any, f: dataclasses.Field) -> bool:
    """Whether field ``f`` of ``config`` holds something other than its default."""
    if f.default is not dataclasses.MISSING:
        return getattr(config, f.name) != f.default
    if f.default_factory is not dataclasses.MISSING:
        return getattr(config, f.name) != f.default_factory()
    return True


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


@dataclasses.dataclass(frozen=True)
class _Interval:
    text: str
    low: float
    high: float
    low_closed: bool
    high_closed: bool

    def contains(self, x: float) -> bool:
        above = self.low <= x if self.low_closed else self.low < x
        below = x <= self.high if self.high_closed else x < self.high
        return above and below  # nan is in no interval, inf only in a closed one

    def words(self, integer: bool) -> str:
        """``a positive integer``, ``an integer >= 0``, ``> 0``, ``in (0, 1]``."""
        if self.high == math.inf and self.low != -math.inf:
            if integer:
                first = math.floor(self.low) + 1 if not self.low_closed or self.low % 1 else int(self.low)
                return "a positive integer" if first == 1 else f"an integer >= {first}"
            return f"{'>=' if self.low_closed else '>'} {_number(self.low)}"
        if self.low == -math.inf:
            return f"{'<=' if self.high_closed else '<'} {_number(self.high)}"
        return f"in {self.text}"


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


_INTERVAL = re.compile(r"^\s*([\[(])\s*([^,\s]+)\s*,\s*([^\])\s]+)\s*([\])])\s*$")


@functools.cache
def _interval(text: str) -> _Interval:
    """``"(0, 1]"`` → an interval; ``inf``/``-inf`` for an unbounded side."""
    match = _INTERVAL.match(text)
    if not match:
        raise TypeError(f"range {text!r} is not an interval like '[0, 1)' or '(0, inf)'")
    opening, low, high, closing = match.groups()
    return _Interval(text, float(low), float(high), opening == "[", closing == "]")


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` can stand for a field annotated ``hint`` (ints pass for floats, lists for tuples,
    objects for nested configs; ``bool`` is never a number)."""
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
