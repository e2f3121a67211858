"""Rank allocation from the end loss: measured sensitivity + knapsack, learned truncation, depth prior.

The spectrum rules of :mod:`lowrank.linalg.allocation` see only each matrix's truncation energy; these
see the model's output: the per-token KL divergence to the original model on calibration text. All three
work on the whitened factors of the original model (computed once), group the targets by kind and block
of layers (:mod:`.problem`), keep the parameter budget of the uniform ranks, and choose on calibration
text only (a held-out part of it selects any hyper-parameter).

* ``measured`` (:mod:`.measured`): probe each group at a few ranks, knapsack on the summed losses.
* ``learned`` (:mod:`.learned`): train straight-through truncation positions for the KL, round.
* ``depth`` (:mod:`.depth`): ranks exp(s (½ − depth)) × uniform, the slope s picked on held-out text.
* ``auto``: runs the three and keeps the ranks with the lowest KL on the held-out calibration text. On the
  built-in model that is ``measured`` at 10–40 % removed and ``learned`` at 60 %, which beats uniform at
  every measured ratio on wiki and out of domain (benchmarks/results/allocation_cpu.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from lowrank.core.config import Config
from lowrank.methods.allocation.depth import depth_allocation
from lowrank.methods.allocation.factors import masked, mean_kl, reference_logits
from lowrank.methods.allocation.learned import learned_allocation
from lowrank.methods.allocation.measured import measured_allocation
from lowrank.methods.allocation.problem import Problem, build_problem, factor_bank, set_ranks, uniform_check
from lowrank.methods.common import Target

__all__ = ["CANDIDATE_RULES", "LOSS_RULES", "LossAllocationConfig", "allocate_by_loss", "calibration_split"]

CANDIDATE_RULES = ("measured", "learned", "depth")
"""The rules ``auto`` runs and chooses among."""
LOSS_RULES = (*CANDIDATE_RULES, "auto")


@dataclass(kw_only=True)
class LossAllocationConfig(Config):
    """Settings of the loss-driven allocation rules (``allocation`` = ``measured``/``learned``/``depth``)."""

    label: ClassVar[str] = "loss allocation"
    train_samples: int = field(default=4, metadata={"range": "[1, inf)"})
    """Calibration sequences the probes and the mask training see (the first ones)."""
    heldout_samples: int = field(default=4, metadata={"range": "[1, inf)"})
    """Calibration sequences held out to select hyper-parameters and check the prediction (the last)."""
    seq_len: int = field(default=128, metadata={"range": "[1, inf)"})
    """Tokens of each of those sequences (their first ones)."""
    group_layers: int = field(default=5, metadata={"range": "[1, inf)"})
    """Consecutive layers whose matrices of one kind share a rank (``measured``/``learned``)."""
    probe_ratios: tuple[float, ...] = (0.2, 0.45, 0.7)
    """Fractions of a matrix's parameters removed at which each group is probed (``measured``)."""
    knapsack_options: int = field(default=24, metadata={"range": "[1, inf)"})
    """Ranks per group the knapsack chooses among (evenly spaced in the bounds, plus the uniform one)."""
    knapsack_units: int = field(default=20000, metadata={"range": "[1, inf)"})
    """Resolution of the knapsack's budget (its costs are rounded up to this many units)."""
    mask_steps: int = field(default=20, metadata={"range": "[0, inf)"})
    """Training steps of the truncation positions (``learned``)."""
    mask_lr: float = field(default=0.05, metadata={"range": "(0, inf)"})
    """Adam step of the positions, relative to the uniform rank."""
    mask_temperature: float = field(default=0.05, metadata={"range": "(0, inf)"})
    """Width of the soft mask's sigmoid, relative to the uniform rank."""
    eval_every: int = field(default=5, metadata={"range": "[1, inf)"})
    """Steps between held-out evaluations of the rounded positions (the best is kept)."""
    depth_slopes: tuple[float, ...] = (-0.5, 0.5, 1.0, 1.5)
    """Slopes of the depth prior scored on held-out text (0, uniform, always too)."""
    seed: int = field(default=0, metadata={"range": "[0, inf)"})
    """Seed of the order of the training batches."""
    batch_size: int = field(default=2, metadata={"range": "[1, inf)"})
    """Sequences per forward pass."""

    def __post_init__(self) -> None:
        self.probe_ratios = tuple(self.probe_ratios)
        self.depth_slopes = tuple(self.depth_slopes)
        super().__post_init__()
        if not self.probe_ratios or not all(0.0 <= r < 1.0 for r in self.probe_ratios):
            raise ValueError(f"allocation probe_ratios must be fractions in [0, 1); got {self.probe_ratios}")


def calibration_split(ids: torch.Tensor, config: LossAllocationConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) token ids: the first and the last calibration sequences, never the same ones."""
    need = config.train_samples + config.heldout_samples
    if ids.ndim != 2 or ids.shape[0] < need:
        raise ValueError(
            f"loss-driven allocation needs at least {need} calibration sequences "
            f"(train_samples + heldout_samples); got {tuple(ids.shape)}"
        )
    return ids[: config.train_samples, : config.seq_len], ids[-config.heldout_samples :, : config.seq_len]


def allocate_by_loss(
    model: nn.Module,
    rule: str,
    config: LossAllocationConfig,
    plan: list[Target],
    bounds: Callable[[Target], tuple[int, int]],
    per_layer: list[dict],
    ids: torch.Tensor,
) -> dict[str, Any]:
    """Set ``t.rank`` of every factorized target of ``plan`` by ``rule``; return what was chosen and why.

    Args:
        rule: one of :data:`LOSS_RULES`.
        bounds: ``target -> (lo, hi)`` rank bounds.
        per_layer: input Grams of the UNCHANGED model per layer (``per_layer[i][rel].gram``).
        ids: calibration token ids (samples, seq); split by :func:`calibration_split`.
    """
    if rule not in LOSS_RULES:
        raise ValueError(f"loss-driven allocation rule must be one of {LOSS_RULES}; got {rule!r}")
    start = time.perf_counter()
    groups = {
        r: build_problem(plan, bounds, 1 if r == "depth" else config.group_layers) for r in CANDIDATE_RULES
    }
    train, heldout = calibration_split(ids, config)
    bank = factor_bank(model, groups["measured"], per_layer)  # same targets and bounds in every grouping
    device = next(model.parameters()).device
    train, heldout = train.to(device), heldout.to(device)
    refs = {
        "train": (train, reference_logits(model, train, config.batch_size)),
        "heldout": (heldout, reference_logits(model, heldout, config.batch_size)),
    }
    summary: dict[str, Any] = {}
    runs = {}
    for name in CANDIDATE_RULES if rule == "auto" else (rule,):
        problem = groups[name]
        t0 = time.perf_counter()
        with masked(model, problem.targets, bank) as installed:
            ranks, details = _run(name, model, installed, problem, refs, config)
            uniform_check(problem, ranks)
            set_ranks(installed, problem, ranks)
            kl = mean_kl(model, *refs["heldout"], config.batch_size)
        runs[name] = (kl, problem, ranks, details)
        summary[name] = {"heldout_kl": kl, "seconds": round(time.perf_counter() - t0, 2)}
    chosen = min(runs, key=lambda name: runs[name][0])  # the lowest held-out KL (one rule: that one)
    _, problem, ranks, details = runs[chosen]
    by_target = problem.to_targets(ranks)
    for t in problem.targets:
        t.rank = by_target[t.name]
    extra = {"chosen": chosen, "candidates": summary} if rule == "auto" else {}
    return {
        "rule": rule,
        **extra,
        "settings": config.to_dict(),
        "seconds": round(time.perf_counter() - start, 2),
        "budget": problem.budget,
        "spent": sum(k * c for k, c in zip(ranks, problem.unit_costs, strict=True)),
        "groups": len(problem.groups),
        "ranks": by_target,
        **details,
    }


def _run(rule, model, installed, problem: Problem, refs, config: LossAllocationConfig):
    batch = config.batch_size
    if rule == "measured":
        return measured_allocation(
            model, installed, problem, refs["train"], refs["heldout"], ratios=config.probe_ratios,
            options=config.knapsack_options, units=config.knapsack_units, batch_size=batch,
        )  # fmt: skip
    if rule == "learned":
        return learned_allocation(
            model, installed, problem, refs["train"], refs["heldout"], steps=config.mask_steps,
            lr=config.mask_lr, temperature=config.mask_temperature, eval_every=config.eval_every,
            seed=config.seed, batch_size=batch,
        )  # fmt: skip
    return depth_allocation(
        model, installed, problem, refs["heldout"], slopes=config.depth_slopes, batch_size=batch
    )
