"""Depth prior (``allocation='depth'``): ranks rising toward early layers, one slope tuned on held-out text.

Group g in (mean) layer l gets k_g ∝ k_g^hom · exp(s (½ − l/(L − 1))), scaled so the budget is spent
(:func:`lowrank.linalg.budget.round_to_budget`). Each slope s of the grid is scored by the KL to the
original on held-out calibration text; s = 0 (uniform) is always in the grid, so on that text the prior
is never worse than uniform. The cheap baseline of ResSVD / CARE's depth profiles.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowrank.linalg.budget import depth_profile, round_to_budget
from lowrank.methods.allocation.factors import MaskedLinear, mean_kl
from lowrank.methods.allocation.problem import Problem, as_tensor, set_ranks

__all__ = ["depth_ranks", "depth_allocation"]


def depth_ranks(problem: Problem, slope: float) -> list[int]:
    """Ranks of the depth prior at ``slope`` that spend the budget (within one unit cost)."""
    hom, unit = as_tensor(problem.homogeneous), as_tensor(problem.unit_costs)
    lo, hi = as_tensor(problem.min_rank), as_tensor(problem.max_rank)
    raw = hom * depth_profile(torch.tensor(problem.layers), problem.n_layers, slope)
    a, b = 0.0, 4.0 * float(hi.max() / raw.min())
    for _ in range(60):  # the scale whose clamped ranks spend the budget
        mid = (a + b) / 2
        a, b = (mid, b) if float(((raw * mid).clamp(lo, hi) * unit).sum()) < problem.budget else (a, mid)
    values = (raw * a).clamp(lo, hi)
    return round_to_budget(values, problem.unit_costs, problem.budget, problem.min_rank, problem.max_rank)


@torch.no_grad()
def depth_allocation(
    model: nn.Module,
    installed: dict[str, MaskedLinear],
    problem: Problem,
    heldout: tuple[torch.Tensor, list[torch.Tensor]],
    *,
    slopes: tuple[float, ...],
    batch_size: int = 4,
) -> tuple[list[int], dict[str, Any]]:
    """The slope of ``slopes`` (0 added) with the lowest held-out KL, and its ranks."""
    scores = {}
    for s in sorted({0.0, *slopes}):
        ranks = problem.homogeneous if s == 0 else depth_ranks(problem, s)
        set_ranks(installed, problem, ranks)
        scores[s] = (mean_kl(model, *heldout, batch_size), ranks)
    set_ranks(installed, problem, None)
    slope = min(scores, key=lambda s: (scores[s][0], abs(s)))
    return scores[slope][1], {"slope": slope, "heldout_kl": {str(s): v[0] for s, v in scores.items()}}
