"""The record a compressed model carries of the methods applied to it, in order, with their summaries."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["applied_methods", "set_applied_methods", "applied_summaries"]

_HISTORY = "_lowrank_applied"
_SUMMARIES = "_lowrank_summaries"


def applied_methods(model: nn.Module) -> list[dict[str, Any]]:
    """The configs (as dicts) of the methods applied to ``model`` so far, in order."""
    return list(getattr(model, _HISTORY, []))


def set_applied_methods(
    model: nn.Module, configs: list[dict[str, Any]], summaries: list[dict[str, Any]] | None = None
) -> None:
    """Record the ordered list of applied method configs (and their summaries) on ``model``."""
    object.__setattr__(model, _HISTORY, list(configs))
    object.__setattr__(model, _SUMMARIES, list(summaries or []))


def applied_summaries(model: nn.Module) -> list[dict[str, Any]]:
    """The summaries of the methods applied to ``model`` so far, in order."""
    return list(getattr(model, _SUMMARIES, []))
