"""Decomposers: one callable ``dec(A, rank) -> (U, S, Vh)`` chosen by name, configured by a dataclass.

>>> dec = get_decomposer("rsvd", oversample=20, power_iters=4)
>>> U, S, Vh = dec(A, 64)

Every pipeline and the CLI pick their SVD through :func:`get_decomposer`, so switching between exact and
randomized decomposition is one flag. Each decomposer is deterministic for its config: the sketch is drawn
from a fresh ``torch.Generator`` on ``A``'s device seeded with ``config.seed`` at every call.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from lowrank.core.config import Config
from lowrank.linalg._checks import check_matrix, check_rank
from lowrank.linalg.adaptive import rank_by_tolerance
from lowrank.linalg.exact import EXACT_METHODS, truncated_svd
from lowrank.linalg.krylov import block_krylov_svd
from lowrank.linalg.rsvd import ORTH_METHODS, randomized_svd

__all__ = ["DecomposerConfig", "Decomposer", "get_decomposer", "available_decomposers", "register_decomposer"]

logger = logging.getLogger(__name__)

SVDResult = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
_REGISTRY: dict[str, Callable[[DecomposerConfig, torch.Tensor, int], SVDResult]] = {}


def register_decomposer(name: str):
    """Decorator registering ``fn(config, A, rank) -> (U, S, Vh)`` under ``name``."""

    def wrap(fn):
        _REGISTRY[name] = fn
        return fn

    return wrap


def available_decomposers() -> tuple[str, ...]:
    """Names accepted by :func:`get_decomposer` and ``DecomposerConfig.name``."""
    return tuple(_REGISTRY)


@dataclass(kw_only=True)
class DecomposerConfig(Config):
    """How to compute a truncated SVD."""

    label: ClassVar[str] = "decomposer"

    name: str = field(default="rsvd", metadata={"choices": available_decomposers})
    """``svd`` (exact), ``rsvd`` (randomized, HMT), ``krylov`` (randomized block Krylov), ``auto`` (exact
    above ``auto_rank_fraction`` of full rank, randomized below) or ``adaptive`` (randomized, rank chosen by
    ``tol``; see ``available_decomposers()``)."""
    oversample: int = field(default=10, metadata={"range": "[0, inf)"})
    """Extra sketch columns p (randomized decomposers); clamped so that rank + p <= min(m, n)."""
    power_iters: int = field(default=2, metadata={"range": "[0, inf)"})
    """Normalised power iterations q (``rsvd``, ``auto``, ``adaptive``)."""
    krylov_depth: int = field(default=7, metadata={"range": "[0, inf)"})
    """``krylov`` only: number of Krylov steps (the space has ``(depth + 1)·block_size`` columns)."""
    seed: int = field(default=0, metadata={"range": "[0, inf)"})
    """Seed of the per-call ``torch.Generator`` on the input's device."""
    auto_rank_fraction: float | None = field(default=None, metadata={"range": "[0, 1]"})
    """``auto`` uses the exact route when rank / min(m, n) is above this fraction; None uses the crossover
    measured for the input's device type (``AUTO_RANK_FRACTION``: 0.75 on CUDA, 0.5 on CPU)."""
    exact_method: str = field(default="auto", metadata={"choices": EXACT_METHODS})
    """Exact route: ``auto`` (float64 Gram + eigh when accurate, else LAPACK/cuSOLVER SVD), ``gram``,
    ``svd``."""
    orth: str = field(default="auto", metadata={"choices": ORTH_METHODS})
    """Randomized decomposers: orthonormalisation, ``auto`` (float64 Cholesky-QR on accelerators, Householder
    QR on CPU: the faster one measured on each), ``cholesky`` or ``householder``."""
    tol: float = field(default=1e-2, metadata={"range": "(0, 1)"})
    """``adaptive`` only: relative Frobenius error ‖A − A_r‖/‖A‖ to reach; ``rank`` is then a maximum."""
    block_size: int = field(default=0, metadata={"range": "[0, inf)"})
    """``krylov``/``adaptive``: columns per block; 0 picks the default (``krylov``: (rank + oversample)/3,
    ``adaptive``: max(8, rank/16))."""


class Decomposer:
    """A configured truncated-SVD routine: ``dec(A, rank) -> (U, S, Vh)``.

    ``A`` is ``(..., m, n)``; returns ``U (..., m, r)``, ``S (..., r)`` descending, ``Vh (..., r, n)`` in
    ``A``'s dtype, with ``r = rank`` (``adaptive``: the smallest rank <= ``rank`` meeting ``config.tol``).
    """

    def __init__(self, config: DecomposerConfig) -> None:
        self.config = config
        self._fn = _REGISTRY[config.name]

    @property
    def name(self) -> str:
        return self.config.name

    def __call__(self, A: torch.Tensor, rank: int) -> SVDResult:
        return self._fn(self.config, A, rank)

    def __repr__(self) -> str:
        return f"Decomposer({self.config!r})"


def get_decomposer(config: DecomposerConfig | dict[str, Any] | str = "rsvd", **overrides: Any) -> Decomposer:
    """Build a decomposer from a config, a dict or a name, with optional field overrides.

    Example: ``get_decomposer("rsvd", oversample=20, power_iters=4)``.
    """
    if isinstance(config, str):
        config = DecomposerConfig(name=config, **overrides)
    elif isinstance(config, dict):
        config = DecomposerConfig.from_dict({**config, **overrides})
    elif isinstance(config, DecomposerConfig):
        config = dataclasses.replace(config, **overrides) if overrides else config
    else:
        raise ValueError(f"decomposer must be a DecomposerConfig, dict or name; got {config!r}")
    return Decomposer(config)


@register_decomposer("svd")
def _svd(config: DecomposerConfig, A: torch.Tensor, rank: int) -> SVDResult:
    return truncated_svd(A, rank, method=config.exact_method)


@register_decomposer("rsvd")
def _rsvd(config: DecomposerConfig, A: torch.Tensor, rank: int) -> SVDResult:
    return randomized_svd(
        A,
        rank,
        oversample=config.oversample,
        power_iters=config.power_iters,
        seed=config.seed,
        orth=config.orth,
    )


#: Rank fraction above which ``auto`` takes the exact route, per device type: the measured crossover of the
#: float64 Gram+eigh exact route and ``rsvd`` (10, 2) on 4096² (H100) and 1024² (CPU) matrices; see
#: ``benchmarks/results/rsvd_table_*.md``.
AUTO_RANK_FRACTION = {"cuda": 0.75, "cpu": 0.5}


def auto_uses_exact(config: DecomposerConfig, m: int, n: int, rank: int, device: str = "cpu") -> bool:
    """The ``auto`` rule: exact when ``rank / min(m, n) > fraction`` or the sketch would be full, with
    ``fraction = config.auto_rank_fraction`` or, when None, ``AUTO_RANK_FRACTION`` of the device type."""
    fraction = config.auto_rank_fraction
    if fraction is None:
        fraction = AUTO_RANK_FRACTION.get(torch.device(device).type, AUTO_RANK_FRACTION["cpu"])
    return rank / min(m, n) > fraction or rank + config.oversample >= min(m, n)


@register_decomposer("auto")
def _auto(config: DecomposerConfig, A: torch.Tensor, rank: int) -> SVDResult:
    check_matrix(A, check_finite=False)
    m, n = A.shape[-2:]
    check_rank(rank, m, n)
    exact = auto_uses_exact(config, m, n, rank, A.device.type)
    logger.debug("auto decomposer: rank %d of %dx%d -> %s", rank, m, n, "exact" if exact else "randomized")
    return _svd(config, A, rank) if exact else _rsvd(config, A, rank)


@register_decomposer("krylov")
def _krylov(config: DecomposerConfig, A: torch.Tensor, rank: int) -> SVDResult:
    block = config.block_size or None
    return block_krylov_svd(
        A,
        rank,
        block_size=block,
        depth=config.krylov_depth,
        oversample=config.oversample,
        seed=config.seed,
        orth=config.orth,
    )


@register_decomposer("adaptive")
def _adaptive(config: DecomposerConfig, A: torch.Tensor, rank: int) -> SVDResult:
    block = config.block_size or None
    return rank_by_tolerance(
        A,
        config.tol,
        max_rank=rank,
        block_size=block,
        power_iters=config.power_iters,
        seed=config.seed,
        orth=config.orth,
    )
