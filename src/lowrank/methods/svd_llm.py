"""SVD-LLM: truncation-aware data whitening (``method='svd-llm'``).

For each targeted linear W (m × n) with input Gram G = XᵀX accumulated over all calibration tokens:
S = chol(G) in float64, decompose W S (exact or randomized), keep r triplets, map back with S⁻¹ and
split √Σ into both factors. When G is not positive definite the whitening falls back to an
eigendecomposition with a pseudo-inverse (no jitter); each fallback is logged and counted.

References:
    Wang et al., "SVD-LLM: Truncation-aware singular value decomposition for large language model
    compression", ICLR 2025, Alg. 1 (whitening) and §3.3 (layer-by-layer, sequential calibration).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from lowrank.calibration.pipeline import CalibrationStatistics, RunContext, collect_calibration_statistics
from lowrank.calibration.statistics import Statistic
from lowrank.methods.base import CompressionResult, register_method
from lowrank.methods.common import (
    Target,
    WhitenedConfig,
    by_layer,
    decomposer_for,
    input_gram_requests,
    lowrank_result,
    plan_targets,
    truncate_layer,
)

__all__ = ["SVDLLMConfig", "collect_gram_statistics", "truncation_pass", "gram_requests"]

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class SVDLLMConfig(WhitenedConfig):
    """SVD-LLM (Cholesky whitening). See :class:`WhitenedConfig` for the fields."""

    method: ClassVar[str] = "svd-llm"


def gram_requests(plan: list[Target], dtype: torch.dtype):
    """``requests(index, layer)`` asking for the input Grams of the planned targets of each layer."""
    layered = by_layer(plan)
    return lambda index, layer: input_gram_requests(layered.get(index, []), dtype)


def collect_gram_statistics(
    model: nn.Module, input_ids: torch.Tensor, config: WhitenedConfig | None = None, *, device: Any = None
) -> CalibrationStatistics:
    """Input Grams of every linear ``config`` targets, on the UNCHANGED model (non-sequential reuse).

    ``config`` defaults to every decoder linear layer with the default calibration settings.

    Pass the result as ``calibration=`` to :func:`lowrank.compress` with configs whose calibration is
    non-sequential to compress at many ratios from one calibration pass. Memory: one n × n Gram per
    distinct input (q/k/v and gate/up share theirs) per layer on ``calibration.offload_device``.
    """
    config = config or SVDLLMConfig(ratio=0.0)
    plan = plan_targets(model, config)
    requests = gram_requests(plan, config.calibration.dtype)
    return collect_calibration_statistics(model, input_ids, requests, config.calibration, device=device)


def truncation_pass(
    model: nn.Module,
    config: WhitenedConfig,
    plan: list[Target],
    ctx: RunContext,
    *,
    checkpoint: str | None = None,
    key: Any = None,
    **details: Any,
) -> CompressionResult:
    """Truncate every planned target at its rank, layer by layer, and summarise (both SVD-LLM methods)."""
    layered = by_layer(plan)
    decompose = decomposer_for(config)
    if isinstance(ctx.calibration, CalibrationStatistics):
        per_layer = ctx.calibration.per_layer
        missing = [t.name for t in plan if t.rank is not None and t.rel not in per_layer[t.layer]]
        if missing:
            raise ValueError(
                f"precomputed statistics lack the input Grams of {missing[:3]} (and {len(missing)} in all)"
            )

    def process(index: int, layer: nn.Module, stats: dict[str, Statistic]) -> dict[str, Any]:
        return truncate_layer(layer, layered.get(index, []), stats, config, decompose, ctx.timings)

    records = ctx.layer_pass(
        gram_requests(plan, config.calibration.dtype),
        process,
        calibration=config.calibration,
        key=key if key is not None else config.to_dict(),
        checkpoint=checkpoint,
        min_tokens_for=max(t.in_features for t in plan),
    )
    result = lowrank_result(model, config, plan, records, **details)
    if result.fallbacks:
        logger.warning(
            "%d Gram matrix/matrices were not positive definite; used eigendecomposition + pseudo-inverse "
            "(directions without activation energy dropped): %s",
            result.fallbacks,
            ", ".join(result.fallback_modules[:5]) + (" …" if result.fallbacks > 5 else ""),
        )
    return result


@register_method(SVDLLMConfig)
def compress_svd_llm(model: nn.Module, config: SVDLLMConfig, ctx: RunContext) -> CompressionResult:
    """Handler of ``method='svd-llm'``."""
    return truncation_pass(model, config, plan_targets(model, config), ctx)
