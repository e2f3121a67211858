"""Rank by tolerance: a blocked randomized QB factorisation that stops once ‖A − Q B‖_F <= tol · ‖A‖_F.

The error estimate needs no extra pass over ``A``: for an orthonormal ``Q`` and ``B = Qᵀ A``,
``‖A − Q B‖²_F = ‖A‖²_F − ‖B‖²_F``, so after each block ``E ← E − ‖B_j‖²_F`` (one float per matrix, read
once per block to decide whether to stop). After the loop the smallest rank ``r`` with
``‖A‖²_F − Σ_{i<=r} σ̃ᵢ² <= tol² ‖A‖²_F`` is kept, using the singular values σ̃ of ``B`` that the final
small SVD computes anyway.

The estimate is computed in float64 from float32 products, so tolerances below about ``1e-3`` (≈ √eps of
float32 times a small factor) are not resolved reliably for float32 inputs.

References:
    Yu, Gu, Li, "Efficient randomized algorithms for the fixed-precision low-rank matrix approximation",
    SIAM J. Matrix Anal. Appl. 39(3), 2018 (Alg. randQB_EI with power iterations).
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import torch

from lowrank.linalg._checks import check_matrix, check_nonnegative, check_rank, compute_dtype, to_input_dtype
from lowrank.linalg._kernels import cholesky_qr2, householder_qr, record_fallback
from lowrank.linalg.rsvd import _orth_step, finish, gaussian, make_generator, use_householder

__all__ = ["rank_by_tolerance", "adaptive_basis", "AdaptiveBasis"]

logger = logging.getLogger(__name__)

SVDResult = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class AdaptiveBasis(NamedTuple):
    """Result of :func:`adaptive_basis`: ``Q (..., m, k)``, ``B (..., k, n)``, per-matrix ``‖A‖²`` and
    estimated ``‖A − Q B‖²`` (float64, shape ``(...)``), and the number of blocks drawn."""

    Q: torch.Tensor
    B: torch.Tensor
    norm2: torch.Tensor
    err2: torch.Tensor
    blocks: int


def _block(X, Q, B, Omega, power_iters, householder):
    def residual_range(V):  # (A − Q B) V without forming A − Q B
        return X @ V - Q @ (B @ V)

    Y, _ = _orth_step(residual_range(Omega), householder)
    for _ in range(power_iters):
        Z, _ = _orth_step(X.mT @ Y - B.mT @ (Q.mT @ Y), householder)
        Y, _ = _orth_step(residual_range(Z), householder)
    for _ in range(2):  # re-orthogonalise against the basis so far (CGS2)
        Y = Y - Q @ (Q.mT @ Y)
    if householder:
        return householder_qr(Y), torch.ones((), dtype=torch.bool, device=X.device)
    Y, ok = cholesky_qr2(Y)
    return Y.to(X.dtype), ok


def adaptive_basis(
    X: torch.Tensor,
    tol: float,
    max_cols: int,
    block_size: int,
    power_iters: int,
    generator: torch.Generator,
    householder: bool = False,
) -> AdaptiveBasis:
    """Grow ``Q`` block by block until the estimated relative error is <= ``tol`` for every matrix."""
    m, n = X.shape[-2:]
    batch = X.shape[:-2]
    Q = X.new_zeros(*batch, m, 0)
    B = X.new_zeros(*batch, 0, n)
    norm2 = torch.linalg.matrix_norm(X.to(torch.float64)).square()
    err2, blocks = norm2.clone(), 0
    while Q.shape[-1] < max_cols:
        b = min(block_size, max_cols - Q.shape[-1])
        Omega = torch.randn(n, b, generator=generator, device=X.device, dtype=X.dtype)
        Qj, ok = _block(X, Q, B, Omega, power_iters, householder=householder)
        Bj = Qj.mT @ X
        err2_j = err2 - torch.linalg.matrix_norm(Bj.to(torch.float64)).square()
        ok, done = torch.stack([ok, (err2_j <= tol**2 * norm2).all()]).tolist()  # one host read per block
        if not ok:
            record_fallback(
                "householder_qr", "Cholesky-QR failed in block %d of a %s input", blocks, tuple(X.shape)
            )
            Qj, _ = _block(X, Q, B, Omega, power_iters, householder=True)
            Bj = Qj.mT @ X
            err2_j = err2 - torch.linalg.matrix_norm(Bj.to(torch.float64)).square()
            done = bool((err2_j <= tol**2 * norm2).all())
        Q, B, err2 = torch.cat([Q, Qj], dim=-1), torch.cat([B, Bj], dim=-2), err2_j
        blocks += 1
        if done:
            break
    return AdaptiveBasis(Q, B, norm2, err2, blocks)


def rank_by_tolerance(
    A: torch.Tensor,
    tol: float,
    *,
    max_rank: int | None = None,
    block_size: int | None = None,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
    seed: int = 0,
    check_finite: bool = True,
    orth: str = "auto",
) -> SVDResult:
    """Truncated SVD with the smallest rank whose estimated relative error is <= ``tol``.

    Args:
        A: ``(..., m, n)`` floating tensor; float16/bfloat16 are computed in float32
            (``ValueError`` when a singular value exceeds the input dtype's range).
        tol: target relative Frobenius error ``‖A − U S Vh‖_F / ‖A‖_F`` in (0, 1).
        max_rank: largest rank allowed (default ``min(m, n)``); when the tolerance cannot be met within it
            the result has rank ``max_rank`` and a warning gives the estimated error.
        block_size: columns drawn per block (default ``max(8, ceil(max_rank / 16))``).
        power_iters: power iterations per block.
        generator: ``torch.Generator`` on ``A``'s device; None uses a fresh one seeded with ``seed``.
        seed: seed used only when ``generator`` is None.
        check_finite: raise ``ValueError`` on NaN/inf entries.
        orth: ``auto``, ``cholesky`` or ``householder`` (see :func:`lowrank.linalg.randomized_svd`).

    Returns:
        ``(U, S, Vh)`` of rank ``r`` (for a batch: the largest rank any of its matrices needs).

    References:
        Yu, Gu, Li, SIAM J. Matrix Anal. Appl. 2018.
    """
    check_matrix(A, check_finite=check_finite)
    m, n = A.shape[-2:]
    if not 0.0 < float(tol) < 1.0:
        raise ValueError(f"tol must be in (0, 1); got {tol!r}")
    max_rank = check_rank(min(m, n) if max_rank is None else max_rank, m, n)
    block = (
        max(8, math.ceil(max_rank / 16))
        if block_size is None
        else check_nonnegative("block_size", block_size)
    )
    if block < 1:
        raise ValueError(f"block_size must be >= 1; got {block_size!r}")
    power_iters = check_nonnegative("power_iters", power_iters)
    X = A.to(compute_dtype(A.dtype))
    gen = generator if generator is not None else make_generator(X.device, seed)
    gaussian(1, 1, X, gen, seed)  # validates the generator's device
    hh = use_householder(orth, X.device)
    basis = adaptive_basis(X, float(tol), max_rank, block, power_iters, gen, householder=hh)
    k = basis.Q.shape[-1]
    U, S, Vh = finish(X, k, lambda hh: (basis.Q, torch.ones((), dtype=torch.bool, device=X.device)))
    tail = basis.norm2.unsqueeze(-1) - torch.cumsum(
        S.to(torch.float64).square(), dim=-1
    )  # error² at rank i+1
    need = (tail > (float(tol) ** 2) * basis.norm2.unsqueeze(-1)).sum(dim=-1) + 1  # smallest rank meeting tol
    r = min(int(need.max()), k)
    est = float((tail[..., r - 1].clamp_min(0) / basis.norm2).sqrt().max())
    if est > tol:
        logger.warning(
            "tolerance %.3g not reached within max_rank=%d (estimated error %.3g)", tol, max_rank, est
        )
    logger.debug(
        "rank_by_tolerance: rank %d of %d drawn in %d blocks, est. error %.3g", r, k, basis.blocks, est
    )
    return to_input_dtype(U[..., :r], S[..., :r], Vh[..., :r, :], A.dtype)
