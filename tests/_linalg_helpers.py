"""Test matrices with known spectra for the linalg tests."""

from __future__ import annotations

import torch


def orthonormal(m: int, k: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q.to(dtype)


def with_spectrum(
    m: int, n: int, s: torch.Tensor, seed: int = 0, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``U diag(s) Vᵀ`` with Haar-like random orthonormal ``U`` (m × len(s)) and ``V`` (n × len(s))."""
    k = s.numel()
    U, V = orthonormal(m, k, seed), orthonormal(n, k, seed + 1)
    return ((U * s.to(torch.float64)) @ V.mT).to(dtype)


def decaying(
    m: int, n: int, seed: int = 0, rate: float = 0.05, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Matrix with singular values ``exp(-rate · i)``, i = 0..min(m, n)-1."""
    s = torch.exp(-rate * torch.arange(min(m, n), dtype=torch.float64))
    return with_spectrum(m, n, s, seed, dtype)


def low_rank(
    m: int, n: int, r: int, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly rank-``r`` matrix and its singular values (descending, from 10 down to 1)."""
    s = torch.linspace(10.0, 1.0, r, dtype=torch.float64)
    return with_spectrum(m, n, s, seed, dtype), s


def rel_error(A: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> float:
    A64 = A.to(torch.float64)
    R = A64 - (U.to(torch.float64) * S.to(torch.float64).unsqueeze(-2)) @ Vh.to(torch.float64)
    return float(torch.linalg.matrix_norm(R) / torch.linalg.matrix_norm(A64))


def optimal_error(A: torch.Tensor, rank: int) -> float:
    s = torch.linalg.svdvals(A.to(torch.float64))
    return float(s[rank:].square().sum().sqrt() / s.square().sum().sqrt())


def orth_defect(Q: torch.Tensor) -> float:
    """``max |QᵀQ − I|`` for ``Q`` with orthonormal columns."""
    Q64 = Q.to(torch.float64)
    return float((Q64.mT @ Q64 - torch.eye(Q.shape[-1], dtype=torch.float64)).abs().max())
