"""Registry of replacement modules, so that a saved model can be rebuilt from JSON.

A replacement module class (``LowRankLinear``, later latent-attention or KV-projection modules) is
registered with :func:`register_replacement` and implements two methods:

* ``module.replacement_spec() -> dict``: JSON-able shape description (ranks, sizes, flags);
* ``cls.from_spec(spec, *, device=None, dtype=None) -> module``: an uninitialised module of that shape.

Serialization stores ``{"class": cls.__name__, "spec": ...}`` for every replaced module and calls
:func:`build_replacement` when loading, so a new module type becomes loadable by registering it.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from torch import nn

__all__ = ["register_replacement", "replacement_class", "describe_replacement", "build_replacement"]

_REPLACEMENTS: dict[str, type[nn.Module]] = {}

M = TypeVar("M", bound=type[nn.Module])


def register_replacement(cls: M) -> M:
    """Class decorator: make ``cls`` rebuildable by :func:`build_replacement` under its class name."""
    for attr in ("replacement_spec", "from_spec"):
        if not callable(getattr(cls, attr, None)):
            raise TypeError(f"{cls.__name__} must define {attr}() to be a registered replacement module")
    _REPLACEMENTS[cls.__name__] = cls
    return cls


def replacement_class(name: str) -> type[nn.Module]:
    """The registered class called ``name``.

    Raises:
        ValueError: no replacement module of that name is registered.
    """
    try:
        return _REPLACEMENTS[name]
    except KeyError:
        raise ValueError(
            f"unknown replacement module class {name!r}; registered: {', '.join(sorted(_REPLACEMENTS))}"
        ) from None


def describe_replacement(module: nn.Module) -> dict[str, Any] | None:
    """``{"class": name, "spec": {...}}`` for a registered replacement module, ``None`` for any other."""
    name = type(module).__name__
    if _REPLACEMENTS.get(name) is not type(module):
        return None
    return {"class": name, "spec": module.replacement_spec()}  # type: ignore[operator]


def build_replacement(
    description: dict[str, Any], *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> nn.Module:
    """Rebuild an uninitialised module from :func:`describe_replacement`'s output."""
    cls = replacement_class(description["class"])
    return cls.from_spec(description["spec"], device=device, dtype=dtype)  # type: ignore[attr-defined]
