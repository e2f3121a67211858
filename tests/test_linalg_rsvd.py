"""Properties of randomized_svd: orthonormality, exactness on low-rank input, Eckart–Young, determinism."""

from __future__ import annotations

import pytest
import torch
from _linalg_helpers import decaying, low_rank, optimal_error, orth_defect, rel_error

from lowrank.linalg import fallback_counts, randomized_svd

EPS32 = torch.finfo(torch.float32).eps
ORTHS = ["cholesky", "householder"]


@pytest.mark.parametrize("orth", ORTHS)
@pytest.mark.parametrize("shape", [(120, 80), (80, 120), (64, 64)])
@pytest.mark.parametrize("q", [0, 1, 2])
def test_orthonormal_and_descending(shape, q, orth):
    A = decaying(*shape, seed=1)
    U, S, Vh = randomized_svd(A, 16, power_iters=q, orth=orth)
    assert U.shape == (shape[0], 16) and S.shape == (16,) and Vh.shape == (16, shape[1])
    assert orth_defect(U) < 50 * EPS32
    assert orth_defect(Vh.mT) < 50 * EPS32
    assert bool((S[:-1] >= S[1:]).all())


@pytest.mark.parametrize("orth", ORTHS)
@pytest.mark.parametrize("shape", [(100, 70), (70, 100)])
def test_exact_on_low_rank(shape, orth):
    A, s = low_rank(*shape, r=12, seed=2)
    U, S, Vh = randomized_svd(A, 12, oversample=5, power_iters=1, orth=orth)
    torch.testing.assert_close(S.double(), s, rtol=1e-5, atol=1e-5)
    assert rel_error(A, U, S, Vh) < 1e-5


@pytest.mark.parametrize("orth", ORTHS)
def test_low_rank_with_oversampling_beyond_true_rank_stays_orthonormal(orth):
    A, s = low_rank(90, 60, r=5, seed=3)
    before = fallback_counts().get("small_svd", 0)
    U, S, Vh = randomized_svd(A, 8, oversample=10, power_iters=2, orth=orth)
    # σ₆..σ₈ vanish: the Gram route cannot resolve them, the float64 SVD of B must take over (counted)
    assert fallback_counts().get("small_svd", 0) == before + 1
    torch.testing.assert_close(S[:5].double(), s, rtol=1e-5, atol=1e-5)
    assert float(S[5:].abs().max()) < 1e-4
    assert orth_defect(U) < 1e-4 and orth_defect(Vh.mT) < 1e-4


@pytest.mark.parametrize("orth", ORTHS)
@pytest.mark.parametrize("q", [2, 3])
def test_within_eckart_young_on_decaying_spectrum(q, orth):
    A = decaying(200, 150, seed=4, rate=0.05)
    best = optimal_error(A, 20)
    err = rel_error(A, *randomized_svd(A, 20, oversample=10, power_iters=q, orth=orth))
    assert best <= err * (1 + 1e-6)
    assert err <= best * 1.01  # (1 + ε) with ε = 1 %: HMT bound for q >= 2 on this spectrum


def test_more_power_iterations_do_not_hurt():
    A = torch.randn(200, 200, generator=torch.Generator().manual_seed(5))
    errs = [rel_error(A, *randomized_svd(A, 20, power_iters=q)) for q in (0, 2, 4)]
    assert errs[0] > errs[1] > errs[2] >= optimal_error(A, 20)


@pytest.mark.parametrize("orth", ORTHS)
def test_batched_equals_per_matrix(orth):
    A = torch.stack([decaying(60, 40, seed=s) for s in range(3)]).reshape(3, 1, 60, 40).expand(3, 2, 60, 40)
    U, S, Vh = randomized_svd(A, 8, orth=orth)
    assert U.shape == (3, 2, 60, 8) and S.shape == (3, 2, 8) and Vh.shape == (3, 2, 8, 40)
    for i in range(3):
        Ui, Si, Vhi = randomized_svd(A[i, 0], 8, orth=orth)
        torch.testing.assert_close(S[i, 1], Si, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close((U[i, 1] * S[i, 1]) @ Vh[i, 1], (Ui * Si) @ Vhi, rtol=1e-4, atol=1e-5)


def test_same_generator_same_result_and_seed_matters():
    A = torch.randn(80, 60, generator=torch.Generator().manual_seed(6))
    r1 = randomized_svd(A, 10, power_iters=0, generator=torch.Generator().manual_seed(7))
    r2 = randomized_svd(A, 10, power_iters=0, generator=torch.Generator().manual_seed(7))
    r3 = randomized_svd(A, 10, power_iters=0, generator=torch.Generator().manual_seed(8))
    for a, b in zip(r1, r2, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(r1[1], r3[1])
    assert torch.equal(randomized_svd(A, 10, seed=3)[1], randomized_svd(A, 10, seed=3)[1])


def test_global_rng_untouched():
    state = torch.get_rng_state()
    randomized_svd(torch.randn(30, 20, generator=torch.Generator().manual_seed(0)), 4)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("orth", ORTHS)
def test_float64_is_accurate_to_float64(orth):
    A, s = low_rank(60, 50, r=6, seed=8, dtype=torch.float64)
    U, S, Vh = randomized_svd(A, 6, oversample=0, orth=orth)
    assert S.dtype == torch.float64
    torch.testing.assert_close(S, s, rtol=1e-12, atol=1e-12)
    assert orth_defect(U) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_computed_in_float32(dtype):
    A = decaying(64, 48, seed=9).to(dtype)
    U, S, Vh = randomized_svd(A, 8)
    assert U.dtype == S.dtype == Vh.dtype == dtype
    ref = randomized_svd(A.float(), 8)
    # same float32 computation, only the final rounding to ``dtype`` differs
    torch.testing.assert_close(S, ref[1].to(dtype))
    assert rel_error(A, U, S, Vh) <= optimal_error(A, 8) * 1.01 + 4 * torch.finfo(dtype).eps


def test_full_rank_clamps_oversampling_and_reproduces_input():
    A = torch.randn(30, 20, generator=torch.Generator().manual_seed(10))
    U, S, Vh = randomized_svd(A, 20, oversample=10)
    assert rel_error(A, U, S, Vh) < 1e-5


def test_auto_orth_and_bad_orth():
    A = decaying(50, 40, seed=11)
    auto = randomized_svd(A, 5)  # CPU: Householder
    assert torch.equal(auto[1], randomized_svd(A, 5, orth="householder")[1])
    with pytest.raises(ValueError, match="'gram'"):
        randomized_svd(A, 5, orth="gram")


def test_cholesky_failure_falls_back_to_householder():
    A = torch.zeros(30, 20)
    A[0, 0], A[1, 1] = 2.0, 1.0  # the sketch Y has exactly two nonzero rows: its Gram matrix is singular
    before = fallback_counts().get("householder_qr", 0)
    U, S, Vh = randomized_svd(A, 2, oversample=5, orth="cholesky")
    assert fallback_counts().get("householder_qr", 0) == before + 1
    torch.testing.assert_close(S, torch.tensor([2.0, 1.0]))
    assert orth_defect(U) < 1e-6 and rel_error(A, U, S, Vh) < 1e-6
