"""The three routes to min ‖(W − W')X‖_F: exact losses, agreement, and where they part."""

from __future__ import annotations

import pytest
import torch

from lowrank.linalg.whitening import (
    output_loss,
    truncate_projection,
    truncate_whitened,
    whiten,
    whitened_spectrum,
)

pytestmark = pytest.mark.usefixtures("one_thread")


ROUTES = {
    "cholesky": ("cholesky", truncate_whitened),
    "eigh": ("eigh", truncate_whitened),
    "projection": ("sqrt", truncate_projection),
}


def _data(m=40, n=48, T=400, log10_cond=4.0, seed=0):
    """W (m × n) and X (T × n) whose Gram XᵀX has condition number exactly 10**log10_cond."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    k = min(T, n)
    P, _ = torch.linalg.qr(torch.randn(T, k, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -log10_cond / 2, k, dtype=torch.float64)
    return W, (P * s) @ Q[:, :k].T


def _optimum(W, X, r):
    """Eckart–Young on W Xᵀ: the smallest possible ‖(W − W')X‖²_F over rank-r W'."""
    return float(torch.linalg.svdvals(W @ X.T)[r:].square().sum())


def _truncate(route, W, G, r, **kw):
    method, fn = ROUTES[route]
    return fn(W, whiten(G, method), r, **kw)


@pytest.mark.parametrize("route", ROUTES)
def test_loss_is_sum_of_discarded_whitened_sigma2_and_reaches_the_optimum(route):
    W, X = _data()
    G, r = X.T @ X, 12
    tr = _truncate(route, W, G, r)
    sigma2, total = whitened_spectrum(W, whiten(G))
    actual = output_loss(W, tr.B @ tr.A, G)
    discarded = float(sigma2[r:].sum())
    assert tr.loss == pytest.approx(discarded, rel=1e-9)
    assert actual == pytest.approx(discarded, rel=1e-9)
    assert actual == pytest.approx(_optimum(W, X, r), rel=1e-9)
    assert total == pytest.approx(float((W @ X.T).square().sum()), rel=1e-12)
    # the plain SVD of W (data-blind) is strictly worse on these activations
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    assert output_loss(W, (U[:, :r] * S[:r]) @ Vh[:r], G) > 1.05 * actual


def test_routes_agree_on_well_conditioned_data():
    W, X = _data(log10_cond=4.0)
    G = X.T @ X
    approx = {route: (lambda t: t.B @ t.A)(_truncate(route, W, G, 10)) for route in ROUTES}
    for route in ("eigh", "projection"):
        torch.testing.assert_close(
            approx[route], approx["cholesky"], rtol=0, atol=1e-9 * float(W.abs().max())
        )


def test_rank_deficient_gram_falls_back_and_routes_part_off_the_data_span():
    W, X = _data(T=30)  # 30 tokens for 48 features: G has rank 30, not positive definite
    G, r = X.T @ X, 10
    wh = whiten(G, "cholesky")
    assert wh.fallback and wh.kind == "eigh" and wh.rank == 30
    assert not whiten(G, "sqrt").fallback  # a route without inverse needs no fallback
    best = _optimum(W, X, r)
    outs = {route: _truncate(route, W, G, r) for route in ROUTES}
    for tr in outs.values():  # same calibration loss: the data cannot tell the routes apart
        assert output_loss(W, tr.B @ tr.A, G) == pytest.approx(best, rel=1e-8)
    # but on directions the calibration never visited, the pseudo-inverse routes drop W entirely
    # while the projection route keeps W's action there
    N = torch.linalg.svd(X, full_matrices=True).Vh[30:].T  # (n, 18) null space of X
    pinv_null = (outs["cholesky"].B @ outs["cholesky"].A @ N).norm()
    proj_null = (outs["projection"].B @ outs["projection"].A @ N).norm()
    assert pinv_null < 1e-8 * (W @ N).norm()
    assert proj_null > 0.1 * (W @ N).norm()


def test_float32_decomposition_stays_close_to_float64():
    W, X = _data(log10_cond=8.0)
    G = X.T @ X
    best = _optimum(W, X, 12)
    for route in ROUTES:
        tr = _truncate(route, W, G, 12, dtype=torch.float32)
        # float32 SVD of a well-scaled matrix: relative excess loss at the 1e-5 level at most
        assert output_loss(W, tr.B @ tr.A, G) == pytest.approx(best, rel=1e-5)


def test_partial_spectrum_with_a_decomposer_gives_exact_losses():
    W, X = _data()
    G = X.T @ X
    full, total = whitened_spectrum(W, whiten(G))

    def top(A, k):
        U, S, Vh = torch.linalg.svd(A, full_matrices=False)
        return U[:, :k], S[:k], Vh[:k]

    part, total2 = whitened_spectrum(W, whiten(G), 15, decompose=top)
    assert part.numel() == 15 and total2 == pytest.approx(total)
    assert total2 - float(part[:15].sum()) == pytest.approx(float(full[15:].sum()), rel=1e-9)


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(ValueError, match="square"):
        whiten(torch.ones(3, 4))
    with pytest.raises(ValueError, match="non-finite"):
        whiten(torch.full((3, 3), float("nan")))
    with pytest.raises(ValueError, match="'qr'"):
        whiten(torch.eye(3), "qr")
