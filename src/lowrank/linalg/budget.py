"""Rank choices under a parameter budget: multiple-choice knapsack, greedy filling, rounding, projection.

Every function takes tensors or integers and returns integers (ranks, choices) or tensors; none sees a
model. Matrix i kept at rank k_i as two factors costs k_i · c_i parameters, c_i = m_i + n_i (its *unit
cost*); a budget B holds when Σ_i k_i c_i ≤ B.

* :func:`multiple_choice_knapsack`: every item picks exactly one of its options (cost, loss) so that the
  summed loss is minimal and the summed cost within the budget; exact dynamic programming over integer
  costs (Kellerer, Pferschy and Pisinger, "Knapsack Problems", 2004, §11.5).
* :func:`fill_budget`: from given ranks, add one rank at a time to the item with the highest priority
  that still fits, until nothing fits (the greedy of water-filling, exact for concave gains).
* :func:`round_to_budget`: real-valued ranks to integers that never exceed the budget and leave less
  than one unit cost of it unused.
* :func:`project_to_budget`: the Euclidean projection of real ranks onto {Σ c_i x_i = B, lo ≤ x ≤ hi}.
* :func:`depth_profile`: one-parameter rank multipliers over depth (early layers get more rank).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

import torch

__all__ = [
    "multiple_choice_knapsack",
    "fill_budget",
    "round_to_budget",
    "project_to_budget",
    "depth_profile",
    "budget_cost",
]


def budget_cost(ranks: Sequence[int], unit_costs: Sequence[int]) -> int:
    """Σ_i k_i c_i: the parameters of factors of ranks ``ranks`` with unit costs ``unit_costs``."""
    return sum(int(k) * int(c) for k, c in zip(ranks, unit_costs, strict=True))


def multiple_choice_knapsack(
    costs: Sequence[Sequence[int]], losses: Sequence[Sequence[float]], budget: int
) -> list[int]:
    """Pick one option per item minimising Σ losses subject to Σ costs ≤ ``budget`` (exact).

    Dynamic programming over the total cost: ``best[c]`` is the least loss of the items so far at total
    cost exactly c; each item's options shift and combine it. Time O(items · options · budget), memory
    O(items · budget) for the choices; scale large costs down (rounding up keeps any answer feasible).

    Args:
        costs: per item, the non-negative integer cost of each option.
        losses: per item, the loss of each option (same shape as ``costs``).
        budget: the largest total cost allowed (non-negative integer).

    Returns:
        The index of the chosen option of every item (ties: the earliest option).

    Raises:
        ValueError: shapes differ, a cost is negative, or no choice fits the budget.
    """
    shapes_differ = len(costs) != len(losses) or any(
        len(c) != len(v) or not c for c, v in zip(costs, losses, strict=False)
    )
    if shapes_differ:
        raise ValueError("costs and losses need the same number of items and of options per item (>= 1)")
    if budget < 0 or any(int(x) < 0 for c in costs for x in c):
        raise ValueError(f"costs and the budget must be non-negative; got budget {budget}")
    least = sum(min(int(x) for x in c) for c in costs)
    if least > budget:
        raise ValueError(f"no choice fits the budget: the cheapest costs {least} > {budget}")
    inf = torch.tensor(math.inf, dtype=torch.float64)
    best = torch.full((budget + 1,), math.inf, dtype=torch.float64)
    best[0] = 0.0
    choices = []
    for item_costs, item_losses in zip(costs, losses, strict=True):
        new = torch.full_like(best, math.inf)
        pick = torch.zeros(budget + 1, dtype=torch.int32)
        for j, (c, v) in enumerate(zip(item_costs, item_losses, strict=True)):
            c = int(c)
            if c > budget:
                continue
            shifted = torch.cat([inf.expand(c), best[: budget + 1 - c]]) + float(v)
            better = shifted < new  # strict: ties keep the earlier option
            new = torch.where(better, shifted, new)
            pick = torch.where(better, torch.tensor(j, dtype=torch.int32), pick)
        best = new
        choices.append(pick)
    total = int(torch.argmin(best))  # first minimum: the cheapest of equally good totals
    out = []
    for item_costs, pick in zip(reversed(costs), reversed(choices), strict=True):
        j = int(pick[total])
        out.append(j)
        total -= int(item_costs[j])
    return out[::-1]


def fill_budget(
    ranks: Sequence[int],
    unit_costs: Sequence[int],
    budget: int,
    priority: Sequence[torch.Tensor],
    max_rank: Sequence[int],
) -> list[int]:
    """Add ranks one at a time, highest ``priority[i][k]`` (item i from rank k to k + 1) first, while
    the increment fits the budget; stop when none fits.

    Priorities should be per parameter (a loss decrease divided by the unit cost) and non-increasing in
    k for the greedy to be optimal. Items at ``max_rank`` or with a ``-inf`` priority take no more.

    Returns:
        New ranks with Σ k_i c_i ≤ ``budget``; if every item could still grow, less than min c_i unused.

    Raises:
        ValueError: the starting ranks already exceed the budget.
    """
    out = [int(k) for k in ranks]
    used = budget_cost(out, unit_costs)
    if used > budget:
        raise ValueError(f"the starting ranks cost {used} > budget {budget}")

    def push(heap, i):
        k = out[i]
        if k < max_rank[i] and k < len(priority[i]):
            p = float(priority[i][k])
            if p > -math.inf:
                heapq.heappush(heap, (-p, i))  # ties: the lower index first

    heap: list[tuple[float, int]] = []
    for i in range(len(out)):
        push(heap, i)
    while heap:
        _, i = heapq.heappop(heap)
        if used + unit_costs[i] > budget:
            continue  # this item no longer fits; cheaper ones may
        out[i] += 1
        used += unit_costs[i]
        push(heap, i)
    return out


def round_to_budget(
    values: torch.Tensor,
    unit_costs: Sequence[int],
    budget: int,
    min_rank: Sequence[int],
    max_rank: Sequence[int],
) -> list[int]:
    """Integer ranks near real ``values`` that never exceed ``budget``.

    Floors every value into [lo, hi]; while over budget, lowers the rank that most exceeds its value;
    then adds ranks in order of how far each rank is below its value (:func:`fill_budget`), so the
    unused budget is smaller than the smallest unit cost of an item below its upper bound.

    Raises:
        ValueError: even the lower bounds exceed the budget.
    """
    v = values.detach().to(torch.float64).flatten()
    lo, hi = [int(x) for x in min_rank], [int(x) for x in max_rank]
    if budget_cost(lo, unit_costs) > budget:
        raise ValueError(f"the lower bounds cost {budget_cost(lo, unit_costs)} > budget {budget}")
    ranks = [min(max(int(math.floor(float(x))), a), b) for x, a, b in zip(v.tolist(), lo, hi, strict=True)]
    used = budget_cost(ranks, unit_costs)
    while used > budget:
        excess = [k - x if k > a else -math.inf for k, x, a in zip(ranks, v.tolist(), lo, strict=True)]
        i = max(range(len(ranks)), key=lambda j: (excess[j], -j))
        ranks[i] -= 1
        used -= unit_costs[i]
    top = max(hi) + 1
    priority = [(x - torch.arange(top, dtype=torch.float64)) for x in v.tolist()]
    return fill_budget(ranks, unit_costs, budget, priority, hi)


def project_to_budget(
    values: torch.Tensor,
    unit_costs: torch.Tensor,
    budget: float,
    min_rank: torch.Tensor,
    max_rank: torch.Tensor,
    *,
    iters: int = 100,
) -> torch.Tensor:
    """Euclidean projection of ``values`` onto {x : Σ c_i x_i = budget, lo ≤ x ≤ hi}.

    x_i(μ) = clamp(v_i − μ c_i, lo_i, hi_i) is non-increasing in μ; bisection finds the μ that spends
    the budget (clamped to the nearest feasible total when the bounds cannot meet it).
    """
    v, c = values.detach().to(torch.float64), unit_costs.to(torch.float64)
    lo, hi = min_rank.to(torch.float64), max_rank.to(torch.float64)

    def spent(mu: float) -> float:
        return float(((v - mu * c).clamp(lo, hi) * c).sum())

    scale = float((v.abs().max() + hi.abs().max()) / c.min()) + 1.0
    a, b = -scale, scale
    for _ in range(iters):
        mid = (a + b) / 2
        a, b = (mid, b) if spent(mid) > budget else (a, mid)
    return (v - (a + b) / 2 * c).clamp(lo, hi).to(values.dtype)


def depth_profile(layers: torch.Tensor, n_layers: int, slope: float) -> torch.Tensor:
    """Rank multipliers exp(slope · (½ − l/(L − 1))) of layer indices ``layers``: above 1 for early layers
    when ``slope`` > 0, all 1 at ``slope`` = 0 (uniform), geometric mean 1 over evenly spread layers."""
    depth = layers.to(torch.float64) / max(n_layers - 1, 1)
    return torch.exp(slope * (0.5 - depth))
