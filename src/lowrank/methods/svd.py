"""Plain truncated SVD of each weight matrix: the data-free baseline (``method='svd'``).

W ≈ B A with B = U_r √Σ_r and A = √Σ_r Vh_r; optimal for ‖W − W'‖_F (Eckart–Young) but blind to which
input directions the model actually uses, which is why it fails on LLMs (see the anchors table).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from lowrank.architectures import decoder_layers
from lowrank.calibration import Timings
from lowrank.methods.base import CompressionResult, count_parameters, register_method
from lowrank.methods.common import LowRankConfig, Target, build_result, by_layer, decomposer_for, plan_targets
from lowrank.nn import LowRankLinear
from lowrank.surgery import replace_module

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


def _compress_layer(
    layer: nn.Module, targets: list[Target], decompose, dtype, timings: Timings
) -> dict[str, Any]:
    entries = {}
    for t in targets:
        if t.rank is None:
            entries[t.rel] = {"rank": None}
            continue
        linear = layer.get_submodule(t.rel)
        with timings.measure("decomposition"):
            A, B, loss = truncated_svd_factors(linear.weight, t.rank, decompose, dtype)
            replace_module(layer, t.rel, LowRankLinear.from_linear(linear, A, B))
        entries[t.rel] = {"rank": t.rank, "loss": loss}
    return {"entries": entries}


@register_method(SVDConfig)
def compress_svd(
    model: nn.Module, config: SVDConfig, *, calibration=None, device=None, checkpoint_dir=None
) -> CompressionResult:
    """Handler of ``method='svd'``: each targeted linear → its truncated SVD (``calibration`` unused)."""
    timings = Timings()
    before = count_parameters(model)
    plan = plan_targets(model, config)
    decompose = decomposer_for(config)
    layers = decoder_layers(model)
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    timings.sync = device.type == "cuda"
    records = []
    for index, targets in tqdm(by_layer(plan).items(), desc="svd", unit="layer", leave=False):
        layer = layers[index].to(device)
        try:
            records.append(
                {"layer": index, **_compress_layer(layer, targets, decompose, config.dtype, timings)}
            )
        finally:
            layers[index].to(home)
    return build_result(model, config, plan, records, parameters_before=before, timings=timings)
