"""Registry of replacement modules, so that a saved model can be rebuilt from JSON.

A replacement module class (``LowRankLinear``, later latent-attention or KV-projection modules) is
registered with :func:`register_replacement` and implements two methods:

* ``module.replacement_spec() -> dict``: JSON-able shape description (ranks, sizes, flags);
* ``cls.from_spec(spec, *, original=None, model_config=None, device=None, dtype=None) -> module``: an
  uninitialised module of that shape. ``original`` is the module it replaces in the freshly built base
  model (so a replacement can take back a rotary embedding, a layer index or a norm) and
  ``model_config`` the model's transformers config; modules that need neither ignore them.

Serialization stores ``{"class": cls.__name__, "spec": ...}`` for every replaced module and calls
:func:`build_replacement` when loading, so a new module type becomes loadable by registering it.

A registered module also answers for itself, so that no other code names its class (each is optional,
with the default in brackets):

* ``stored_bytes() -> int``: bytes of the tensors it stores outside ``nn.Parameter`` s, e.g. packed
  quantized weights and their scales [0]; :mod:`lowrank.nn.accounting` adds them to the weight bytes;
* ``represented_parameters() -> int``: weights it stands for that are not ``nn.Parameter`` s (a quantized
  layer's out × in) [0]; added to the parameter count, so quantization leaves the count unchanged;
* ``healing_parameters(trainable) -> iterable of nn.Parameter``: what healing trains in it under
  ``trainable='replaced'`` or ``'attention'`` [all its parameters];
* ``healing_scope() -> str``: what ``trainable='auto'`` means when it is in the model: ``'replaced'`` or
  ``'attention'`` [``'replaced'``]; any module asking for ``'attention'`` wins;
* ``healing_learning_rate(trainable) -> float | None``: the measured peak learning rate for it when it is
  what trains, ``None`` for the general default [``None``]; a model whose replaced modules agree on one
  rate heals at that rate.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from torch import nn

__all__ = [
    "register_replacement",
    "replacement_class",
    "describe_replacement",
    "describe_replacements",
    "build_replacement",
    "replacement_modules",
]

_REPLACEMENTS: dict[str, type[nn.Module]] = {}

#: Modules of the package that define replacement classes, imported on the first lookup that misses, so
#: that loading a saved model never depends on which part of lowrank the caller happened to import.
_BUILT_IN = (
    "lowrank.nn.low_rank_linear",
    "lowrank.nn.quantized_linear",
    "lowrank.attention.wrapper",
    "lowrank.attention.deepseek_mla",
)

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
    if name not in _REPLACEMENTS:
        import importlib

        for module in _BUILT_IN:
            importlib.import_module(module)
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


def describe_replacements(root: nn.Module) -> dict[str, dict[str, Any]]:
    """:func:`describe_replacement` of every registered replacement inside ``root`` (relative names), outer
    modules before the ones nested in them, so rebuilding in this order puts each where it was."""
    return {
        name: desc
        for name, module in root.named_modules()
        if name and (desc := describe_replacement(module)) is not None
    }


def build_replacement(
    description: dict[str, Any],
    *,
    original: nn.Module | None = None,
    model_config: Any = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Rebuild an uninitialised module from :func:`describe_replacement`'s output.

    Args:
        description: ``{"class": name, "spec": {...}}``.
        original: the module being replaced (of the freshly built base model), if any.
        model_config: the model's transformers config, if any.
        device, dtype: where and how the module's tensors are allocated.

    Raises:
        ValueError: unknown class, or a description that is not of that form.
    """
    if not isinstance(description, dict) or not isinstance(description.get("spec"), dict):
        raise ValueError(
            f"a replacement description must be {{'class': name, 'spec': {{...}}}}; got {description!r}"
        )
    cls = replacement_class(description["class"])
    return cls.from_spec(  # type: ignore[attr-defined]
        description["spec"], original=original, model_config=model_config, device=device, dtype=dtype
    )


def replacement_modules(root: nn.Module) -> list[nn.Module]:
    """Every registered replacement module inside ``root`` (``root`` included), outer before nested."""
    return [m for m in root.modules() if describe_replacement(m) is not None]
