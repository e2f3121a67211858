"""The allocation problem of the loss-driven rules: groups of targets sharing one rank, bounds, budget.

A group holds the targets of one kind (all ``q_proj``, …) in ``group_layers`` consecutive layers; its
members share a shape, so one rank k_g serves them all and costs k_g · c_g parameters with
c_g = Σ_members (m + n). The budget is the cost of the homogeneous ranks, so every allocation removes
the same number of parameters as the uniform one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from lowrank.linalg.budget import budget_cost
from lowrank.linalg.whitening import whiten
from lowrank.methods.allocation.factors import Factors, MaskedLinear, whitened_factors
from lowrank.methods.common import Target

__all__ = ["Problem", "build_problem", "factor_bank", "set_ranks"]


@dataclass
class Problem:
    """Groups of factorized targets and what each group may take."""

    targets: list[Target]
    groups: list[list[Target]]
    homogeneous: list[int]
    min_rank: list[int]
    max_rank: list[int]
    unit_costs: list[int]
    layers: list[float] = field(default_factory=list)
    n_layers: int = 1

    @property
    def budget(self) -> int:
        """Parameters of the factors at the homogeneous ranks (what every allocation may spend)."""
        return budget_cost(self.homogeneous, self.unit_costs)

    def names(self, g: int) -> list[str]:
        return [t.name for t in self.groups[g]]

    def to_targets(self, ranks: list[int]) -> dict[str, int]:
        """``{target name: rank}`` of group ranks."""
        return {t.name: int(k) for members, k in zip(self.groups, ranks, strict=True) for t in members}


def build_problem(
    plan: list[Target], bounds: Callable[[Target], tuple[int, int]], group_layers: int = 1
) -> Problem:
    """Group the factorized targets of ``plan`` (kind × block of ``group_layers`` layers) with their
    bounds ``bounds(target) -> (lo, hi)``."""
    targets = [t for t in plan if t.rank is not None]
    by_key: dict[tuple, list[Target]] = {}
    for t in targets:
        key = (t.kind, t.out_features, t.in_features, t.rank, t.layer // group_layers)
        by_key.setdefault(key, []).append(t)
    groups = sorted(by_key.values(), key=lambda g: (g[0].layer, g[0].name))
    lo, hi = zip(*(bounds(g[0]) for g in groups), strict=True) if groups else ((), ())
    return Problem(
        targets=targets,
        groups=groups,
        homogeneous=[g[0].rank for g in groups],
        min_rank=list(lo),
        max_rank=list(hi),
        unit_costs=[sum(t.out_features + t.in_features for t in g) for g in groups],
        layers=[sum(t.layer for t in g) / len(g) for g in groups],
        n_layers=max((t.layer for t in plan), default=0) + 1,
    )


def factor_bank(model: nn.Module, problem: Problem, per_layer: list[dict]) -> dict[str, Factors]:
    """Whitened factors of every target up to its group's upper bound, from the layers' input Grams."""
    bank, whitened = {}, {}
    for members, hi in zip(problem.groups, problem.max_rank, strict=True):
        for t in members:
            stat = per_layer[t.layer][t.rel]
            if id(stat) not in whitened:  # q/k/v and gate/up share one Gram: factor it once
                whitened[id(stat)] = whiten(stat.gram, "sqrt")
            bank[t.name] = whitened_factors(model.get_submodule(t.name).weight, whitened[id(stat)], hi)
    return bank


def set_ranks(installed: dict[str, MaskedLinear], problem: Problem, ranks: list[int] | None) -> None:
    """Truncate every group at its rank (``None``: every target back to its dense original)."""
    for g, members in enumerate(problem.groups):
        for t in members:
            installed[t.name].set_rank(None if ranks is None else int(ranks[g]))


def uniform_check(problem: Problem, ranks: list[int]) -> None:
    """Refuse ranks outside the bounds or over the budget (a bug in a rule, never a user error)."""
    cost = budget_cost(ranks, problem.unit_costs)
    bad = [g for g, k in enumerate(ranks) if not problem.min_rank[g] <= k <= problem.max_rank[g]]
    if cost > problem.budget or bad:
        raise RuntimeError(f"allocation breaks its bounds or budget: cost {cost} > {problem.budget} or {bad}")


def as_tensor(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)
