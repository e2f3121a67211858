"""Learned truncation positions (``allocation='learned'``; Dobi-SVD / ARS style).

Every group g gets a truncation position τ_g = k_g^hom · (1 + θ_g) over its sorted whitened singular
values; the masked model (:class:`MaskedLinear`, straight-through hard mask) is trained for the KL to
the original model (the healing code's KD term) with Adam on θ only; nothing else trains. The budget
Σ_g τ_g c_g = B is held exactly: after every step τ is projected onto it (the limit of an infinitely
weighted quadratic penalty, so no penalty weight needs tuning and the final rounding moves ranks by at
most one). θ = 0 is exactly the uniform allocation. Every ``eval_every`` steps the positions are rounded
to ranks within the budget and scored on held-out calibration text; the best (uniform included) wins.

References:
    Wang et al., "Dobi-SVD: Differentiable SVD for LLM compression", ICLR 2025.
    Gao et al., "Adaptive rank selections for low-rank approximation of language models", NAACL 2024.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowrank.linalg.budget import project_to_budget, round_to_budget
from lowrank.methods.allocation.factors import MaskedLinear, batch_kl, mean_kl
from lowrank.methods.allocation.problem import Problem, as_tensor, set_ranks

__all__ = ["learned_allocation", "attach_positions"]


def attach_positions(
    installed: dict[str, MaskedLinear], problem: Problem, theta: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Let every member of group g truncate at τ_g = hom_g (1 + θ_g); return τ."""
    hom = as_tensor(problem.homogeneous).to(theta.dtype)
    tau = hom * (1 + theta)
    for g, members in enumerate(problem.groups):
        for t in members:
            installed[t.name].learn_position(tau[g], max(temperature * problem.homogeneous[g], 0.5))
    return tau


def rounded(problem: Problem, tau: torch.Tensor) -> list[int]:
    """Ranks near τ within the bounds that never exceed the budget."""
    return round_to_budget(tau, problem.unit_costs, problem.budget, problem.min_rank, problem.max_rank)


def learned_allocation(
    model: nn.Module,
    installed: dict[str, MaskedLinear],
    problem: Problem,
    train: tuple[torch.Tensor, list[torch.Tensor]],
    heldout: tuple[torch.Tensor, list[torch.Tensor]],
    *,
    steps: int,
    lr: float,
    temperature: float,
    eval_every: int,
    seed: int,
    batch_size: int = 4,
) -> tuple[list[int], dict[str, Any]]:
    """Train the positions on ``train`` (ids, reference logits per batch), select on ``heldout``."""
    ids, reference = train
    batches = list(zip(ids.split(batch_size), reference, strict=True))
    order = torch.randint(len(batches), (steps + 1,), generator=torch.Generator().manual_seed(seed))
    theta = torch.zeros(len(problem.groups), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=lr)
    hom, unit = as_tensor(problem.homogeneous), as_tensor(problem.unit_costs)
    lo, hi = as_tensor(problem.min_rank), as_tensor(problem.max_rank)
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    history: list[dict[str, Any]] = []
    train_kl: list[float] = []

    def score(step: int) -> tuple[float, list[int]]:
        ranks = rounded(problem, (hom * (1 + theta.detach())))
        set_ranks(installed, problem, ranks)
        kl = mean_kl(model, *heldout, batch_size)
        history.append({"step": step, "heldout_kl": kl})
        return kl, ranks

    try:
        best = score(0)
        for step in range(1, steps + 1):
            batch, ref = batches[int(order[step])]
            attach_positions(installed, problem, theta, temperature)
            loss = batch_kl(model, batch, ref)
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                tau = project_to_budget(hom * (1 + theta), unit, float(problem.budget), lo, hi)
                theta.copy_(tau / hom - 1)
            train_kl.append(round(float(loss.detach()), 6))
            if step % eval_every == 0 or step == steps:
                best = min(best, score(step), key=lambda s: s[0])
    finally:
        for p, r in zip(model.parameters(), requires, strict=True):
            p.requires_grad_(r)
        set_ranks(installed, problem, None)
    return best[1], {"history": history, "train_kl": train_kl, "heldout_kl": best[0]}
