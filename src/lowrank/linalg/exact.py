"""Exact truncated SVD: float64 Gram matrix + ``eigh`` where that is accurate, LAPACK/cuSOLVER SVD otherwise.

For ``A`` (m × n) with ``n <= m``: ``AᵀA = V Λ Vᵀ``, ``σ = √λ``, ``U = A V Σ⁻¹`` (all in float64; the
wide case works on ``A Aᵀ``). The eigenvalues carry an absolute error of about ``eps64 · σ₁²``, so the
route is used only when ``(σ₁/σ_r)² · 64 · eps64 <= eps`` of the compute dtype for every matrix of the
batch (σ_r the smallest retained singular value); otherwise ``torch.linalg.svd`` is used (logged at debug
level and counted as ``exact_svd``). float64 inputs always use ``torch.linalg.svd``.
"""

from __future__ import annotations

import logging

import torch

from lowrank.linalg._checks import check_matrix, check_rank, compute_dtype, to_input_dtype
from lowrank.linalg._kernels import FALLBACKS

__all__ = ["truncated_svd", "EXACT_METHODS"]

logger = logging.getLogger(__name__)

EXACT_METHODS = ("auto", "gram", "svd")
_EPS64 = torch.finfo(torch.float64).eps

SVDResult = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _svd(X: torch.Tensor, rank: int) -> SVDResult:
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    return U[..., :rank], S[..., :rank], Vh[..., :rank, :]


def _gram(X: torch.Tensor, rank: int) -> tuple[SVDResult, torch.Tensor]:
    wide = X.shape[-2] < X.shape[-1]
    X64 = X.to(torch.float64)
    if wide:
        X64 = X64.mT
    lam, V = torch.linalg.eigh(X64.mT @ X64)
    lam, V = lam.flip(-1)[..., :rank], V.flip(-1)[..., :rank]
    S = lam.clamp_min(0).sqrt()
    ratio2 = lam[..., :1] / lam[..., -1:]
    ok = ((ratio2 > 0) & (ratio2 * 64 * _EPS64 <= torch.finfo(X.dtype).eps)).all() & torch.isfinite(lam).all()
    U = (X64 @ V) / torch.where(S > 0, S, 1.0).unsqueeze(-2)
    U, Vh = (V, U.mT) if wide else (U, V.mT)
    dt = X.dtype
    return (U.to(dt), S.to(dt), Vh.to(dt)), ok


def truncated_svd(
    A: torch.Tensor, rank: int, *, method: str = "auto", check_finite: bool = True
) -> SVDResult:
    """Exact top-``rank`` SVD ``A ≈ U diag(S) Vh`` (Eckart–Young optimal truncation).

    Args:
        A: ``(..., m, n)`` floating tensor on any device; float16/bfloat16 are computed in float32
            (``ValueError`` when a singular value exceeds the input dtype's range).
        rank: ``1 <= rank <= min(m, n)``.
        method: ``"auto"`` (Gram + float64 ``eigh`` when accurate for the smallest retained σ, else
            ``torch.linalg.svd``), ``"gram"`` (same, the check still guards it) or ``"svd"``.
        check_finite: raise ``ValueError`` on NaN/inf entries (one host synchronisation).

    Returns:
        ``(U, S, Vh)``: ``(..., m, rank)``, ``(..., rank)`` descending, ``(..., rank, n)`` in ``A``'s dtype.

    References:
        Eckart, Young, Psychometrika 1936; Golub, Van Loan, "Matrix Computations", §8.6.
    """
    check_matrix(A, check_finite=check_finite)
    m, n = A.shape[-2:]
    rank = check_rank(rank, m, n)
    if method not in EXACT_METHODS:
        raise ValueError(f"method must be one of {EXACT_METHODS}; got {method!r}")
    X = A.to(compute_dtype(A.dtype))
    if method == "svd" or X.dtype == torch.float64:
        U, S, Vh = _svd(X, rank)
    else:
        (U, S, Vh), ok = _gram(X, rank)
        if not bool(ok):
            FALLBACKS["exact_svd"] += 1
            logger.debug(
                "Gram+eigh not accurate for sigma_%d of a %s input; using torch.linalg.svd",
                rank,
                tuple(A.shape),
            )
            U, S, Vh = _svd(X, rank)
    return to_input_dtype(U, S, Vh, A.dtype)
