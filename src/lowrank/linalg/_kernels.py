"""Building blocks of the SVD engine: Cholesky-QR, Householder fallback, small SVD via a Gram matrix.

Every routine here works on batches ``(..., m, k)`` and never reads a value back to the host: health
flags are returned as boolean tensors so that the caller can check them once, at the end.

References:
    Fukaya, Nakatsukasa, Yanagisawa, Yamamoto, "CholeskyQR2: a simple and communication-avoiding
    algorithm for computing a tall-skinny QR factorization", ScalA 2014.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch

__all__ = [
    "FALLBACKS",
    "fallback_counts",
    "cholesky_qr",
    "cholesky_qr2",
    "householder_qr",
    "gram_svd",
    "record_fallback",
]

logger = logging.getLogger(__name__)

#: How many times each fallback fired in this process (``fallback_counts()`` returns a copy).
FALLBACKS: Counter[str] = Counter()

_EPS64 = torch.finfo(torch.float64).eps


def fallback_counts() -> dict[str, int]:
    """Return a copy of the per-kind fallback counters (e.g. ``{"householder_qr": 2}``)."""
    return dict(FALLBACKS)


def record_fallback(kind: str, message: str, *args: object) -> None:
    """Count a fallback of ``kind`` and log it at warning level."""
    FALLBACKS[kind] += 1
    logger.warning("fallback %s (#%d): " + message, kind, FALLBACKS[kind], *args)


def cholesky_qr(Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One Cholesky-QR pass in float64: ``Q = Y R⁻¹`` with ``RᵀR = YᵀY``.

    Args:
        Y: ``(..., m, k)`` with ``k <= m``.

    Returns:
        ``(Q, info)``: ``Q`` ``(..., m, k)`` in float64 (orthonormal to about ``κ(Y)² · eps64``) and the
        int tensor ``info`` of ``torch.linalg.cholesky_ex`` (nonzero where the Gram matrix was not
        numerically positive definite; ``Q`` is then not usable).
    """
    Y64 = Y.to(torch.float64)
    G = Y64.mT @ Y64
    L, info = torch.linalg.cholesky_ex(G)
    Q = torch.linalg.solve_triangular(L.mT, Y64, upper=True, left=False)
    return Q, info


def cholesky_qr2(Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two Cholesky-QR passes (CholeskyQR2) with a health flag.

    The second pass's Gram matrix ``Q₁ᵀQ₁`` measures how far the first pass is from orthonormal; when
    ``‖Q₁ᵀQ₁ − I‖_max < 0.5`` the second pass returns ``Q`` orthonormal to working precision.

    Args:
        Y: ``(..., m, k)`` with ``k <= m``.

    Returns:
        ``(Q, ok)``: ``Q`` ``(..., m, k)`` float64 and a 0-d boolean tensor, False if any matrix of the
        batch failed (the caller should then use :func:`householder_qr`).
    """
    Q1, info1 = cholesky_qr(Y)
    G2 = Q1.mT @ Q1
    eye = torch.eye(G2.shape[-1], dtype=G2.dtype, device=G2.device)
    defect = (G2 - eye).abs().amax(dim=(-2, -1))
    L2, info2 = torch.linalg.cholesky_ex(G2)
    Q = torch.linalg.solve_triangular(L2.mT, Q1, upper=True, left=False)
    ok = (info1 == 0).all() & (info2 == 0).all() & (defect < 0.5).all() & torch.isfinite(Q).all()
    return Q, ok


def householder_qr(Y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of ``range(Y)`` by Householder QR (always stable, slower on GPUs)."""
    return torch.linalg.qr(Y, mode="reduced").Q


def gram_svd(
    B: torch.Tensor, rank: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD of a short-wide ``B`` ``(..., k, n)`` (k <= n) from its k×k Gram matrix in float64.

    ``B Bᵀ = W Λ Wᵀ`` (``eigh``), ``σ = √λ``, ``Vh = Σ⁻¹ Wᵀ B``. The eigenvalues carry an absolute error
    of about ``eps64 · σ₁²``, so ``σ_r`` has relative error about ``eps64 · (σ₁/σ_r)²``: the result is
    accurate to the working precision ``eps`` when ``(σ₁/σ_r)² · 64 · eps64 <= eps``.

    Args:
        B: ``(..., k, n)``.
        rank: number of triplets to return, ``rank <= k``.
        eps: target relative accuracy (machine epsilon of the caller's compute dtype).

    Returns:
        ``(W, S, Vh, ok)``: ``W`` ``(..., k, rank)``, ``S`` ``(..., rank)`` descending, ``Vh``
        ``(..., rank, n)``, all float64, and a 0-d boolean tensor ``ok`` saying the accuracy condition
        holds for every matrix of the batch (when False use a full SVD of ``B`` instead).
    """
    B64 = B.to(torch.float64)
    lam, W = torch.linalg.eigh(B64 @ B64.mT)  # ascending
    lam = lam.flip(-1)[..., :rank]
    W = W.flip(-1)[..., :rank]
    S = lam.clamp_min(0).sqrt()
    ratio2 = lam[..., :1] / lam[..., -1:]  # (σ₁/σ_r)²; inf or negative when σ_r vanished
    ok = ((ratio2 > 0) & (ratio2 * 64 * _EPS64 <= eps)).all() & torch.isfinite(lam).all()
    Vh = (W / torch.where(S > 0, S, 1.0).unsqueeze(-2)).mT @ B64
    return W, S, Vh, ok
