"""Block Krylov (accuracy option) and rank by tolerance."""

from __future__ import annotations

import pytest
import torch
from _linalg_helpers import decaying, low_rank, optimal_error, orth_defect, rel_error

from lowrank.linalg import block_krylov_svd, get_decomposer, randomized_svd, rank_by_tolerance
from lowrank.linalg.adaptive import adaptive_basis
from lowrank.linalg.rsvd import make_generator

EPS32 = torch.finfo(torch.float32).eps


def test_krylov_orthonormal_exact_on_low_rank_and_batched():
    A, s = low_rank(120, 90, r=10, seed=0)
    U, S, Vh = block_krylov_svd(A, 10)
    torch.testing.assert_close(S.double(), s, rtol=1e-5, atol=1e-5)
    assert orth_defect(U) < 1e-4 and orth_defect(Vh.mT) < 1e-4
    B = torch.stack([decaying(80, 60, seed=i) for i in range(3)])
    Ub, Sb, Vhb = block_krylov_svd(B, 8)
    for i in range(3):
        Ui, Si, Vhi = block_krylov_svd(B[i], 8)
        torch.testing.assert_close(Sb[i], Si, rtol=1e-5, atol=1e-6)


def test_krylov_beats_power_iteration_with_same_products():
    # slowly decaying spectrum: depth-7 Krylov on blocks of (r+p)/3 uses about as many products with A as
    # rsvd (10, 6) and must land closer to the optimum
    A = decaying(400, 300, seed=1, rate=0.01)
    r = 30
    best = optimal_error(A, r)
    gap_krylov = rel_error(A, *block_krylov_svd(A, r)) - best
    gap_rsvd = rel_error(A, *randomized_svd(A, r, power_iters=6)) - best
    assert 0 <= gap_krylov < 0.5 * gap_rsvd


def test_krylov_decomposer_and_bad_depth():
    A = decaying(60, 50, seed=2)
    U, S, Vh = get_decomposer("krylov", krylov_depth=3)(A, 5)
    assert S.shape == (5,) and rel_error(A, U, S, Vh) <= optimal_error(A, 5) * 1.01
    with pytest.raises(ValueError, match="depth.*-1"):
        block_krylov_svd(A, 5, depth=-1)
    with pytest.raises(ValueError, match="krylov_depth.*-1"):
        get_decomposer("krylov", krylov_depth=-1)


@pytest.mark.parametrize("tol", [0.3, 0.1, 0.03])
def test_tolerance_gives_smallest_rank_meeting_it(tol):
    A = decaying(200, 150, seed=3, rate=0.03)
    U, S, Vh = rank_by_tolerance(A, tol, power_iters=2)
    r = S.shape[-1]
    assert rel_error(A, U, S, Vh) <= tol * 1.01
    # the optimal rank for this tolerance, allowing one extra for the randomized approximation
    r_opt = next(k for k in range(1, 151) if optimal_error(A, k) <= tol)
    assert r_opt <= r <= r_opt + 2


def test_tolerance_stops_early_and_estimate_is_the_true_error():
    A = decaying(300, 200, seed=4, rate=0.05)
    X = A.float()
    basis = adaptive_basis(X, 0.2, 200, 8, 2, make_generator("cpu", 0))
    assert basis.Q.shape[-1] < 80  # rank ≈ 33 needed: far fewer than max_cols columns were drawn
    true = torch.linalg.matrix_norm((A - basis.Q @ basis.B).double()).square()
    torch.testing.assert_close(basis.err2, true, rtol=1e-3, atol=1e-6)
    assert float(basis.err2 / basis.norm2) <= 0.2**2


def test_tolerance_unreachable_returns_max_rank_and_warns(caplog):
    A = torch.randn(60, 50, generator=torch.Generator().manual_seed(5))
    with caplog.at_level("WARNING"):
        U, S, Vh = rank_by_tolerance(A, 0.01, max_rank=10)
    assert S.shape == (10,) and "not reached" in caplog.text


def test_adaptive_decomposer_and_bad_tol():
    A = decaying(80, 70, seed=6, rate=0.1)
    U, S, Vh = get_decomposer("adaptive", tol=0.2)(A, 70)
    assert rel_error(A, U, S, Vh) <= 0.2 * 1.01 and S.shape[-1] < 70
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="tol"):
            rank_by_tolerance(A, bad)
