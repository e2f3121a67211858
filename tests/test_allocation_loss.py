"""Loss-driven rank allocation: the budget solver (exact knapsack, filling, rounding, projection) and the
svd-llm-v2 rules that use it (masks at their initial value are uniform; runs are deterministic, within
budget, and recorded in the saved manifest)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from conftest import make_tiny_model, random_tokens

from lowrank.linalg.budget import (
    budget_cost,
    depth_profile,
    fill_budget,
    multiple_choice_knapsack,
    project_to_budget,
    round_to_budget,
)
from lowrank.methods import SVDLLMV2Config, compress
from lowrank.methods.allocation import LOSS_RULES
from lowrank.methods.common import Target


def test_knapsack_solves_small_cases_exactly():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        items = 4
        costs = [torch.randint(0, 9, (3,), generator=g).tolist() for _ in range(items)]
        losses = [torch.rand(3, generator=g, dtype=torch.float64).tolist() for _ in range(items)]
        budget = int(sum(min(c) for c in costs)) + trial % 7
        best = min(
            (sum(losses[i][j] for i, j in enumerate(pick)), pick)
            for pick in itertools.product(range(3), repeat=items)
            if sum(costs[i][j] for i, j in enumerate(pick)) <= budget
        )
        pick = multiple_choice_knapsack(costs, losses, budget)
        assert sum(costs[i][j] for i, j in enumerate(pick)) <= budget
        assert sum(losses[i][j] for i, j in enumerate(pick)) == pytest.approx(best[0], abs=1e-12)


def test_knapsack_refuses_an_impossible_budget():
    with pytest.raises(ValueError, match="cheapest costs 5 > 4"):
        multiple_choice_knapsack([[3, 4], [2, 9]], [[0.0, 1.0], [0.0, 1.0]], 4)


def test_filling_spends_the_budget_exactly_with_shared_unit_costs():
    # three same-shape matrices (unit cost 10), budget 10 · 30: filling from the knapsack's grid choice
    # must land on Σ k = 30 exactly, taking the largest (concave) gains first
    gains = [torch.tensor([5.0, 4, 3, 2, 1, 0.5] * 4) / (i + 1) for i in range(3)]
    ranks = fill_budget([4, 4, 4], [10, 10, 10], 300, gains, [20, 20, 20])
    assert budget_cost(ranks, [10, 10, 10]) == 300
    # mixed unit costs: never over, and no item that could still grow fits the rest
    ranks = fill_budget([1, 1], [7, 11], 100, [torch.ones(50), torch.ones(50)], [50, 50])
    assert 100 - 7 < budget_cost(ranks, [7, 11]) <= 100


def _problem(shapes: list[tuple[int, int]], hom: list[int], lo: list[int], hi: list[int]):
    from lowrank.methods.allocation.problem import Problem

    targets = [
        Target(f"m{i}", i, "x", "x", m, n, k) for i, ((m, n), k) in enumerate(zip(shapes, hom, strict=True))
    ]
    return Problem(
        targets=targets,
        groups=[[t] for t in targets],
        homogeneous=hom,
        min_rank=lo,
        max_rank=hi,
        unit_costs=[m + n for m, n in shapes],
        layers=[float(i) for i in range(len(shapes))],
        n_layers=len(shapes),
    )


def test_knapsack_ranks_meet_the_budget_and_follow_the_losses():
    from lowrank.methods.allocation.measured import knapsack_ranks, loss_curves, predicted_loss

    problem = _problem([(40, 40)] * 4, [10] * 4, [2] * 4, [19] * 4)
    # matrix 0 is ten times as sensitive as the others
    table = [{5: 10.0 * s, 10: 4.0 * s, 15: 1.0 * s} for s in (10.0, 1.0, 1.0, 1.0)]
    curves = loss_curves(problem, table)
    ranks = knapsack_ranks(problem, curves, options=18, units=1000)
    assert budget_cost(ranks, problem.unit_costs) == problem.budget  # same unit costs: exactly
    assert ranks[0] > 10 and all(k < 10 for k in ranks[1:])
    assert predicted_loss(curves, ranks) < predicted_loss(curves, problem.homogeneous)


def test_rounding_never_exceeds_the_budget():
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        n = int(torch.randint(1, 8, (1,), generator=g))
        costs = torch.randint(3, 40, (n,), generator=g).tolist()
        lo = torch.randint(1, 4, (n,), generator=g).tolist()
        hi = [a + int(torch.randint(0, 30, (1,), generator=g)) for a in lo]
        budget = budget_cost(lo, costs) + int(torch.randint(0, 800, (1,), generator=g))
        values = torch.rand(n, generator=g, dtype=torch.float64) * 40 - 5  # some far outside the bounds
        ranks = round_to_budget(values, costs, budget, lo, hi)
        assert budget_cost(ranks, costs) <= budget
        assert all(a <= k <= b for a, k, b in zip(lo, ranks, hi, strict=True))
        growable = [c for c, k, b in zip(costs, ranks, hi, strict=True) if k < b]
        assert not growable or budget - budget_cost(ranks, costs) < min(growable)


def test_projection_spends_the_budget_within_bounds():
    v = torch.tensor([3.0, 9.0, -2.0, 30.0], dtype=torch.float64)
    c = torch.tensor([2.0, 3.0, 5.0, 1.0], dtype=torch.float64)
    lo, hi = torch.ones(4, dtype=torch.float64), torch.full((4,), 12.0, dtype=torch.float64)
    x = project_to_budget(v, c, 50.0, lo, hi)
    assert float((x * c).sum()) == pytest.approx(50.0, rel=1e-9)
    assert bool((x >= lo).all() and (x <= hi).all())


def test_depth_profile_is_flat_at_zero_and_favours_early_layers():
    layers = torch.arange(6)
    assert torch.equal(depth_profile(layers, 6, 0.0), torch.ones(6, dtype=torch.float64))
    w = depth_profile(layers, 6, 1.0)
    assert bool((w[:-1] > w[1:]).all()) and float(w.log().mean()) == pytest.approx(0.0, abs=1e-12)


def _setup(ratio: float = 0.4):
    from lowrank.methods import collect_gram_statistics
    from lowrank.methods.allocation.problem import build_problem, factor_bank
    from lowrank.methods.common import plan_targets
    from lowrank.methods.svd_llm_v2 import rank_bounds

    model = make_tiny_model("llama")
    ids = random_tokens(8, 32)
    config = SVDLLMV2Config(ratio=ratio, calibration={"sequential": False})
    stats = collect_gram_statistics(model, ids, config)
    plan = plan_targets(model, config)
    problem = build_problem(plan, lambda t: rank_bounds(t, config), group_layers=1)
    return model, ids, config, stats, problem, factor_bank(model, problem, stats.per_layer)


def test_masks_at_their_initial_value_reproduce_uniform(one_thread):
    from lowrank.methods.allocation.factors import masked
    from lowrank.methods.allocation.learned import attach_positions

    model, ids, config, stats, problem, bank = _setup()
    reference = copy.deepcopy(model)
    compress(reference, config, calibration=stats)
    with torch.no_grad():
        expected = reference(ids).logits
    theta = torch.zeros(len(problem.groups), dtype=torch.float64, requires_grad=True)
    with masked(model, problem.targets, bank) as installed:
        tau = attach_positions(installed, problem, theta, 0.05)  # every target truncates at τ = hom
        logits = model(ids).logits
        logits.square().mean().backward()
    assert torch.allclose(tau, torch.tensor(problem.homogeneous, dtype=torch.float64))
    err = (logits.detach() - expected).abs().max() / expected.abs().max()
    assert err < 1e-4, err
    assert theta.grad is not None and bool(theta.grad.abs().sum() > 0)  # the soft mask carries a gradient


@pytest.mark.parametrize("rule", LOSS_RULES)
def test_loss_rules_are_deterministic_within_budget_and_saved(rule, tmp_path, one_thread):
    from lowrank.loading.serialization import read_manifest, save_compressed

    ids = random_tokens(8, 32, seed=3)
    settings = {
        "train_samples": 2, "heldout_samples": 2, "seq_len": 32, "group_layers": 1, "seed": 7,
        "probe_ratios": [0.3, 0.6], "mask_steps": 4, "eval_every": 2, "knapsack_units": 2000,
    }  # fmt: skip
    config = SVDLLMV2Config(
        ratio=0.4, allocation=rule, calibration={"sequential": False}, loss_allocation=settings
    )
    runs = []
    for _ in range(2):
        model = make_tiny_model("llama")
        runs.append((model, compress(model, config, calibration=ids)))
    (model, result), (_, again) = runs
    ranks = result.details["allocation"]["ranks"]
    assert ranks == again.details["allocation"]["ranks"]
    uniform = make_tiny_model("llama")
    base = compress(
        uniform,
        SVDLLMV2Config(ratio=0.4, allocation="uniform", calibration={"sequential": False}),
        calibration=ids,
    )
    assert result.details["linear_parameters_after"] <= base.details["linear_parameters_after"]
    assert {n: m.rank for n, m in result.modules.items() if n in ranks} == ranks
    manifest = read_manifest(save_compressed(model, tmp_path / "m"))
    summary = manifest["summaries"][-1]
    assert summary["allocation"]["ranks"] == ranks
    assert summary["config"]["allocation"] == rule and summary["config"]["loss_allocation"]["seed"] == 7


def test_loss_rules_need_token_ids():
    from lowrank.methods import collect_gram_statistics

    model = make_tiny_model("llama")
    stats = collect_gram_statistics(model, random_tokens(8, 32))
    config = SVDLLMV2Config(ratio=0.4, allocation="depth", calibration={"sequential": False})
    with pytest.raises(ValueError, match="needs calibration token ids"):
        compress(model, config, calibration=stats)


def test_auto_keeps_the_candidate_with_the_lowest_heldout_kl(one_thread):
    from lowrank.methods.allocation import CANDIDATE_RULES

    ids = random_tokens(8, 32, seed=4)
    settings = {
        "train_samples": 2, "heldout_samples": 2, "seq_len": 32, "group_layers": 1,
        "probe_ratios": [0.3, 0.6], "mask_steps": 4, "eval_every": 2, "knapsack_units": 2000,
    }  # fmt: skip

    def run(rule):
        config = SVDLLMV2Config(
            ratio=0.4, allocation=rule, calibration={"sequential": False}, loss_allocation=settings
        )
        return compress(make_tiny_model("llama"), config, calibration=ids).details["allocation"]

    auto = run("auto")
    kls = {rule: auto["candidates"][rule]["heldout_kl"] for rule in CANDIDATE_RULES}
    assert auto["chosen"] == min(kls, key=kls.get)
    assert auto["rule"] == "auto"
    assert auto["ranks"] == run(auto["chosen"])["ranks"]  # the chosen rule's own ranks, run alone


def test_the_default_allocates_by_loss_and_falls_back_to_uniform_without_token_ids(caplog):
    from lowrank.methods import collect_gram_statistics

    assert SVDLLMV2Config(ratio=0.2).allocation == "auto"
    model = make_tiny_model("llama")
    stats = collect_gram_statistics(model, random_tokens(8, 32))
    uniform = copy.deepcopy(model)
    with caplog.at_level("WARNING", logger="lowrank.methods.svd_llm_v2"):
        result = compress(
            model, SVDLLMV2Config(ratio=0.4, calibration={"sequential": False}), calibration=stats
        )
    assert "falling back to uniform ranks" in caplog.text
    assert "no calibration token ids" in result.details["allocation"]["fallback"]
    assert result.details["allocation_rule"].startswith("uniform (auto fell back")
    config = SVDLLMV2Config(ratio=0.4, allocation="uniform", calibration={"sequential": False})
    base = compress(uniform, config, calibration=stats)
    assert {n: m.rank for n, m in result.modules.items()} == {n: m.rank for n, m in base.modules.items()}
    few = compress(make_tiny_model("llama"), SVDLLMV2Config(ratio=0.4), calibration=random_tokens(2, 16))
    assert "needs 8 calibration sequences" in few.details["allocation"]["fallback"]
