"""Rank arithmetic: compression-ratio conventions, break-even ranks, heterogeneous allocation.

Conventions for W (m × n) kept at rank k as two factors (k(m + n) parameters):

* ``ratio`` (SVD-LLM): fraction of the matrix's parameters REMOVED, k = ⌊m·n·(1 − ratio)/(m + n)⌋;
* ``keep_fraction`` (the rSVD paper's r): fraction of singular values kept, k = ⌊r · min(m, n)⌋.

A factorization saves parameters only while k(m + n) < m·n; at or beyond the break-even rank the matrix
is better kept dense.

Heterogeneous allocation (SVD-LLM V2) redistributes ranks within a group of same-type matrices (all
``q_proj``, all ``down_proj``, …) from their whitened spectra σ², keeping the group's parameter budget
equal to the homogeneous one. The truncation loss of matrix i at rank k is
ℓ_i(k) = Σ_{j ≥ k} σ²_ij. Rules (see :data:`ALLOCATION_RULES`):

* ``greedy``: minimise Σ_i ℓ_i(k_i). Because σ² is non-increasing the marginal gain of one more rank
  is σ²_{i,k_i}, so taking the largest marginal gains first (water-filling) is exactly optimal.
* ``greedy_relative``: the same on ℓ_i / ‖W_i S_i‖²_F, i.e. every matrix's loss relative to its own
  output energy (the layers' outputs are added to a residual stream whose scale grows with depth,
  so absolute losses over-weight late layers).
* ``greedy_anchored``: the same on ℓ_i / ℓ_i(k_hom), every matrix's loss relative to its own loss at
  the homogeneous rank. Unlike ‖W S‖²_F, this reference is not dominated by one massive activation
  direction (a few down projections carry outlier features whose energy dwarfs everything else, which
  makes ``greedy_relative`` see their other directions as free to cut).
* ``uniform``: no reallocation; every matrix keeps its homogeneous rank (V2's truncation with SVD-LLM's
  uniform ratios; the reference the other rules are measured against).
* ``log_inverse``: our reading of the paper's rule: compute each matrix's relative loss ℓ̂_i at the
  homogeneous rank and remove parameters in proportion to −log ℓ̂_i (low loss → compressed more),
  then repair rounding and the rank bounds greedily so the budget is met exactly.

References:
    Wang et al., "SVD-LLM V2", NAACL 2025, §3.1 (heterogeneous compression ratio allocation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "ALLOCATION_RULES",
    "rank_for_ratio",
    "rank_for_keep_fraction",
    "ratio_for_rank",
    "keep_fraction_for_rank",
    "break_even_rank",
    "saves_parameters",
    "dense_parameters",
    "factored_parameters",
    "allocate_ranks",
]

ALLOCATION_RULES = ("greedy", "greedy_relative", "greedy_anchored", "log_inverse", "uniform")


def _check_shape(m: int, n: int) -> None:
    if m < 1 or n < 1:
        raise ValueError(f"matrix shape must be positive; got {m} × {n}")


def dense_parameters(out_features: int, in_features: int, bias: bool = False) -> int:
    """Parameters of a dense ``out × in`` matrix (plus an optional bias): the one formula every count uses."""
    return out_features * in_features + (out_features if bias else 0)


def factored_parameters(out_features: int, in_features: int, rank: int, bias: bool = False) -> int:
    """Parameters of rank-``rank`` factors ``(out × rank)(rank × in)`` (plus an optional bias)."""
    return rank * (out_features + in_features) + (out_features if bias else 0)


def rank_for_ratio(m: int, n: int, ratio: float) -> int:
    """SVD-LLM rank for removing ``ratio`` of an m × n matrix's parameters: ⌊m n (1 − ratio)/(m + n)⌋ ≥ 1."""
    _check_shape(m, n)
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio (fraction of parameters removed) must be in [0, 1); got {ratio}")
    return max(1, min(int(m * n * (1.0 - ratio) / (m + n)), min(m, n)))


def rank_for_keep_fraction(m: int, n: int, keep_fraction: float) -> int:
    """Rank keeping ``keep_fraction`` of the singular values: ⌊r · min(m, n)⌋, at least 1."""
    _check_shape(m, n)
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_singular_fraction must be in (0, 1]; got {keep_fraction}")
    return max(1, int(keep_fraction * min(m, n)))


def ratio_for_rank(m: int, n: int, rank: int) -> float:
    """Fraction of parameters removed by rank ``rank`` factors (negative when they are larger)."""
    _check_shape(m, n)
    return 1.0 - factored_parameters(m, n, rank) / dense_parameters(m, n)


def keep_fraction_for_rank(m: int, n: int, rank: int) -> float:
    """Fraction of singular values kept at ``rank``."""
    _check_shape(m, n)
    return rank / min(m, n)


def break_even_rank(m: int, n: int) -> int:
    """Smallest rank whose factors are not smaller than the dense matrix: ⌈m n/(m + n)⌉."""
    _check_shape(m, n)
    return -(-(m * n) // (m + n))


def saves_parameters(m: int, n: int, rank: int) -> bool:
    """Whether rank-``rank`` factors hold strictly fewer parameters than the dense m × n matrix."""
    return factored_parameters(m, n, rank) < dense_parameters(m, n)


def _greedy(gains: Sequence[torch.Tensor], lo: list[int], hi: list[int], extra: int) -> list[int]:
    """Give ``extra`` more ranks above ``lo`` to the largest marginal gains (gains[i][j]: rank j → j+1)."""
    values, owners = [], []
    for i, g in enumerate(gains):
        seg = g[lo[i] : hi[i]].to(torch.float64)
        values.append(seg)
        owners.append(torch.full((seg.numel(),), i, dtype=torch.long))
    ranks = list(lo)
    if extra <= 0 or not values:
        return ranks
    flat, who = torch.cat(values), torch.cat(owners)
    # stable sort: ties go to the earlier matrix, so the result is deterministic
    order = torch.sort(flat, descending=True, stable=True).indices[:extra]
    for i in who[order].tolist():
        ranks[i] += 1
    return ranks


def allocate_ranks(
    spectra: Sequence[torch.Tensor],
    totals: Sequence[float],
    homogeneous: Sequence[int],
    *,
    rule: str = "greedy_relative",
    min_rank: Sequence[int] | int = 1,
    max_rank: Sequence[int] | int | None = None,
) -> list[int]:
    """Redistribute ranks among same-shape matrices so that Σ k_i = Σ homogeneous_i exactly.

    Args:
        spectra: per matrix, squared whitened singular values σ² (descending), at least ``max_rank`` long.
        totals: per matrix, ‖W S‖²_F (the loss at rank 0; normalises ``greedy_relative``/``log_inverse``).
        homogeneous: per matrix, the homogeneous rank; the budget is their sum.
        rule: one of :data:`ALLOCATION_RULES`.
        min_rank, max_rank: bounds per matrix (scalars broadcast); ``max_rank`` defaults to the
            length of each spectrum.

    Returns:
        Ranks k_i with lo_i ≤ k_i ≤ hi_i and Σ k_i = Σ homogeneous_i (matrices of one group share a
        shape, so equal rank sums mean equal parameter budgets).

    Raises:
        ValueError: unknown rule, or the budget lies outside [Σ lo, Σ hi].
    """
    if rule not in ALLOCATION_RULES:
        raise ValueError(f"allocation rule must be one of {ALLOCATION_RULES}; got {rule!r}")
    count = len(spectra)
    lo = [min_rank] * count if isinstance(min_rank, int) else list(min_rank)
    if max_rank is None:
        hi = [s.numel() for s in spectra]
    else:
        hi = [max_rank] * count if isinstance(max_rank, int) else list(max_rank)
    hi = [min(h, s.numel()) for h, s in zip(hi, spectra, strict=True)]
    budget = int(sum(homogeneous))
    if not sum(lo) <= budget <= sum(hi):
        raise ValueError(f"rank budget {budget} outside the bounds [{sum(lo)}, {sum(hi)}] of the group")
    if rule == "uniform":
        return [int(k) for k in homogeneous]
    if rule == "greedy":
        return _greedy(list(spectra), lo, hi, budget - sum(lo))
    relative = [s.to(torch.float64) / max(t, 1e-300) for s, t in zip(spectra, totals, strict=True)]
    if rule == "greedy_relative":
        return _greedy(relative, lo, hi, budget - sum(lo))
    if rule == "greedy_anchored":
        anchored = [
            s.to(torch.float64) / max(float(s[k:].sum()), 1e-300)
            for s, k in zip(spectra, homogeneous, strict=True)
        ]
        return _greedy(anchored, lo, hi, budget - sum(lo))
    return _log_inverse(relative, list(homogeneous), lo, hi, budget)


def _log_inverse(relative, homogeneous, lo, hi, budget) -> list[int]:
    """Paper-style: parameters removed ∝ −log(relative loss at the homogeneous rank)."""
    full = [s.numel() for s in relative]
    losses = [max(float(s[k:].sum()), 1e-30) for s, k in zip(relative, homogeneous, strict=True)]
    weights = [-math.log(min(x, 1.0 - 1e-12)) for x in losses]
    removed_total = sum(f - k for f, k in zip(full, homogeneous, strict=True))
    wsum = sum(weights)
    target = [f - removed_total * w / wsum for f, w in zip(full, weights, strict=True)]
    ranks = [min(max(int(t), a), b) for t, a, b in zip(target, lo, hi, strict=True)]
    # repair rounding and clipping: add/remove one rank at a time where it costs/gains the least loss
    while sum(ranks) < budget:
        i = max(
            (i for i in range(len(ranks)) if ranks[i] < hi[i]), key=lambda i: float(relative[i][ranks[i]])
        )
        ranks[i] += 1
    while sum(ranks) > budget:
        i = min(
            (i for i in range(len(ranks)) if ranks[i] > lo[i]), key=lambda i: float(relative[i][ranks[i] - 1])
        )
        ranks[i] -= 1
    return ranks
