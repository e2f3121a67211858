"""Measured sensitivity + knapsack (``allocation='measured'``).

1. Probes: for every group g and a few candidate ranks k, truncate only that group (every other matrix
   intact) and measure the per-token KL(original ‖ model) on calibration text: L_g(k). The whitened
   factors are computed once, so a probe is one forward pass.
2. Curves: L_g between the probed ranks is interpolated linearly in the rank, anchored at L_g = 0 at
   full rank, and made non-increasing in k.
3. Choice: the multiple-choice knapsack over a grid of ranks per group (the homogeneous rank among them,
   so uniform is always feasible) minimises Σ_g L_g(k_g) within the budget; the unused budget is then
   filled greedily by the largest loss decrease per parameter.

Additivity assumption: the loss of truncating several groups is the sum of the losses of truncating
each alone (first order in the perturbations; cross terms between groups are ignored). The run reports
the predicted Σ_g L_g(k_g) beside the KL measured with every group truncated at once, at the chosen and
at the uniform ranks.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lowrank.linalg.allocation import rank_for_ratio
from lowrank.linalg.budget import fill_budget, multiple_choice_knapsack
from lowrank.methods.allocation.factors import MaskedLinear, mean_kl
from lowrank.methods.allocation.problem import Problem, set_ranks

__all__ = ["probe_losses", "loss_curves", "knapsack_ranks", "predicted_loss"]


def candidate_ranks(problem: Problem, g: int, ratios: tuple[float, ...]) -> list[int]:
    t = problem.groups[g][0]
    ks = {min(rank_for_ratio(t.out_features, t.in_features, r), problem.max_rank[g]) for r in ratios}
    return sorted(ks)


@torch.no_grad()
def probe_losses(
    model: nn.Module,
    installed: dict[str, MaskedLinear],
    problem: Problem,
    ids: torch.Tensor,
    reference: list[torch.Tensor],
    ratios: tuple[float, ...],
    batch_size: int = 4,
) -> list[dict[int, float]]:
    """``table[g][k]``: the KL of the model with only group g truncated at rank k (others intact)."""
    set_ranks(installed, problem, None)
    table = []
    for g, members in enumerate(problem.groups):
        row = {}
        for k in candidate_ranks(problem, g, ratios):
            for t in members:
                installed[t.name].set_rank(k)
            row[k] = mean_kl(model, ids, reference, batch_size)
        for t in members:
            installed[t.name].set_rank(None)
        table.append(row)
    return table


def loss_curves(problem: Problem, table: list[dict[int, float]]) -> list[torch.Tensor]:
    """Per group, L_g(k) for k = 0 … max_rank: linear between probes, 0 at full rank, non-increasing."""
    curves = []
    for g, row in enumerate(table):
        t = problem.groups[g][0]
        points = sorted({**row, min(t.out_features, t.in_features): 0.0}.items())
        xs = torch.tensor([p[0] for p in points], dtype=torch.float64)
        ys = torch.tensor([max(p[1], 0.0) for p in points], dtype=torch.float64)
        k = torch.arange(problem.max_rank[g] + 1, dtype=torch.float64)
        seg = torch.searchsorted(xs, k, right=True).clamp(1, len(xs) - 1)
        x0, x1, y0, y1 = xs[seg - 1], xs[seg], ys[seg - 1], ys[seg]
        curve = y0 + (k - x0) * (y1 - y0) / (x1 - x0)  # below the first probe: its slope extended
        # non-increasing in k: L(k) = max over k' >= k
        curve = torch.flip(torch.cummax(torch.flip(curve, [0]), 0).values, [0])
        curves.append(curve)
    return curves


def predicted_loss(curves: list[torch.Tensor], ranks: list[int]) -> float:
    """Σ_g L_g(k_g): the additive prediction of the KL at ``ranks``."""
    return sum(float(c[k]) for c, k in zip(curves, ranks, strict=True))


def knapsack_ranks(
    problem: Problem, curves: list[torch.Tensor], *, options: int = 24, units: int = 20000
) -> list[int]:
    """Ranks minimising Σ_g L_g(k_g) under the budget: knapsack on a grid, then greedy filling.

    Costs are scaled to about ``units`` knapsack units and rounded up, so the knapsack's choice always
    fits the true budget; the filling then spends what the rounding left.
    """
    scale = max(1, math.ceil(problem.budget / units))
    grid, costs, losses = [], [], []
    for g, curve in enumerate(curves):
        lo, hi = problem.min_rank[g], problem.max_rank[g]
        ks = sorted({*torch.linspace(lo, hi, options).round().long().tolist(), problem.homogeneous[g]})
        grid.append(ks)
        costs.append([math.ceil(k * problem.unit_costs[g] / scale) for k in ks])
        losses.append([float(curve[k]) for k in ks])
    chosen = multiple_choice_knapsack(costs, losses, problem.budget // scale)
    ranks = [grid[g][j] for g, j in enumerate(chosen)]
    gains = [
        torch.cat([c[:-1] - c[1:], torch.zeros(1, dtype=c.dtype)]) / u
        for c, u in zip(curves, problem.unit_costs, strict=True)
    ]
    return fill_budget(ranks, problem.unit_costs, problem.budget, gains, problem.max_rank)


def measured_allocation(
    model: nn.Module,
    installed: dict[str, MaskedLinear],
    problem: Problem,
    probe: tuple[torch.Tensor, list[torch.Tensor]],
    heldout: tuple[torch.Tensor, list[torch.Tensor]],
    *,
    ratios: tuple[float, ...],
    options: int,
    units: int,
    batch_size: int = 4,
) -> tuple[list[int], dict[str, Any]]:
    """Probe, solve, and check the additivity assumption on the probe and held-out text."""
    table = probe_losses(model, installed, problem, *probe, ratios, batch_size)
    curves = loss_curves(problem, table)
    ranks = knapsack_ranks(problem, curves, options=options, units=units)
    check = {}
    for label, k in (("chosen", ranks), ("uniform", problem.homogeneous)):
        set_ranks(installed, problem, k)
        check[label] = {
            "predicted_kl": predicted_loss(curves, k),
            "measured_kl": mean_kl(model, *probe, batch_size),
            "heldout_kl": mean_kl(model, *heldout, batch_size),
        }
    set_ranks(installed, problem, None)
    return ranks, {"probes": len(table) and sum(len(r) for r in table), "additivity": check}
