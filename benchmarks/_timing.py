"""Timing and matrix families for the SVD benchmarks."""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["sync", "timed", "make_matrix", "rel_error", "FAMILIES", "weight_matrices"]

logger = logging.getLogger(__name__)

FAMILIES = ("gaussian", "decaying", "weights")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str, repeats: int, warmup: int = 1) -> tuple[float, Any]:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs, synchronising the device.

    Calls slower than 2 s are repeated at most twice (and not warmed up a second time).
    """
    out, first = None, None
    for _ in range(warmup):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        first = time.perf_counter() - t0
    if first is not None and first > 2.0:
        repeats = min(repeats, 2)
    times = []
    for _ in range(max(1, repeats)):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _orthogonal(n: int, k: int, g: torch.Generator, device: str) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=g, device=device)).Q


def make_matrix(family: str, m: int, n: int, device: str, seed: int = 0) -> torch.Tensor:
    """``gaussian``: i.i.d. N(0, 1) (the seed's Table 1 setting); ``decaying``: ``U diag(σ) Vᵀ`` with Haar
    ``U, V`` and ``σᵢ = exp(−6 i / min(m, n))`` (σ at 1/8 of full rank ≈ 0.47, smallest ≈ e⁻⁶)."""
    g = torch.Generator(device=device).manual_seed(seed)
    if family == "gaussian":
        return torch.randn(m, n, generator=g, device=device)
    if family == "decaying":
        k = min(m, n)
        s = torch.exp(-6.0 * torch.arange(k, device=device, dtype=torch.float32) / k)
        return (_orthogonal(m, k, g, device) * s) @ _orthogonal(n, k, g, device).mT
    raise ValueError(f"unknown synthetic family {family!r}; valid: gaussian, decaying")


def rel_error(A: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> float:
    """``‖A − U diag(S) Vh‖_F / ‖A‖_F`` in float64."""
    A64 = A.to(torch.float64)
    R = A64 - (U.to(torch.float64) * S.to(torch.float64).unsqueeze(-2)) @ Vh.to(torch.float64)
    return float(torch.linalg.matrix_norm(R) / torch.linalg.matrix_norm(A64))


def weight_matrices(
    model_name: str, device: str, layers: tuple[int, ...] = (0, 15)
) -> list[tuple[str, torch.Tensor]]:
    """Projection weights ``(name, W)`` of a built-in model, or ``[]`` (logged) when it cannot be loaded.

    ``model_name`` may also be a ``.pt`` file holding a ``{name: W}`` dict saved from this function's output
    (to benchmark the same matrices on a machine without the model).
    """
    if model_name.endswith(".pt"):
        saved = torch.load(model_name, map_location=device, weights_only=True)
        return [(name, W.to(torch.float32)) for name, W in saved.items()]
    try:
        from lowrank.loading.models import load_model

        model, _ = load_model(model_name, device="cpu")
    except Exception as exc:  # the model or its loader may be unavailable on this machine
        logger.info(
            "skipping the 'weights' family: could not load %s (%s: %s)", model_name, type(exc).__name__, exc
        )
        return []
    out = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            layer = int(name.split(".layers.")[1].split(".")[0])
            if layer in layers and name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "gate_proj", "down_proj"):
                out.append((name, module.weight.detach().to(device=device, dtype=torch.float32).clone()))
    del model
    return out
