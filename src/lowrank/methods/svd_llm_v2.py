"""SVD-LLM V2: two-round SVD truncation + heterogeneous rank allocation (``method='svd-llm-v2'``).

1. Spectra pass (original model, non-sequential): for every targeted matrix, the squared whitened
   singular values σ² of W S and ‖W S‖²_F, i.e. its theoretical truncation loss at every rank.
2. Allocation: within each group of same-type matrices (all q_proj, all down_proj, …) the ranks are
   redistributed by ``lowrank.linalg.allocation.allocate_ranks`` so the group keeps exactly the
   homogeneous parameter budget while the (normalised) loss drops. Ranks stay within
   [min_rank_factor, max_rank_factor] × the homogeneous rank and below the break-even rank. With
   ``allocation='uniform'`` steps 1–2 are skipped. The default, ``auto``, allocates from the end loss
   instead (``lowrank.methods.allocation``).
3. Compression pass: two-round SVD (eigh of G = U_s Λ U_sᵀ, SVD of W U_s √Λ, map back through
   (√Λ)⁺ U_sᵀ), sequential by default (each layer calibrated on the compressed predecessors).

The spectra come from the unchanged model because every rank must be known before layer 0 is
compressed; ``sequential=False`` makes both passes share one set of Gram matrices.

References:
    Wang et al., "SVD-LLM V2: Optimizing singular value truncation for large language model
    compression", NAACL 2025, §3.1–3.2.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from lowrank.calibration.pipeline import CalibrationStatistics, RunContext, collect_calibration_statistics
from lowrank.calibration.statistics import Statistic, Timings
from lowrank.core.config import Migration, unversioned
from lowrank.linalg.allocation import ALLOCATION_RULES, allocate_ranks, break_even_rank
from lowrank.linalg.whitening import whiten, whitened_spectrum
from lowrank.methods.allocation import LOSS_RULES, LossAllocationConfig, allocate_by_loss
from lowrank.methods.base import CompressionResult, register_method
from lowrank.methods.common import (
    TRUNCATION_ROUTES,
    Target,
    WhitenedConfig,
    by_layer,
    decomposer_for,
    plan_targets,
)
from lowrank.methods.svd_llm import gram_requests, truncation_pass

__all__ = ["SVDLLMV2Config", "allocate_plan", "rank_bounds", "ALLOCATIONS"]

logger = logging.getLogger(__name__)

ALLOCATIONS = ALLOCATION_RULES + LOSS_RULES


def _allocation_was_uniform(data: dict[str, Any]) -> dict[str, Any]:
    """Version 1 → 2: the default allocation became ``auto``; a version-1 config that left it out meant
    ``uniform``."""
    return {**data, "allocation": data.get("allocation", "uniform")}


@dataclass(kw_only=True)
class SVDLLMV2Config(WhitenedConfig):
    """SVD-LLM V2: :class:`WhitenedConfig` plus the allocation fields; truncation defaults to ``eigh``."""

    method: ClassVar[str] = "svd-llm-v2"
    version: ClassVar[int] = 2
    migrations: ClassVar[dict[int, Migration]] = {0: unversioned, 1: _allocation_was_uniform}
    detail_labels: ClassVar[dict[str, str]] = {"allocation_rule": "rank allocation (rule that set the ranks)"}
    truncation: str = field(default="eigh", metadata={"choices": TRUNCATION_ROUTES})
    """Route to the loss minimiser; ``eigh`` is the paper's two-round SVD."""
    allocation: str = field(default="auto", metadata={"choices": ALLOCATIONS})
    """Rank allocation rule: within each group of same-type matrices from the spectra (see
    ``lowrank.linalg.allocation``), or across all of them from the end loss (``measured``, ``learned``,
    ``depth``, and ``auto``, which runs those three and keeps the ranks with the lowest held-out KL: see
    ``lowrank.methods.allocation``; they need calibration token ids).
    Default ``auto``: on the built-in model it beats ``uniform`` at 10, 20, 40 and 60 % removed on wiki
    (−20 %, −34 %, −49 %, −44 % perplexity) and on out-of-domain shakespeare (−27 %, −41 %, −49 %, −36 %),
    choosing on calibration text only (docs/compression.md, "Allocation from the end loss"). Given
    precomputed statistics instead of token ids it falls back to ``uniform``, logged and recorded in the
    result's ``allocation`` details; ``uniform`` is SVD-LLM's homogeneous ranks."""
    min_rank_factor: float = field(default=0.25, metadata={"range": "[0, 1]"})
    """Lower bound of an allocated rank, as a multiple of the homogeneous rank."""
    max_rank_factor: float = field(default=2.0, metadata={"range": "[1, inf)"})
    """Upper bound of an allocated rank, as a multiple of the homogeneous rank (also < break-even)."""
    loss_allocation: LossAllocationConfig = field(
        default_factory=LossAllocationConfig, metadata={"prefix": "alloc-"}
    )
    """Settings of the loss-driven rules (see :class:`lowrank.methods.allocation.LossAllocationConfig`)."""


def rank_bounds(t: Target, config: SVDLLMV2Config) -> tuple[int, int]:
    full = min(t.out_features, t.in_features)
    top = full if config.factorize_all else break_even_rank(t.out_features, t.in_features) - 1
    hi = max(t.rank, min(top, math.ceil(config.max_rank_factor * t.rank), full))
    lo = min(t.rank, max(1, math.floor(config.min_rank_factor * t.rank)))
    return lo, hi


def _spectra_process(layered, config: SVDLLMV2Config, decompose, timings: Timings):
    exact = config.decomposer.to_dict().get("name") == "svd"

    def process(index: int, layer: nn.Module, stats: dict[str, Statistic]) -> dict[str, Any]:
        entries = {}
        cache: dict[int, Any] = {}
        for t in layered.get(index, []):
            if t.rank is None:
                continue
            linear = layer.get_submodule(t.rel)
            stat = stats[t.rel]
            if id(stat) not in cache:
                with timings.measure("whitening"):
                    cache[id(stat)] = whiten(stat.gram.to(linear.weight.device), "sqrt")
            k = None if exact else rank_bounds(t, config)[1]
            with timings.measure("decomposition"):
                sigma2, total = whitened_spectrum(
                    linear.weight, cache[id(stat)], k, decompose=decompose, dtype=config.dtype
                )
            entries[t.rel] = {"sigma2": sigma2.cpu().tolist(), "total": total}
        return {"spectra": entries}

    return process


def allocate_plan(
    plan: list[Target], spectra: dict[str, dict[str, Any]], config: SVDLLMV2Config
) -> dict[str, Any]:
    """Set ``t.rank`` of every factorized target from the group allocation; return a per-group summary."""
    groups: dict[str, list[Target]] = {}
    for t in plan:
        if t.rank is not None:
            groups.setdefault(t.kind, []).append(t)
    summary = {}
    for group, members in groups.items():
        bounds = [rank_bounds(t, config) for t in members]
        sig = [torch.tensor(spectra[t.name]["sigma2"], dtype=torch.float64) for t in members]
        totals = [spectra[t.name]["total"] for t in members]
        homogeneous = [t.rank for t in members]
        ranks = allocate_ranks(
            sig,
            totals,
            homogeneous,
            rule=config.allocation,
            min_rank=[b[0] for b in bounds],
            max_rank=[b[1] for b in bounds],
        )

        def loss(ks, sig=sig, totals=totals):
            return sum(
                (tot - float(s[:k].sum())) / max(tot, 1e-300)
                for s, tot, k in zip(sig, totals, ks, strict=True)
            )

        summary[group] = {
            "homogeneous_rank": homogeneous[0] if len(set(homogeneous)) == 1 else homogeneous,
            "min_rank": min(ranks),
            "max_rank": max(ranks),
            "relative_loss_homogeneous": loss(homogeneous),
            "relative_loss_allocated": loss(ranks),
        }
        for t, k in zip(members, ranks, strict=True):
            t.rank = k
    return summary


def _allocate(model, config: SVDLLMV2Config, plan: list[Target], ctx: RunContext) -> dict[str, Any]:
    """Spectra pass + group allocation (sets the targets' ranks); ``uniform`` keeps the homogeneous ranks."""
    if config.allocation == "uniform":
        return {}  # no reallocation: the spectra are not needed
    layered = by_layer(plan)
    records = ctx.layer_pass(
        gram_requests(plan, config.calibration.dtype),
        _spectra_process(layered, config, decomposer_for(config), ctx.timings),
        calibration=config.calibration,
        key={"spectra": config.to_dict()},
        sequential=False,
        modifies=False,
        checkpoint="spectra",
        desc="spectra",
    )
    spectra = {
        f"{t.name}": r["spectra"][t.rel]
        for r in records
        for t in layered.get(r["layer"], [])
        if t.rel in r["spectra"]
    }
    with ctx.timings.measure("other"):
        return allocate_plan(plan, spectra, config)


def _allocate_by_loss(model, config: SVDLLMV2Config, plan: list[Target], ctx: RunContext, ids) -> dict:
    """Loss-driven allocation on the unchanged model (sets the targets' ranks)."""
    if ids is None:
        raise ValueError(
            f"allocation={config.allocation!r} measures the model's output: it needs calibration token ids "
            f"(samples, seq_len), not {type(ctx.calibration).__name__}"
        )
    stats = ctx.calibration
    if not isinstance(stats, CalibrationStatistics):  # sequential: the original model's Grams
        requests = gram_requests(plan, config.calibration.dtype)
        stats = collect_calibration_statistics(
            model, ids, requests, config.calibration, device=ctx.device, timings=ctx.timings
        )
    with ctx.timings.measure("allocation"):
        return allocate_by_loss(
            model,
            config.allocation,
            config.loss_allocation,
            plan,
            lambda t: rank_bounds(t, config),
            stats.per_layer,
            ids,
        )


def _auto_without_text(config: SVDLLMV2Config, ids: torch.Tensor | None) -> str | None:
    """Why the default ``auto`` allocation cannot run on this calibration (None: it can)."""
    if config.allocation != "auto":
        return None
    if ids is None:
        return "this run has no calibration token ids (precomputed statistics)"
    need = config.loss_allocation.train_samples + config.loss_allocation.heldout_samples
    if ids.ndim != 2 or ids.shape[0] < need:
        return f"needs {need} calibration sequences (train_samples + heldout_samples); got {tuple(ids.shape)}"
    return None


@register_method(SVDLLMV2Config)
def compress_svd_llm_v2(model: nn.Module, config: SVDLLMV2Config, ctx: RunContext) -> CompressionResult:
    """Handler of ``method='svd-llm-v2'``: spectra pass → allocation → compression pass."""
    plan = plan_targets(model, config)
    ids = ctx.calibration if isinstance(ctx.calibration, torch.Tensor) else None
    if not config.calibration.sequential:
        # one calibration pass serves both the spectra and the compression
        ctx.precompute(gram_requests(plan, config.calibration.dtype), config.calibration)
    missing = _auto_without_text(config, ids)
    if missing:
        logger.warning(
            "allocation='auto' measures the model's output on calibration text and %s: falling back to "
            "uniform ranks (give token ids of enough sequences, or allocation='uniform' to say so)",
            missing,
        )
        allocation = {"rule": "uniform", "requested": "auto", "fallback": missing}
    elif config.allocation in LOSS_RULES:
        allocation = _allocate_by_loss(model, config, plan, ctx, ids)
    else:
        allocation = _allocate(model, config, plan, ctx)
    result = truncation_pass(
        model,
        config,
        plan,
        ctx,
        checkpoint="compress",
        key={"compress": config.to_dict(), "ranks": {t.name: t.rank for t in plan}},
        allocation=allocation,
    )
    result.details["allocation_rule"] = allocation_rule(config, allocation)
    return result


def allocation_rule(config: SVDLLMV2Config, allocation: dict[str, Any]) -> str:
    """One line for the summary: the rule that set the ranks (``auto``'s choice, or its fallback)."""
    if "fallback" in allocation:
        return f"uniform (auto fell back: {allocation['fallback']})"
    if "chosen" in allocation:
        return f"auto → {allocation['chosen']} (lowest held-out KL)"
    return config.allocation
