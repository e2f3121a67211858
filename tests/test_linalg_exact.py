"""Exact truncated SVD: Gram + float64 eigh route agrees with LAPACK, falls back where it must; every SVD
routine refuses float16 results out of range."""

from __future__ import annotations

import pytest
import torch
from _linalg_helpers import decaying, low_rank, optimal_error, orth_defect, rel_error, with_spectrum

from lowrank import linalg
from lowrank.linalg import fallback_counts, truncated_svd

EPS32 = torch.finfo(torch.float32).eps


@pytest.mark.parametrize("shape", [(90, 60), (60, 90)])
def test_gram_route_matches_lapack_on_smallest_retained(shape):
    A = decaying(*shape, seed=0, rate=0.05)
    ref = torch.linalg.svdvals(A.double())[:30]
    U, S, Vh = truncated_svd(A, 30, method="gram")
    # σ₁/σ₃₀ = e^1.45 ≈ 4: the Gram route is accurate to float32 precision on every retained σ
    torch.testing.assert_close(S.double(), ref, rtol=8 * EPS32, atol=0)
    assert orth_defect(U) < 20 * EPS32 and orth_defect(Vh.mT) < 20 * EPS32
    assert rel_error(A, U, S, Vh) == pytest.approx(optimal_error(A, 30), rel=1e-5)


def test_ill_conditioned_truncation_falls_back_to_svd():
    s = torch.logspace(0, -6, 40, dtype=torch.float64)  # σ₁/σ₄₀ = 1e6: Gram route would lose σ₄₀
    A = with_spectrum(80, 60, s, seed=1)
    before = fallback_counts().get("exact_svd", 0)
    U, S, Vh = truncated_svd(A, 40)
    assert fallback_counts().get("exact_svd", 0) == before + 1
    ref = torch.linalg.svdvals(A)[:40]
    torch.testing.assert_close(S, ref)


@pytest.mark.parametrize("method", ["auto", "gram", "svd"])
def test_low_rank_exact_and_batched(method):
    A = torch.stack([low_rank(50, 40, 7, seed=s)[0] for s in range(3)])
    U, S, Vh = truncated_svd(A, 7, method=method)
    assert U.shape == (3, 50, 7) and S.shape == (3, 7) and Vh.shape == (3, 7, 40)
    for i in range(3):
        torch.testing.assert_close(S[i].double(), low_rank(50, 40, 7, seed=i)[1], rtol=1e-5, atol=1e-5)
        assert rel_error(A[i], U[i], S[i], Vh[i]) < 1e-5


def test_float64_and_half():
    A = decaying(40, 30, seed=2, dtype=torch.float64)
    U, S, Vh = truncated_svd(A, 5)
    assert S.dtype == torch.float64
    torch.testing.assert_close(S, torch.linalg.svdvals(A)[:5], rtol=1e-12, atol=0)
    Uh, Sh, Vhh = truncated_svd(A.half(), 5)
    assert Sh.dtype == torch.float16
    torch.testing.assert_close(Sh.float(), S.float(), rtol=2e-3, atol=1e-3)


@pytest.mark.parametrize(
    "routine", ["truncated_svd", "randomized_svd", "block_krylov_svd", "rank_by_tolerance"]
)
def test_half_precision_overflowing_singular_values_are_refused(routine):
    A = torch.full((64, 48), 2000.0, dtype=torch.float16)  # σ₁ = 2000·√(64·48) ≈ 1.1e5 > 65504
    A[0, 0] = 1000.0
    fn = getattr(linalg, routine)
    args = (A, 0.5) if routine == "rank_by_tolerance" else (A, 4)
    with pytest.raises(
        ValueError, match=r"singular values up to 1.1\d*e\+05 exceed the float16 range"
    ) as info:
        fn(*args)
    assert "\n" not in str(info.value)
    U, S, Vh = fn(A.to(torch.bfloat16), *args[1:])  # bfloat16 holds it
    assert torch.isfinite(S).all() and S.dtype == torch.bfloat16
    U, S, Vh = fn(A / 4, *args[1:])  # in range: unchanged behaviour
    assert torch.isfinite(S).all() and S.dtype == torch.float16


def test_bad_method():
    with pytest.raises(ValueError, match="'qr'"):
        truncated_svd(torch.eye(3), 1, method="qr")
