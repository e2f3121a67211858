"""Command-line flags derived from the method config dataclasses, so a new method needs no CLI code.

Every field of a registered config becomes a flag (``keep_singular_fraction`` → ``--keep-singular-fraction``);
its help is the docstring under the field, its type and choices come from the annotation and the field's
``metadata["choices"]``. A field holding a nested config (``calibration``, ``decomposer``) contributes the
nested fields with the prefix in its ``metadata["prefix"]`` (``--calib-samples``) and per-field renames in
``metadata["flags"]``. Flags of several methods are merged by name; choosing a flag that the selected
method does not have is a one-line error. Validation stays with the configs (``lowrank.core.config``:
declared types, choices, ranges and exclusive groups), so a flag and a ``--config`` file are checked alike.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FlagSpec", "method_flags", "add_method_flags", "config_from_args"]

_NONE = type(None)


@dataclass
class FlagSpec:
    """One derived flag: where its value goes in the config dict and how argparse reads it."""

    flag: str
    path: tuple[str, ...]
    kind: Any
    choices: tuple[Any, ...] | None
    help: str
    default: Any
    methods: list[str] = field(default_factory=list)
    defaults: dict[str, Any] = field(default_factory=dict)
    """Default per method (they may differ: ``truncation`` is ``cholesky`` for svd-llm, ``eigh`` for V2)."""

    def default_text(self) -> str:
        shown = {m: d for m, d in self.defaults.items() if d not in (None, "(see below)")}
        if not shown:
            return ""
        if len(set(map(repr, shown.values()))) == 1:
            return f" (default: {next(iter(shown.values()))})"
        return " (default: " + ", ".join(f"{d} [{m}]" for m, d in shown.items()) + ")"

    @property
    def dest(self) -> str:
        return "cfg__" + "__".join(self.path)


def field_docs(cls: type) -> dict[str, str]:
    """Docstrings written under the fields of a dataclass (and of its bases), by field name."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _scalar(hint: Any) -> tuple[Any, bool]:
    """(argparse kind, is a list) of a field annotation; nested dataclasses are returned as themselves."""
    args = [a for a in typing.get_args(hint) if a is not _NONE]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        nested = [a for a in args if inspect.isclass(a) and dataclasses.is_dataclass(a)]
        return (nested[0], False) if nested else _scalar(args[0])
    if typing.get_origin(hint) in (tuple, list):
        return (args[0] if args else str), True
    return hint, False


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return "(see below)"
    return None


def method_flags(
    config_cls: type, prefix: str = "", path: tuple[str, ...] = (), renames=None
) -> list[FlagSpec]:
    """The flags of one config class (nested configs flattened)."""
    hints = typing.get_type_hints(config_cls)
    docs = field_docs(config_cls)
    renames = renames or {}
    out: list[FlagSpec] = []
    for f in dataclasses.fields(config_cls):
        kind, many = _scalar(hints[f.name])
        if inspect.isclass(kind) and dataclasses.is_dataclass(kind):
            sub_prefix = f.metadata.get("prefix", f.name.replace("_", "-") + "-")
            out += method_flags(kind, sub_prefix, (*path, f.name), f.metadata.get("flags"))
            continue
        name = renames.get(f.name, prefix + f.name.replace("_", "-"))
        kind = (list, kind) if many else kind
        choices = f.metadata.get("choices")
        choices = tuple(choices() if callable(choices) else choices) if choices is not None else None
        out.append(FlagSpec("--" + name, (*path, f.name), kind, choices, docs.get(f.name, ""), _default(f)))
    return out


def add_method_flags(parser: argparse.ArgumentParser, classes: dict[str, type]) -> dict[str, FlagSpec]:
    """Add the union of the flags of ``classes`` (method name → config class); return them by dest."""
    merged: dict[str, FlagSpec] = {}
    for method, cls in classes.items():
        for spec in method_flags(cls):
            known = merged.setdefault(spec.flag, spec)
            if known.choices and spec.choices and known is not spec:
                known.choices = tuple(dict.fromkeys((*known.choices, *spec.choices)))
            known.methods.append(method)
            known.defaults[method] = spec.default
    group = parser.add_argument_group(
        "method options", "derived from the method config classes; each applies to the methods listed"
    )
    for spec in merged.values():
        scope = "" if len(spec.methods) == len(classes) else f" [{', '.join(spec.methods)}]"
        text = (spec.help + spec.default_text() + scope).replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": spec.dest, "default": None, "help": text}
        if spec.kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(spec.kind, tuple):
            kwargs.update(nargs="+", type=spec.kind[1], metavar="PATTERN")
        else:
            kwargs["type"] = spec.kind if spec.kind in (int, float, str) else str
            kwargs["metavar"] = spec.path[-1].upper()
            if spec.choices:
                kwargs["choices"] = spec.choices
                kwargs.pop("metavar")
        group.add_argument(spec.flag, **kwargs)
    return {s.dest: s for s in merged.values()}


def config_from_args(
    args: argparse.Namespace, specs: dict[str, FlagSpec], method: str, base: dict[str, Any]
) -> Any:
    """Build the config of ``method`` from ``base`` (a config dict) overridden by the flags given, through
    :func:`lowrank.methods.config_from_dict`: a ``base`` without a ``"version"`` key (the flags alone, a
    command's recipe, a config file a user wrote) is read in the current form, so the defaults are today's;
    a saved config's version is kept and migrated from.

    Raises:
        ValueError: a given flag does not belong to ``method``, or the config rejects a value.
    """
    from lowrank.methods import config_class, config_from_dict

    cls = config_class(method)
    data: dict[str, Any] = {**base, "method": method}
    given: dict[str, str] = {}  # field → flag, to refuse two flags of one exclusive group as the API does
    for dest, spec in specs.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        if method not in spec.methods:
            owners = ", ".join(spec.methods)
            raise ValueError(f"{spec.flag} is not an option of method {method!r} (it belongs to: {owners})")
        given[spec.path[-1]] = spec.flag
        for group in cls.exclusive:
            if spec.path[-1] in group:
                both = [given[f] for f in group if f in given]
                if len(both) > 1:
                    raise ValueError(f"{' and '.join(both)} are exclusive; give one of them")
                for other in group:
                    data.pop(other, None)
        _set(data, spec.path, tuple(value) if isinstance(value, list) else value)
    return config_from_dict(data)


def _set(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        nested = data.get(key)
        if isinstance(nested, str):  # a decomposer given by name
            nested = {"name": nested}
        elif hasattr(nested, "to_dict"):
            nested = nested.to_dict()
        data[key] = dict(nested or {})
        data = data[key]
    data[path[-1]] = value
