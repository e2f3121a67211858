"""Activation-aware truncation: minimise ‖(W − W')X‖_F over rank-r W' from the Gram G = XᵀX.

Notation (paper names): W (m × n) the weight (y = W x), X (tokens × n) the calibration inputs,
G = XᵀX (n × n), S any square root with S Sᵀ = G. The minimiser is W' = [W S]_r S⁺ and its loss is the
sum of the squared discarded singular values of W S ("whitened" spectrum). Three routes reach it:

* ``cholesky`` (SVD-LLM): S = chol(G) in float64, decompose W S, map back with the triangular inverse.
  If G is not positive definite it falls back to ``eigh`` (counted in ``Whitening.fallback``).
* ``eigh`` (SVD-LLM V2's two rounds of SVD): G = U_s Λ U_sᵀ, decompose W U_s √Λ, map back through
  the pseudo-inverse (√Λ)⁺ U_sᵀ; directions with no activation energy are dropped, nothing is jittered.
* ``projection`` (output covariance): W' = U_r U_rᵀ W with U_r the top-r left singular vectors of W S,
  i.e. the top eigenvectors of W G Wᵀ. No inverse at all: on a positive definite G it equals the two
  routes above; on a rank-deficient G it keeps W's action on directions the data never visited (the
  pseudo-inverse routes zero it), with the same calibration loss.

References:
    Wang et al., "SVD-LLM: Truncation-aware SVD for LLM compression", ICLR 2025 (Alg. 1, Thm. 3.2).
    Wang et al., "SVD-LLM V2: Optimizing singular value truncation", NAACL 2025 (two-round SVD).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "Decompose",
    "Whitening",
    "Truncation",
    "whiten",
    "truncate_whitened",
    "truncate_projection",
    "whitened_spectrum",
    "output_loss",
    "exact_truncated_svd",
]

Decompose = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""``(A (m × n), rank) -> (U (m × k), S (k,), Vh (k × n))``, the top-k triplets, S descending."""


def exact_truncated_svd(A: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` triplets of ``A`` (m × n) from a full ``torch.linalg.svd`` (reference decomposer)."""
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    return U[:, :rank], S[:rank], Vh[:rank]


@dataclass(frozen=True)
class Whitening:
    """A square root S of a Gram matrix G (S Sᵀ = G), kept in the form that is cheap to apply.

    ``kind == 'cholesky'``: ``L`` lower triangular, S = L. ``kind == 'eigh'``: S = Q diag(s) with
    ``s = √max(λ, 0)``; s⁺ zeroes eigenvalues at or below ``n · eps · λ_max`` (numerical rank ``rank``).
    ``fallback`` is True when Cholesky was requested and G was not positive definite.
    """

    kind: str
    L: torch.Tensor | None = None
    Q: torch.Tensor | None = None
    s: torch.Tensor | None = None
    s_pinv: torch.Tensor | None = None
    rank: int = 0
    fallback: bool = False

    def apply(self, W: torch.Tensor) -> torch.Tensor:
        """W S for W (m × n)."""
        if self.kind == "cholesky":
            return W @ self.L
        return (W @ self.Q) * self.s

    def apply_pinv(self, M: torch.Tensor) -> torch.Tensor:
        """M S⁺ for M (k × n): triangular solve (Cholesky) or (M diag(s⁺)) Qᵀ (eigh)."""
        if self.kind == "cholesky":
            return torch.linalg.solve_triangular(self.L, M, upper=False, left=False)
        return (M * self.s_pinv) @ self.Q.T


@dataclass(frozen=True)
class Truncation:
    """Result of a rank-r truncation: W' = B @ A with A (r × n), B (m × r).

    ``sigma``: the top-r whitened singular values; ``total``: ‖W S‖²_F = tr(W G Wᵀ);
    ``loss``: the theoretical truncation loss total − Σσ² (= ‖(W − W')X‖²_F for the exact minimiser).
    """

    A: torch.Tensor
    B: torch.Tensor
    sigma: torch.Tensor
    total: float
    loss: float


def _check_gram(G: torch.Tensor) -> None:
    if G.ndim != 2 or G.shape[0] != G.shape[1]:
        raise ValueError(f"Gram matrix must be square (n × n); got shape {tuple(G.shape)}")
    if not torch.isfinite(G).all():
        raise ValueError("Gram matrix contains non-finite values (inf/nan in the calibration activations)")


def whiten(G: torch.Tensor, method: str = "cholesky") -> Whitening:
    """Factor the Gram matrix G = XᵀX (n × n) in float64.

    Args:
        G: (n, n) symmetric positive semi-definite.
        method: ``'cholesky'`` (falls back to ``'eigh'`` when G is not positive definite, flagged in
            ``fallback``), ``'eigh'`` (always the eigendecomposition), or ``'sqrt'`` (Cholesky when it
            succeeds, else eigh, without flagging: for routes that never invert S).

    Returns:
        A :class:`Whitening`.
    """
    if method not in ("cholesky", "eigh", "sqrt"):
        raise ValueError(f"whitening method must be 'cholesky', 'eigh' or 'sqrt'; got {method!r}")
    _check_gram(G)
    G = G.to(torch.float64)
    G = (G + G.T) / 2
    if method in ("cholesky", "sqrt"):
        L, info = torch.linalg.cholesky_ex(G)
        if int(info) == 0:
            return Whitening(kind="cholesky", L=L, rank=G.shape[0])
    lam, Q = torch.linalg.eigh(G)
    lam_max = float(lam[-1].clamp_min(0))
    tol = G.shape[0] * torch.finfo(torch.float64).eps * lam_max
    keep = lam > tol
    s = lam.clamp_min(0).sqrt()
    s_pinv = torch.where(keep, 1.0 / torch.where(keep, s, torch.ones_like(s)), torch.zeros_like(s))
    return Whitening(
        kind="eigh", Q=Q, s=s, s_pinv=s_pinv, rank=int(keep.sum()), fallback=method == "cholesky"
    )


def _decompose(D: torch.Tensor, rank: int, decompose: Decompose | None, dtype: torch.dtype | None):
    work = D if dtype is None else D.to(dtype)
    U, S, Vh = (decompose or exact_truncated_svd)(work, rank)
    return U.to(torch.float64), S.to(torch.float64), Vh.to(torch.float64)


def truncate_whitened(
    W: torch.Tensor,
    wh: Whitening,
    rank: int,
    *,
    decompose: Decompose | None = None,
    dtype: torch.dtype | None = None,
) -> Truncation:
    """SVD-LLM truncation: decompose W S, keep ``rank`` triplets, map back with S⁺, split √Σ.

    Args:
        W: (m, n) weight.
        wh: whitening of the input Gram (from :func:`whiten`).
        rank: kept rank r.
        decompose: top-r decomposer (default: exact SVD).
        dtype: dtype of the decomposition (default float64; whitening and mapping back stay float64).

    Returns:
        :class:`Truncation` with A = √Σ Vh S⁺ (r × n) and B = U √Σ (m × r).
    """
    W64 = W.detach().to(torch.float64)
    D = wh.apply(W64)
    U, S, Vh = _decompose(D, rank, decompose, dtype)
    root = S.sqrt()
    A = wh.apply_pinv(root[:, None] * Vh)
    B = U * root
    total = float(D.square().sum())
    return Truncation(A=A, B=B, sigma=S, total=total, loss=max(total - float(S.square().sum()), 0.0))


def truncate_projection(
    W: torch.Tensor,
    wh: Whitening,
    rank: int,
    *,
    decompose: Decompose | None = None,
    dtype: torch.dtype | None = None,
) -> Truncation:
    """Output-covariance route: W' = U_r U_rᵀ W with U_r the top-r left singular vectors of W S.

    Equals :func:`truncate_whitened` when G is positive definite; needs no inverse of S, so it is
    unaffected by ill-conditioning of G. Returns A = U_rᵀ W (r × n), B = U_r (m × r).
    """
    W64 = W.detach().to(torch.float64)
    D = wh.apply(W64)
    U, S, _ = _decompose(D, rank, decompose, dtype)
    if decompose is not None:  # an approximate U may have drifted from orthonormality
        U, _ = torch.linalg.qr(U)
    total = float(D.square().sum())
    return Truncation(A=U.T @ W64, B=U, sigma=S, total=total, loss=max(total - float(S.square().sum()), 0.0))


def whitened_spectrum(
    W: torch.Tensor,
    wh: Whitening,
    k: int | None = None,
    *,
    decompose: Decompose | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, float]:
    """Squared whitened singular values σ² of W S (descending) and the total energy ‖W S‖²_F.

    With ``k`` only the top-k values are computed (through ``decompose``); the truncation loss at any
    rank r ≤ k is still exact: ``total − σ²[:r].sum()``.
    """
    D = wh.apply(W.detach().to(torch.float64))
    total = float(D.square().sum())
    if k is None or k >= min(D.shape):
        sigma = torch.linalg.svdvals(D if dtype is None else D.to(dtype)).to(torch.float64)
    else:
        _, sigma, _ = _decompose(D, k, decompose, dtype)
    return sigma.square(), total


def output_loss(W: torch.Tensor, W_approx: torch.Tensor, G: torch.Tensor) -> float:
    """‖(W − W')X‖²_F = tr((W − W') G (W − W')ᵀ), computed in float64. W, W': (m, n); G: (n, n)."""
    E = W.detach().to(torch.float64) - W_approx.detach().to(torch.float64)
    return float(((E @ G.to(torch.float64)) * E).sum())
