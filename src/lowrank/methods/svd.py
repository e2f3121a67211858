"""Plain truncated SVD of each weight matrix: the data-free baseline (``method='svd'``).

W ≈ B A with B = U_r √Σ_r and A = √Σ_r Vh_r; optimal for ‖W − W'‖_F (Eckart–Young) but blind to which
input directions the model actually uses, which is why it fails on LLMs (see the anchors table).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from lowrank.calibration.pipeline import RunContext
from lowrank.methods.base import CompressionResult, register_method
from lowrank.methods.common import (
    LowRankConfig,
    Target,
    by_layer,
    decomposer_for,
    lowrank_result,
    plan_targets,
)
from lowrank.nn import LowRankLinear
from lowrank.nn.surgery import replace_module

__all__ = ["SVDConfig", "truncated_svd_factors"]


@dataclass(kw_only=True)
class SVDConfig(LowRankConfig):
    """Truncated SVD of the weights, no calibration. See :class:`LowRankConfig` for the fields."""

    method: ClassVar[str] = "svd"


def truncated_svd_factors(W: torch.Tensor, rank: int, decompose, dtype: torch.dtype):
    """Factors A (r × n), B (m × r) of the best rank-r approximation of W (m × n), and ‖W − BA‖²_F."""
    U, S, Vh = decompose(W.detach().to(dtype), rank)
    root = S.sqrt()
    loss = float(W.detach().to(torch.float64).square().sum() - S.to(torch.float64).square().sum())
    return root[:, None] * Vh, U * root, max(loss, 0.0)


@register_method(SVDConfig)
def compress_svd(model: nn.Module, config: SVDConfig, ctx: RunContext) -> CompressionResult:
    """Handler of ``method='svd'``: each targeted linear → its truncated SVD (a data-free layer pass)."""
    plan = plan_targets(model, config)
    layered = by_layer(plan)
    decompose = decomposer_for(config)

    def process(index: int, layer: nn.Module, stats: dict) -> dict[str, Any]:
        return {"entries": _factor_layer(layer, layered.get(index, []), decompose, config.dtype, ctx)}

    records = ctx.layer_pass(None, process, desc="svd")
    return lowrank_result(model, config, plan, records)


def _factor_layer(
    layer: nn.Module, targets: list[Target], decompose, dtype, ctx: RunContext
) -> dict[str, Any]:
    entries: dict[str, Any] = {}
    for t in targets:
        if t.rank is None:
            entries[t.rel] = {"rank": None}
            continue
        linear = layer.get_submodule(t.rel)
        with ctx.timings.measure("decomposition"):
            A, B, loss = truncated_svd_factors(linear.weight, t.rank, decompose, dtype)
            built = LowRankLinear.from_linear(linear, A, B)
            replace_module(layer, t.rel, built)
        entries[t.rel] = {"rank": built.rank, "planned_rank": t.rank, "loss": loss}
    return entries
