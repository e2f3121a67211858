"""Low-rank projections of the KV cache, computed from per-head d × d Gram matrices (torch only, float64).

Notation for one layer and one KV head: K, V (n × d) the keys and values of n calibration tokens, Q (n × d)
the queries that read them, d the head dimension, R the kept rank, and the Grams G_K = KᵀK, G_Q = QᵀQ,
G_V = VᵀV (d × d, symmetric positive semi-definite). A key projection is a pair A, B (d × R): the cache
stores K A (n × R), queries are mapped to Q B and the logits become (Q B)(K A)ᵀ = Q B Aᵀ Kᵀ ≈ Q Kᵀ. A value
projection C, D is the same with values: the cache stores V C and the head output becomes (softmax · V C) Dᵀ.
Every function reads Grams only; activations (n × d) are never needed. Grams may carry leading batch
dimensions (e.g. (H_kv, d, d) for a layer), are taken as symmetric (``torch.linalg.eigh`` reads their lower
triangle) and are computed on in float64 on their own device.

* :func:`k_svd` / :func:`v_svd` (Palu, LoRC): A = B = top-R eigenvectors of G_K, the orthogonal projector
  minimising ‖K − K A Aᵀ‖²_F.
* :func:`eigen` (Eigen attention, Zack): A = B = top-R eigenvectors of G_K + G_Q, minimising
  ‖K − K P‖²_F + ‖Q − Q P‖²_F over orthogonal projectors P = A Aᵀ.
* :func:`kq` (attention-optimal, DRONE): minimises ‖K A Bᵀ Qᵀ − K Qᵀ‖²_F, i.e. K A Bᵀ Qᵀ is the
  Eckart–Young truncation of K Qᵀ (n × n), reached through the d × d core M = Σ_K V_Kᵀ V_Q Σ_Q.
* :func:`wo_aware`: :func:`kq` with (K, Q) → (V, [W_{O,1} … W_{O,g}]ᵀ), the o_proj blocks of the group.

Grouped-query attention (g query heads Q_1 … Q_g read one K): both group objectives reduce to :func:`kq`
with a group query Gram, and one B serves every head of the group, even when each head may have its own
B_i. Per head, Σ_i ‖K A B_iᵀ Q_iᵀ − K Q_iᵀ‖² = ‖K A [B_1ᵀQ_1ᵀ … B_gᵀQ_gᵀ] − K [Q_1ᵀ … Q_gᵀ]‖²; summed (the
seed's form), ‖Σ_i (K A B_iᵀ Q_iᵀ − K Q_iᵀ)‖² = ‖K A Σ_i B_iᵀ Q_iᵀ − K (Σ_i Q_i)ᵀ‖². In both the
approximant has rank ≤ R (its columns lie in range(K A)), so the error is at least the Eckart–Young bound
of the target, K [Q_1ᵀ … Q_gᵀ] or K (Σ_i Q_i)ᵀ. With B_i = B for all i the approximants become
K A Bᵀ [Q_1ᵀ … Q_gᵀ] and K A Bᵀ (Σ_i Q_i)ᵀ, which :func:`kq` makes exactly those truncations given
G_Q = Σ_i Q_iᵀ Q_i (per head, the Gram of the stacked queries) or G_Q = (Σ_i Q_i)ᵀ (Σ_i Q_i) (summed). The
bound is attained, so the shared B is optimal. (Equivalently: :func:`kq` returns K A Bᵀ = (K A)(K A)⁺ K,
the least-squares decoder of the cached K A for any query.)

The pseudo-inverse of Σ_K drops eigenvalues λ of G_K with λ ≤ d · eps · λ_max (eps of float64), the default
relative tolerance of ``torch.linalg.pinv`` applied to G_K and the rule of ``lowrank.linalg.whitening``:
below it an eigenvalue of a Gram is rounding noise. The directions dropped carry ‖K v‖² ≤ d · eps · λ_max.

References:
    Lesens, Rakhshan, Rabusseau, "Some theoretical results on SVD methods for KV cache compression", 2025
        (attention-optimal projection, GQA theorem, gap ε).
    Chen et al., "DRONE: Data-aware low-rank compression for large NLP models", NeurIPS 2021.
    Saxena et al., "Eigen attention: Attention in low-rank space for KV cache compression", 2024.
    Chang et al., "Palu: KV-cache compression with low-rank projection", ICLR 2025.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "Projection",
    "epsilon_gap",
    "eigen",
    "k_svd",
    "kq",
    "logit_energy",
    "logit_error",
    "v_svd",
    "wo_aware",
]

_EPS = torch.finfo(torch.float64).eps


@dataclass(frozen=True)
class Projection:
    """A rank-R projection pair of one head (or a batch of heads), all float64.

    Attributes:
        A: (..., d, R) cache side: the cache stores K A (values: C, the cache stores V C).
        B: (..., d, R) query side: queries become Q B (values: D, the output is (softmax · V C) Dᵀ).
        sigma: (..., d) descending singular values of the matrix the method truncates: K for
            :func:`k_svd`, [K; Q] for :func:`eigen`, K Qᵀ for :func:`kq`, V [W_{O,1} … W_{O,g}] for
            :func:`wo_aware` (its top d; the rest are zero).
        objective: (...) the method's own objective at the solution, Σ_{i>R} σ_i²: ‖K − K A Aᵀ‖²_F,
            ‖K − K A Aᵀ‖²_F + ‖Q − Q A Aᵀ‖²_F, ‖K A Bᵀ Qᵀ − K Qᵀ‖²_F or Σ_i ‖V C Dᵀ W_{O,i} − V W_{O,i}‖²_F.
    """

    A: torch.Tensor
    B: torch.Tensor
    sigma: torch.Tensor
    objective: torch.Tensor

    @property
    def rank(self) -> int:
        """Kept rank R."""
        return self.A.shape[-1]


# --------------------------------------------------------------------------------------------- checks
def _tensor(name: str, X: object) -> torch.Tensor:
    """``X`` as float64 after checking it is a finite floating tensor."""
    if not isinstance(X, torch.Tensor) or not X.is_floating_point():
        got = getattr(X, "dtype", type(X).__name__)
        raise ValueError(f"{name} must be a floating torch.Tensor; got {got}")
    if not bool(torch.isfinite(X).all()):
        raise ValueError(f"{name} has {int((~torch.isfinite(X)).sum())} non-finite entries (NaN or inf)")
    return X.detach().to(torch.float64)


def _gram(name: str, G: object) -> torch.Tensor:
    """``G`` as float64 after checking it is a finite floating (..., d, d) tensor with d ≥ 1."""
    G = _tensor(name, G)
    if G.ndim < 2 or G.shape[-1] != G.shape[-2] or G.shape[-1] == 0:
        raise ValueError(f"{name} must be a square (..., d, d) matrix, d >= 1; got shape {tuple(G.shape)}")
    return G


def _pair(G_K: object, G_Q: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Both Grams checked, float64, on G_K's device; ``ValueError`` unless their shapes agree."""
    G_K, G_Q = _gram("G_K", G_K), _gram("G_Q", G_Q)
    if G_K.shape != G_Q.shape:
        raise ValueError(
            f"G_K and G_Q must have the same shape; got {tuple(G_K.shape)} and {tuple(G_Q.shape)}"
        )
    return G_K, G_Q.to(G_K.device)


def _rank(R: object, d: int) -> int:
    """``R`` unchanged, or ``ValueError`` unless it is an int in [1, d]."""
    if isinstance(R, bool) or not isinstance(R, int) or not 1 <= R <= d:
        raise ValueError(f"R must be an int in [1, d={d}]; got R={R!r}")
    return R


# ----------------------------------------------------------------------------------------------- math
def _eigh_desc(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (..., d) descending and clamped at 0, eigenvectors (..., d, d) as columns."""
    lam, V = torch.linalg.eigh(G)
    return lam.flip(-1).clamp_min(0), V.flip(-1)


def _top_eigenvectors(G: torch.Tensor, R: int) -> Projection:
    """A = B = top-R eigenvectors of the PSD ``G`` = XᵀX; σ = √λ; objective Σ_{i>R} λ_i = ‖X − X A Aᵀ‖²."""
    lam, V = _eigh_desc(G)
    A = V[..., :R]
    return Projection(A=A, B=A, sigma=lam.sqrt(), objective=lam[..., R:].sum(-1))


def _core(G_K: torch.Tensor, G_Q: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """λ_K, V_K, Σ_K, Σ_K⁺ and the SVD factors U, Σ of M = Σ_K V_Kᵀ V_Q Σ_Q (singular values of K Qᵀ)."""
    lam_K, V_K = _eigh_desc(G_K)
    keep = lam_K > G_K.shape[-1] * _EPS * lam_K[..., :1]
    s_K = torch.where(keep, lam_K, 0.0).sqrt()
    s_K_pinv = torch.where(keep, 1.0 / torch.where(keep, s_K, 1.0), 0.0)
    lam_Q, V_Q = _eigh_desc(G_Q)
    M = s_K.unsqueeze(-1) * (V_K.mT @ V_Q) * lam_Q.sqrt().unsqueeze(-2)
    U, S, _ = torch.linalg.svd(M)
    return lam_K, V_K, s_K, s_K_pinv, U, S


def k_svd(G_K: torch.Tensor, R: int) -> Projection:
    """Key projection from the keys alone: A = B = top-R right singular vectors of K.

    Args:
        G_K: (..., d, d) key Gram KᵀK.
        R: kept rank, 1 ≤ R ≤ d.

    Returns:
        :class:`Projection` with A = B (d × R, orthonormal columns), ``sigma`` the singular values of K and
        ``objective`` = ‖K − K A Aᵀ‖²_F.

    References:
        Chang et al., "Palu", ICLR 2025; Eckart, Young, Psychometrika 1936.
    """
    G_K = _gram("G_K", G_K)
    return _top_eigenvectors(G_K, _rank(R, G_K.shape[-1]))


def v_svd(G_V: torch.Tensor, R: int) -> Projection:
    """Value projection from the values alone: C = D = top-R right singular vectors of V (as :func:`k_svd`).

    Args:
        G_V: (..., d, d) value Gram VᵀV.
        R: kept rank, 1 ≤ R ≤ d.

    Returns:
        :class:`Projection` with A = C = B = D (d × R, orthonormal), ``objective`` = ‖V − V C Cᵀ‖²_F.
    """
    G_V = _gram("G_V", G_V)
    return _top_eigenvectors(G_V, _rank(R, G_V.shape[-1]))


def eigen(G_K: torch.Tensor, G_Q: torch.Tensor, R: int) -> Projection:
    """Eigen attention: A = B = top-R right singular vectors of the stacked [K; Q], i.e. of G_K + G_Q.

    Args:
        G_K: (..., d, d) key Gram KᵀK.
        G_Q: (..., d, d) query Gram QᵀQ; for a GQA group, Σ_i Q_iᵀQ_i over its query heads.
        R: kept rank, 1 ≤ R ≤ d.

    Returns:
        :class:`Projection` with A = B orthonormal, ``objective`` = ‖K − K A Aᵀ‖²_F + ‖Q − Q A Aᵀ‖²_F.

    References:
        Saxena et al., "Eigen attention", 2024; Zhang, Shen, "Zack", 2025.
    """
    G_K, G_Q = _pair(G_K, G_Q)
    return _top_eigenvectors(G_K + G_Q, _rank(R, G_K.shape[-1]))


def kq(G_K: torch.Tensor, G_Q: torch.Tensor, R: int) -> Projection:
    """Attention-optimal key projection: K A Bᵀ Qᵀ is the best rank-R approximation of K Qᵀ.

    With G_K = V_K Σ_K² V_Kᵀ, G_Q = V_Q Σ_Q² V_Qᵀ (so K = U_K Σ_K V_Kᵀ, Q = U_Q Σ_Q V_Qᵀ) and
    M = Σ_K V_Kᵀ V_Q Σ_Q = U Σ Vᵀ (d × d), K Qᵀ = U_K M U_Qᵀ has the singular values Σ, and
    A = V_K Σ_K⁺ U_{:R}, B = V_K Σ_K U_{:R} give K A Bᵀ = U_K U_{:R} U_{:R}ᵀ U_Kᵀ K, so
    K A Bᵀ Qᵀ = (U_K U_{:R}) Σ_{:R} V_{:R}ᵀ U_Qᵀ. At R = d, A Bᵀ = V_K Σ_K⁺ Σ_K V_Kᵀ is the orthogonal
    projector onto the row space of K (the identity when G_K is non-singular). Σ_K⁺ drops eigenvalues of
    G_K at or below d · eps · λ_max (see the module docstring).

    For a GQA group, pass G_Q = Σ_i Q_iᵀQ_i to minimise Σ_i ‖K A Bᵀ Q_iᵀ − K Q_iᵀ‖²_F (per head) or
    G_Q = (Σ_i Q_i)ᵀ(Σ_i Q_i) to minimise ‖Σ_i (K A Bᵀ Q_iᵀ − K Q_iᵀ)‖²_F (summed); one B is optimal for
    every head of the group in both cases (proof in the module docstring).

    Args:
        G_K: (..., d, d) key Gram KᵀK.
        G_Q: (..., d, d) query Gram (see above for GQA).
        R: kept rank, 1 ≤ R ≤ d.

    Returns:
        :class:`Projection` with A, B (d × R), ``sigma`` the top-d singular values of K Qᵀ and
        ``objective`` = ‖K A Bᵀ Qᵀ − K Qᵀ‖²_F = Σ_{i>R} σ_i².

    References:
        Lesens, Rakhshan, Rabusseau, 2025; Chen et al., "DRONE", NeurIPS 2021.
    """
    G_K, G_Q = _pair(G_K, G_Q)
    R = _rank(R, G_K.shape[-1])
    _, V_K, s_K, s_K_pinv, U, S = _core(G_K, G_Q)
    U_R = U[..., :R]
    A = V_K @ (s_K_pinv.unsqueeze(-1) * U_R)
    B = V_K @ (s_K.unsqueeze(-1) * U_R)
    return Projection(A=A, B=B, sigma=S, objective=S[..., R:].square().sum(-1))


def wo_aware(G_V: torch.Tensor, W_O_blocks: torch.Tensor, R: int) -> Projection:
    """Value projection minimising Σ_i ‖V C Dᵀ W_{O,i} − V W_{O,i}‖²_F over the query heads i of the group.

    This is :func:`kq` with K → V and Q → the stacked [W_{O,1} … W_{O,g}]ᵀ, i.e.
    G_Q = Σ_i W_{O,i} W_{O,i}ᵀ; one D serves every head (as B in :func:`kq`).

    Args:
        G_V: (..., d, d) value Gram VᵀV.
        W_O_blocks: (..., g, d, hidden): W_{O,i} = ``o_proj.weight[:, i*d:(i+1)*d].T``, the block of o_proj
            multiplying query head i's output; for a layer, ``o_proj.weight.T.reshape(H_kv, g, d, hidden)``
            pairs with ``G_V`` of shape (H_kv, d, d).
        R: kept rank, 1 ≤ R ≤ d.

    Returns:
        :class:`Projection` with A = C (cache side), B = D (output side), ``sigma`` the top-d singular values
        of V [W_{O,1} … W_{O,g}] and ``objective`` the minimised error.
    """
    G_V = _gram("G_V", G_V)
    W = _tensor("W_O_blocks", W_O_blocks).to(G_V.device)
    if W.ndim < 3 or W.shape[:-3] != G_V.shape[:-2] or W.shape[-2] != G_V.shape[-1] or W.numel() == 0:
        expected = f"{tuple(G_V.shape[:-2])} + (g, {G_V.shape[-1]}, hidden)"
        raise ValueError(f"W_O_blocks must have shape {expected} to match G_V; got {tuple(W.shape)}")
    return kq(G_V, (W @ W.mT).sum(-3), R)


def logit_error(G_K: torch.Tensor, G_Q: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """‖K (I − A Bᵀ) Qᵀ‖²_F = tr((I − A Bᵀ)ᵀ G_K (I − A Bᵀ) G_Q), from the Grams.

    For GQA per head, sum over the heads (or pass G_Q = Σ_i Q_iᵀQ_i); for the summed form pass
    G_Q = (Σ_i Q_i)ᵀ(Σ_i Q_i). For values pass (G_V, Σ_i W_{O,i} W_{O,i}ᵀ, C, D).

    Args:
        G_K: (..., d, d) key Gram KᵀK.
        G_Q: (..., d, d) query Gram QᵀQ.
        A, B: (..., d, R) projection pair (any R ≤ d; not necessarily optimal).

    Returns:
        (...) float64 squared Frobenius error of the logits.
    """
    G_K, G_Q = _pair(G_K, G_Q)
    d = G_K.shape[-1]
    A, B = (_tensor(name, X).to(G_K.device) for name, X in (("A", A), ("B", B)))
    for name, X in (("A", A), ("B", B)):
        if X.ndim < 2 or X.shape[-2] != d or not 1 <= X.shape[-1] <= d:
            raise ValueError(f"{name} must have shape (..., d={d}, R) with 1 <= R <= d; got {tuple(X.shape)}")
    if A.shape != B.shape:
        raise ValueError(f"A and B must have the same shape; got {tuple(A.shape)} and {tuple(B.shape)}")
    E = torch.eye(d, dtype=torch.float64, device=G_K.device) - A @ B.mT
    return ((E.mT @ G_K @ E) * G_Q).sum((-2, -1))


def logit_energy(G_K: torch.Tensor, G_Q: torch.Tensor) -> torch.Tensor:
    """‖K Qᵀ‖²_F = tr(G_K G_Q): the denominator of relative logit errors.

    Args:
        G_K, G_Q: (..., d, d) key and query Grams.

    Returns:
        (...) float64.
    """
    G_K, G_Q = _pair(G_K, G_Q)
    return (G_K * G_Q.mT).sum((-2, -1))


def epsilon_gap(G_K: torch.Tensor, G_Q: torch.Tensor, R: int) -> torch.Tensor:
    """How much worse :func:`k_svd` is than :func:`kq` on the logits, from the Grams.

    ε = ‖Σ_{:R}‖²_F − ‖Σ_{K,:R} V_{K,:R}ᵀ V_Q Σ_Q‖²_F, where Σ are the singular values of K Qᵀ (of M,
    see :func:`kq`) and the second term is Σ_{j≤R} λ_{K,j} v_jᵀ G_Q v_j over the top-R eigenpairs
    (λ_{K,j}, v_j) of G_K. Since K P Qᵀ and K (I − P) Qᵀ are orthogonal for P = V_{K,:R} V_{K,:R}ᵀ
    (P commutes with G_K), ε = logit_error(k_svd) − logit_error(kq) ≥ 0 (up to rounding).

    Args:
        G_K: (..., d, d) key Gram KᵀK.
        G_Q: (..., d, d) query Gram (see :func:`kq` for GQA).
        R: kept rank, 1 ≤ R ≤ d.

    Returns:
        (...) float64 gap ε.

    References:
        Lesens, Rakhshan, Rabusseau, 2025 (theorem "Comparing SVD methods").
    """
    G_K, G_Q = _pair(G_K, G_Q)
    R = _rank(R, G_K.shape[-1])
    lam_K, V_K, _, _, _, S = _core(G_K, G_Q)
    V_R = V_K[..., :R]
    kept = (lam_K[..., :R] * (V_R.mT @ G_Q @ V_R).diagonal(0, -2, -1)).sum(-1)
    return S[..., :R].square().sum(-1) - kept
