"""Randomized block Krylov SVD: more accuracy per matrix product than power iterations.

Where ``rsvd`` keeps only the last power iterate ``(A Aᵀ)^q A Ω``, block Krylov keeps them all,
``K = [A Ω, (A Aᵀ) A Ω, …, (A Aᵀ)^q A Ω]``, and takes the best rank-``r`` approximation inside
``range(K)``. With a block of ``b`` columns it costs ``(3q + 2)·b`` column-products with ``A``; at the
same time as ``rsvd`` with more power iterations it gets much closer to the optimal error on decaying
spectra (measured: 10x smaller gap at 2.5x the time of ``rsvd`` (10, 2)); it is the accuracy option, not a
faster ``rsvd``.

Each new block is normalised (Cholesky-QR in float64) and block-orthogonalised twice against the
previous ones (block classical Gram–Schmidt, CGS2); the final basis goes through CholeskyQR2 with the same
end-of-call health check and Householder fallback as :func:`lowrank.linalg.randomized_svd`.

References:
    Musco, Musco, "Randomized block Krylov methods for stronger and faster approximate singular value
    decomposition", NeurIPS 2015 (Alg. 2).
"""

from __future__ import annotations

import math

import torch

from lowrank.linalg._checks import (
    check_matrix,
    check_nonnegative,
    check_rank,
    compute_dtype,
    sketch_size,
    to_input_dtype,
)
from lowrank.linalg._kernels import cholesky_qr2, householder_qr
from lowrank.linalg.rsvd import _orth_step, finish, gaussian, use_householder

__all__ = ["block_krylov_svd", "krylov_basis", "default_block_size", "DEFAULT_DEPTH"]

SVDResult = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


#: Default Krylov depth; with blocks of (r + p)/3 columns the space holds about 2.7 (r + p) columns.
#: Measured on an H100 (4096², rank 384, decaying spectrum): 10x smaller gap to the optimal error than
#: rsvd (10, q) at the same time, about 2.5x the time of rsvd (10, 2) (see the benchmark's Krylov table).
DEFAULT_DEPTH = 7


def default_block_size(rank: int, oversample: int) -> int:
    """Default block: a third of ``rank + oversample`` (rounded up). Measured: smaller blocks with a deeper
    space beat wide, shallow ones at equal time, as long as the space holds >= ~2.5 (r + p) columns."""
    return max(1, math.ceil((rank + oversample) / 3))


def _project_out(Y: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    for _ in range(2):  # CGS2: twice is enough
        Y = Y - K @ (K.mT @ Y)
    return Y


def krylov_basis(
    X: torch.Tensor, Omega: torch.Tensor, depth: int, *, householder: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthonormal basis ``(..., m, (depth+1)·b)`` of the block Krylov space of ``X`` started at ``Omega``.

    Returns ``(K, ok)`` with ``ok`` a 0-d boolean tensor (False when a Cholesky step failed).
    """
    ok = torch.ones((), dtype=torch.bool, device=X.device)
    Q, ok_q = _orth_step(X @ Omega, householder)
    blocks = [Q]
    for _ in range(depth):
        Z, ok_z = _orth_step(X.mT @ blocks[-1], householder)
        Y = _project_out(X @ Z, torch.cat(blocks, dim=-1))
        Q, ok_y = _orth_step(Y, householder)
        blocks.append(Q)
        if ok_z is not None:
            ok = ok & ok_z & ok_y
    K = torch.cat(blocks, dim=-1)
    if householder:
        return householder_qr(K), ok
    K, ok_final = cholesky_qr2(K)
    return K.to(X.dtype), ok & ok_final & (ok_q if ok_q is not None else ok)


def block_krylov_svd(
    A: torch.Tensor,
    rank: int,
    *,
    block_size: int | None = None,
    depth: int = DEFAULT_DEPTH,
    oversample: int = 10,
    generator: torch.Generator | None = None,
    seed: int = 0,
    check_finite: bool = True,
    orth: str = "auto",
) -> SVDResult:
    """Approximate top-``rank`` SVD from a randomized block Krylov space.

    Args:
        A: ``(..., m, n)`` floating tensor; float16/bfloat16 are computed in float32
            (``ValueError`` when a singular value exceeds the input dtype's range).
        rank: ``1 <= rank <= min(m, n)``.
        block_size: columns per block ``b``; None uses :func:`default_block_size` ``(rank, oversample)``.
            The space has ``(depth + 1)·b`` columns, clamped to ``min(m, n)`` by shrinking ``b`` (logged
            at debug level); it must hold at least ``rank`` columns, else ``b`` is raised to make it so.
        depth: number of Krylov steps ``q >= 0`` (``q = 0`` is ``rsvd`` with no power iteration).
        oversample: only used to derive the default block size.
        generator: ``torch.Generator`` on ``A``'s device; None uses a fresh one seeded with ``seed``.
        seed: seed used only when ``generator`` is None.
        check_finite: raise ``ValueError`` on NaN/inf entries.
        orth: ``auto``, ``cholesky`` or ``householder`` (see :func:`lowrank.linalg.randomized_svd`).

    Returns:
        ``(U, S, Vh)`` as :func:`lowrank.linalg.randomized_svd`.

    References:
        Musco, Musco, NeurIPS 2015, Alg. 2.
    """
    check_matrix(A, check_finite=check_finite)
    m, n = A.shape[-2:]
    rank = check_rank(rank, m, n)
    depth = check_nonnegative("depth", depth)
    oversample = check_nonnegative("oversample", oversample)
    b = (
        default_block_size(rank, oversample)
        if block_size is None
        else check_nonnegative("block_size", block_size)
    )
    if b < 1:
        raise ValueError(f"block_size must be >= 1; got {block_size!r}")
    b = max(b, math.ceil(rank / (depth + 1)))  # the space must hold ``rank`` columns
    total = sketch_size((depth + 1) * b, 0, m, n)
    b = max(1, total // (depth + 1))
    depth = max(0, min(depth, total // b - 1))
    X = A.to(compute_dtype(A.dtype))
    Omega = gaussian(n, b, X, generator, seed)
    if (depth + 1) * b < rank:  # tiny matrices: fall back to a full sketch with no Krylov steps
        Omega, depth = gaussian(n, sketch_size(rank, oversample, m, n), X, generator, seed), 0
    hh = use_householder(orth, X.device)
    U, S, Vh = finish(X, rank, lambda h: krylov_basis(X, Omega, depth, householder=h), hh)
    return to_input_dtype(U, S, Vh, A.dtype)
