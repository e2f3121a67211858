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
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from lowrank.architectures import get_arch_spec
from lowrank.calibration import InputGram, Statistic, StatRequest, Timings, check_calibration_size
from lowrank.layerwise import Process, collect_statistics, process_statistics, run_layerwise
from lowrank.methods.base import CompressionResult, count_parameters, register_method
from lowrank.methods.common import (
    CalibratedConfig,
    Target,
    build_result,
    by_layer,
    decomposer_for,
    plan_targets,
    truncate_layer,
)
from lowrank.surgery import match_modules

__all__ = ["SVDLLMConfig", "CalibrationStatistics", "collect_gram_statistics", "run_calibrated"]

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class SVDLLMConfig(CalibratedConfig):
    """SVD-LLM (Cholesky whitening). See :class:`CalibratedConfig` for the fields."""

    method: ClassVar[str] = "svd-llm"


@dataclass
class CalibrationStatistics:
    """Input Gram matrices of every decoder layer of the UNCHANGED model (non-sequential calibration).

    ``per_layer[i][name]`` is the :class:`InputGram` of linear ``name`` (relative to layer i). Pass it as
    ``calibration=`` to :func:`lowrank.compress` with ``sequential=False`` configs to compress at many
    ratios from one calibration pass.
    """

    per_layer: list[dict[str, Statistic]]
    tokens: int
    gram_dtype: str


def collect_gram_statistics(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    targets: tuple[str, ...] | None = None,
    ignore: tuple[str, ...] = (),
    device: torch.device | str | None = None,
    batch_size: int = 8,
    gram_dtype: str = "float64",
    offload_device: str = "cpu",
    timings: Timings | None = None,
) -> CalibrationStatistics:
    """Accumulate XᵀX of every targeted linear's input over ``input_ids`` (samples, seq_len), model unchanged.

    Memory: one n × n Gram per distinct input (q/k/v and gate/up share theirs) per layer on
    ``offload_device`` (≈ 0.8 GB in float64 for SmolLM2-135M).
    """
    spec = get_arch_spec(model)
    names = match_modules(model, targets or tuple(spec.linears.values()), ignore)
    prefix = spec.layers + "."
    rel_by_layer: dict[int, list[str]] = {}
    for name in names:
        index, _, rel = name[len(prefix) :].partition(".")
        rel_by_layer.setdefault(int(index), []).append(rel)
    dtype = {"float64": torch.float64, "float32": torch.float32}[gram_dtype]

    def requests(index: int, layer: nn.Module) -> dict[str, StatRequest]:
        return {rel: StatRequest(rel, lambda: InputGram(dtype)) for rel in rel_by_layer.get(index, [])}

    per_layer = collect_statistics(
        model,
        input_ids,
        requests,
        device=device,
        offload_device=offload_device,
        batch_size=batch_size,
        timings=timings,
    )
    tokens = int(input_ids.numel())
    return CalibrationStatistics(per_layer=per_layer, tokens=tokens, gram_dtype=gram_dtype)


def run_calibrated(
    model: nn.Module,
    config: CalibratedConfig,
    calibration: Any,
    plan: list[Target],
    process: Process,
    *,
    device: torch.device | str | None,
    checkpoint_dir: str | Path | None,
    timings: Timings,
    sequential: bool | None = None,
    modifies: bool = True,
    run_key: Any = None,
    desc: str = "compress",
) -> tuple[list[dict[str, Any]], int]:
    """Run ``process`` over the planned layers with fresh or precomputed Gram statistics.

    Returns:
        (records, calibration tokens).
    """
    sequential = config.sequential if sequential is None else sequential
    layered = by_layer(plan)
    if isinstance(calibration, CalibrationStatistics):
        if sequential:
            raise ValueError(
                "precomputed CalibrationStatistics come from the unchanged model; "
                "use sequential=False with them"
            )
        missing = [t.name for t in plan if t.rank is not None and t.rel not in calibration.per_layer[t.layer]]
        if missing:
            raise ValueError(f"precomputed statistics lack the Gram matrices of {missing[:3]} (…)")
        records = process_statistics(model, calibration.per_layer, process, device=device, desc=desc)
        return records, calibration.tokens
    if not isinstance(calibration, torch.Tensor) or calibration.ndim != 2:
        raise ValueError(
            f"method {config.method!r} needs calibration token ids (samples, seq_len) or "
            "CalibrationStatistics; "
            f"got {type(calibration).__name__}; build them with lowrank.calibration_batches(...)"
        )
    check_calibration_size(int(calibration.numel()), max(t.in_features for t in plan))
    records = run_layerwise(
        model,
        calibration,
        lambda i, layer: config.gram_requests(layered.get(i, [])),
        process,
        sequential=sequential,
        device=device,
        offload_device=config.offload_device,
        batch_size=config.batch_size,
        checkpoint_dir=checkpoint_dir,
        run_key=run_key if run_key is not None else config.to_dict(),
        timings=timings,
        modifies=modifies,
        desc=desc,
    )
    return records, int(calibration.numel())


def log_fallbacks(result: CompressionResult) -> None:
    if result.fallbacks:
        logger.warning(
            "%d Gram matrix/matrices were not positive definite; used eigendecomposition + pseudo-inverse "
            "(directions without activation energy dropped): %s",
            result.fallbacks,
            ", ".join(result.fallback_modules[:5]) + (" …" if result.fallbacks > 5 else ""),
        )


def truncation_pass(
    model: nn.Module,
    config: CalibratedConfig,
    calibration: Any,
    plan: list[Target],
    *,
    parameters_before: int,
    device: torch.device | str | None,
    checkpoint_dir: str | Path | None,
    timings: Timings,
    run_key: Any = None,
    extra: dict[str, Any] | None = None,
) -> CompressionResult:
    """Truncate every planned target at its rank, layer by layer, and summarise (both SVD-LLM methods)."""
    layered = by_layer(plan)
    decompose = decomposer_for(config)

    def process(index: int, layer: nn.Module, stats: dict[str, Statistic]) -> dict[str, Any]:
        return truncate_layer(layer, layered.get(index, []), stats, config, decompose, timings)

    records, tokens = run_calibrated(
        model,
        config,
        calibration,
        plan,
        process,
        device=device,
        checkpoint_dir=checkpoint_dir,
        timings=timings,
        run_key=run_key,
    )
    result = build_result(
        model,
        config,
        plan,
        records,
        parameters_before=parameters_before,
        timings=timings,
        calibration_tokens=tokens,
        extra=extra,
    )
    log_fallbacks(result)
    return result


@register_method(SVDLLMConfig)
def compress_svd_llm(
    model: nn.Module, config: SVDLLMConfig, *, calibration=None, device=None, checkpoint_dir=None
) -> CompressionResult:
    """Handler of ``method='svd-llm'``."""
    before = count_parameters(model)
    plan = plan_targets(model, config)
    return truncation_pass(
        model,
        config,
        calibration,
        plan,
        parameters_before=before,
        device=device,
        checkpoint_dir=checkpoint_dir,
        timings=Timings(),
    )
