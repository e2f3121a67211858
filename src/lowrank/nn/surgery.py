"""Select modules by name or class, and swap one module for another.

One matching grammar serves every method (``targets`` and ``ignore`` alike). A pattern is one of:

* ``re:<regex>``: the module's full dotted name matches ``<regex>`` entirely (``re.fullmatch``);
* a class name (``Linear``, ``LlamaMLP``): the module's class is called exactly that;
* anything else: an exact dotted-name suffix, so ``q_proj`` matches ``model.layers.3.self_attn.q_proj``
  and ``self_attn.q_proj`` does too, but ``proj`` matches nothing.

A target pattern that matches no module logs a warning (a typo should not pass silently); an empty
selection overall raises. :func:`replace_module` is the only place in the toolkit that swaps modules.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence

from torch import nn

__all__ = ["matches", "match_modules", "replace_module", "get_module"]

logger = logging.getLogger(__name__)


def _as_list(patterns: str | Iterable[str] | None) -> list[str]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        return [patterns]
    return list(patterns)


def matches(name: str, module: nn.Module, pattern: str) -> bool:
    """Whether the module called ``name`` matches one ``pattern`` of the grammar above."""
    if pattern.startswith("re:"):
        try:
            return re.fullmatch(pattern[3:], name) is not None
        except re.error as exc:
            raise ValueError(f"invalid regular expression in pattern {pattern!r}: {exc}") from None
    if type(module).__name__ == pattern:
        return True
    return name == pattern or name.endswith("." + pattern)


def match_modules(
    model: nn.Module,
    targets: str | Sequence[str],
    ignore: str | Sequence[str] | None = None,
    *,
    strict: bool = False,
) -> dict[str, nn.Module]:
    """Modules of ``model`` matched by any of ``targets`` and by none of ``ignore``, in model order.

    Args:
        model: the model to search (names are relative to it, as in ``named_modules()``).
        targets: patterns selecting modules.
        ignore: patterns excluding modules (same grammar).
        strict: raise instead of warning when a target matches nothing.

    Returns:
        ``{full_name: module}``; a module nested inside an already selected one is not returned again.

    Raises:
        ValueError: no module matches at all, or (``strict``) one target matches nothing.
    """
    targets_l, ignore_l = _as_list(targets), _as_list(ignore)
    if not targets_l:
        raise ValueError("targets must name at least one pattern (name suffix, 're:<regex>' or class name)")
    hits = dict.fromkeys(targets_l, 0)
    selected: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not name or any(name.startswith(s + ".") for s in selected):
            continue
        hit = [p for p in targets_l if matches(name, module, p)]
        if not hit:
            continue
        for p in hit:
            hits[p] += 1
        if not any(matches(name, module, p) for p in ignore_l):
            selected[name] = module
    unmatched = [p for p, n in hits.items() if n == 0]
    if unmatched:
        msg = f"target pattern(s) {unmatched} matched no module of {type(model).__name__}"
        if strict:
            raise ValueError(msg)
        logger.warning(msg)
    if not selected:
        raise ValueError(
            f"targets {targets_l} with ignore {ignore_l} select no module of {type(model).__name__}; "
            "patterns are name suffixes (e.g. 'q_proj'), 're:<regex>' or class names (e.g. 'Linear')"
        )
    return selected


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (dotted path; ``''`` is the model itself)."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{type(model).__name__} has no submodule {name!r}") from None


def replace_module(model: nn.Module, name: str, new_module: nn.Module) -> nn.Module:
    """Put ``new_module`` where the submodule ``name`` is; return the module it replaced.

    Works for attributes and for entries of ``nn.ModuleList``/``nn.Sequential``/``nn.ModuleDict``.
    """
    if not name:
        raise ValueError("cannot replace the root module (empty name)")
    parent_name, _, child = name.rpartition(".")
    parent = get_module(model, parent_name)
    old = get_module(model, name)
    if isinstance(parent, (nn.ModuleList, nn.Sequential)) and child.isdigit():
        parent[int(child)] = new_module
    else:
        setattr(parent, child, new_module)
    return old
