"""Ratio conventions, break-even ranks, and heterogeneous allocation under an exact budget."""

from __future__ import annotations

import itertools

import pytest
import torch

from lowrank.linalg.allocation import (
    ALLOCATION_RULES,
    allocate_ranks,
    break_even_rank,
    keep_fraction_for_rank,
    rank_for_keep_fraction,
    rank_for_ratio,
    ratio_for_rank,
    saves_parameters,
)


def test_svd_llm_ratio_convention():
    # SmolLM2 q_proj 576×576 at 20 % removed: k = ⌊576·576·0.8/1152⌋ = 230
    assert rank_for_ratio(576, 576, 0.2) == 230
    assert rank_for_ratio(4096, 11008, 0.2) == int(4096 * 11008 * 0.8 / (4096 + 11008))
    k = rank_for_ratio(1536, 576, 0.3)
    assert ratio_for_rank(1536, 576, k) >= 0.3 > ratio_for_rank(1536, 576, k + 1)
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=str(bad)):
            rank_for_ratio(10, 10, bad)


def test_keep_fraction_convention_and_break_even():
    assert rank_for_keep_fraction(576, 192, 0.5) == 96
    assert keep_fraction_for_rank(576, 192, 96) == 0.5
    assert break_even_rank(576, 576) == 288
    assert saves_parameters(576, 576, 287) and not saves_parameters(576, 576, 288)
    # keeping 60 % of a square matrix's singular values saves nothing
    assert not saves_parameters(100, 100, rank_for_keep_fraction(100, 100, 0.6))
    with pytest.raises(ValueError, match="keep_singular_fraction"):
        rank_for_keep_fraction(10, 10, 0.0)


def _spectra(count=5, n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    decay = torch.rand(count, generator=g) * 0.5 + 0.05
    scale = torch.rand(count, generator=g) * 10 + 0.1
    return [
        s * torch.exp(-d * torch.arange(n, dtype=torch.float64)) for s, d in zip(scale, decay, strict=True)
    ]


def _loss(spectra, ranks):
    return sum(float(s[k:].sum()) for s, k in zip(spectra, ranks, strict=True))


@pytest.mark.parametrize("rule", ALLOCATION_RULES)
def test_budget_is_kept_exactly_within_bounds(rule):
    spectra = _spectra()
    totals = [float(s.sum()) for s in spectra]
    homogeneous = [7] * 5
    ranks = allocate_ranks(spectra, totals, homogeneous, rule=rule, min_rank=3, max_rank=14)
    assert sum(ranks) == sum(homogeneous)
    assert all(3 <= k <= 14 for k in ranks)


def test_greedy_is_the_exact_minimum_of_total_loss():
    spectra = _spectra(count=3, n=8)
    totals = [float(s.sum()) for s in spectra]
    ranks = allocate_ranks(spectra, totals, [4, 4, 4], rule="greedy", min_rank=1, max_rank=8)
    best = min(_loss(spectra, ks) for ks in itertools.product(range(1, 9), repeat=3) if sum(ks) == 12)
    assert _loss(spectra, ranks) == pytest.approx(best, rel=1e-12)
    assert _loss(spectra, ranks) < _loss(spectra, [4, 4, 4])


def test_relative_rule_minimises_normalised_loss():
    spectra = _spectra(count=4, n=12, seed=3)
    totals = [float(s.sum()) for s in spectra]
    rel = [s / t for s, t in zip(spectra, totals, strict=True)]
    ranks = allocate_ranks(spectra, totals, [5] * 4, rule="greedy_relative")
    best = min(_loss(rel, ks) for ks in itertools.product(range(1, 13), repeat=4) if sum(ks) == 20)
    assert _loss(rel, ranks) == pytest.approx(best, rel=1e-12)


def test_anchored_rule_is_not_fooled_by_one_massive_direction():
    normal = torch.exp(-0.1 * torch.arange(40, dtype=torch.float64))
    massive = normal.clone()
    massive[0] = 1e6  # an outlier feature: dominates ‖W S‖²_F, irrelevant to the other directions
    spectra = [normal, massive]
    totals = [float(s.sum()) for s in spectra]
    relative = allocate_ranks(spectra, totals, [10, 10], rule="greedy_relative")
    anchored = allocate_ranks(spectra, totals, [10, 10], rule="greedy_anchored")
    assert relative[1] < relative[0]  # the normalised rule strips the outlier matrix
    assert abs(anchored[0] - anchored[1]) <= 1 and sum(anchored) == 20


def test_log_inverse_compresses_low_loss_matrices_more():
    flat = torch.ones(20, dtype=torch.float64)  # incompressible: every direction matters equally
    steep = torch.exp(-torch.arange(20, dtype=torch.float64))  # nearly rank one
    ranks = allocate_ranks([flat, steep], [20.0, float(steep.sum())], [8, 8], rule="log_inverse")
    assert sum(ranks) == 16 and ranks[0] > ranks[1]


def test_uniform_rule_keeps_the_homogeneous_ranks():
    spectra = _spectra(count=3, n=12)
    totals = [float(s.sum()) for s in spectra]
    assert allocate_ranks(spectra, totals, [4, 6, 5], rule="uniform", min_rank=2, max_rank=10) == [4, 6, 5]


def test_cli_offers_every_rule():
    from lowrank.cli import build_parser

    parser = build_parser("compress")._subparsers._group_actions[0].choices["compress"]
    (allocation,) = [a for a in parser._actions if "--allocation" in a.option_strings]
    from lowrank.methods.allocation import LOSS_RULES

    assert set(allocation.choices) == set(ALLOCATION_RULES) | set(LOSS_RULES)


def test_bad_rule_and_infeasible_budget():
    spectra = _spectra(count=2)
    with pytest.raises(ValueError, match="'paper'"):
        allocate_ranks(spectra, [1.0, 1.0], [3, 3], rule="paper")
    with pytest.raises(ValueError, match="budget 30"):
        allocate_ranks(spectra, [1.0, 1.0], [15, 15], max_rank=10)
