"""KV-cache projections from Grams: Eckart–Young optimality of the attention-optimal pair against brute-force
SVDs of the n × n logit matrices, the ordering kq ≤ eigen, k_svd, the GQA forms, the gap ε and exactness at
full rank."""

from __future__ import annotations

import pytest
import torch
from _linalg_helpers import orthonormal

from lowrank.linalg import (
    Projection,
    eigen,
    epsilon_gap,
    k_svd,
    kq,
    logit_energy,
    logit_error,
    v_svd,
    wo_aware,
)

pytestmark = pytest.mark.usefixtures("one_thread")

EPS = torch.finfo(torch.float64).eps
N, D = 200, 16
#: Gram-route rounding: every quantity is an n-term (Grams) then d-term sums of products bounded by
#: ‖K‖²‖Q‖², so errors of squared logit norms are at most c · (n + d) · eps · ‖K‖²_F ‖Q‖²_F.
ROUND = 64 * (N + D) * EPS


def _matrix(n: int, s: torch.Tensor, V: torch.Tensor, seed: int) -> torch.Tensor:
    """n × d matrix U diag(s) Vᵀ with random orthonormal U (n × len(s)) and given right vectors V."""
    return (orthonormal(n, s.numel(), seed) * s) @ V.mT


def _case(name: str, g: int = 1, n: int = N, d: int = D, seed: int = 0):
    """Keys K (n × d) and g query heads Q (g, n, d) with decaying spectra.

    generic: unrelated right singular vectors; adversarial: each query's strong directions are K's weak
    ones (k_svd throws away what the logits need); deficient: K of rank 10 < d.
    """
    decay = torch.exp(-0.3 * torch.arange(d, dtype=torch.float64))
    V_K = orthonormal(d, d, seed + 1)
    if name == "deficient":
        K = _matrix(n, 3 * decay[:10], V_K[:, :10], seed + 2)
    else:
        K = _matrix(n, 3 * decay, V_K, seed + 2)
    Q = []
    for i in range(g):
        rot = orthonormal(d, d, seed + 10 + i)
        V_Q = V_K.flip(-1) @ torch.linalg.matrix_exp(0.1 * (rot - rot.mT)) if name == "adversarial" else rot
        s_Q = decay.pow(2 if name == "adversarial" else 0.5)  # adversarial: Q decays faster than K
        Q.append(_matrix(n, 2 * s_Q, V_Q, seed + 20 + i))
    return K, torch.stack(Q)


def _best(T: torch.Tensor, R: int) -> torch.Tensor:
    """Eckart–Young: the squared Frobenius error of the best rank-R approximation of T."""
    return torch.linalg.svdvals(T)[R:].square().sum()


def _scale(K: torch.Tensor, Q: torch.Tensor) -> float:
    return float(K.square().sum() * Q.square().sum())


CASES = ["generic", "adversarial", "deficient"]


@pytest.mark.parametrize("case", CASES)
def test_kq_is_the_best_rank_R_approximation_of_the_logits(case):
    K, (Q,) = _case(case)
    G_K, G_Q = K.mT @ K, Q.mT @ Q
    T = K @ Q.mT  # n × n
    s = torch.linalg.svdvals(T)
    for R in range(1, D + 1):
        p = kq(G_K, G_Q, R)
        assert isinstance(p, Projection) and p.A.shape == p.B.shape == (D, R) and p.rank == R
        err = (K @ p.A @ p.B.mT @ Q.mT - T).square().sum()
        tol = ROUND * _scale(K, Q)
        assert abs(float(err - _best(T, R))) <= tol, (R, float(err), float(_best(T, R)))
        assert abs(float(p.objective - _best(T, R))) <= tol
    torch.testing.assert_close(p.sigma, s[:D], rtol=0, atol=ROUND * _scale(K, Q) ** 0.5 / float(s[0]))


@pytest.mark.parametrize("case", CASES)
def test_kq_beats_eigen_and_k_svd_at_every_rank(case):
    K, (Q,) = _case(case)
    G_K, G_Q = K.mT @ K, Q.mT @ Q
    tol = ROUND * _scale(K, Q)
    gaps = []
    for R in range(1, D + 1):
        e_kq, e_eig, e_svd = (
            logit_error(G_K, G_Q, p.A, p.B) for p in (kq(G_K, G_Q, R), eigen(G_K, G_Q, R), k_svd(G_K, R))
        )
        assert e_kq <= e_eig + tol and e_kq <= e_svd + tol, R
        gaps.append(float(min(e_eig, e_svd) - e_kq))
    # the spectra decay differently, so the attention-optimal pair is strictly better somewhere
    assert max(gaps) > 1e-3 * float(logit_energy(G_K, G_Q))


@pytest.mark.parametrize("case", CASES)
def test_orthogonal_methods_minimise_their_own_objectives(case):
    K, (Q,) = _case(case)
    G_K, G_Q = K.mT @ K, Q.mT @ Q
    for R in (1, 5, D):
        for p, X in ((k_svd(G_K, R), K), (eigen(G_K, G_Q, R), torch.cat([K, Q]))):
            assert torch.equal(p.A, p.B)
            torch.testing.assert_close(
                p.A.mT @ p.A, torch.eye(R, dtype=torch.float64), rtol=0, atol=16 * D * EPS
            )
            err = (X - X @ p.A @ p.A.mT).square().sum()
            tol = ROUND * float(X.square().sum())
            assert abs(float(err - _best(X, R))) <= tol and abs(float(p.objective - err)) <= tol


@pytest.mark.parametrize("case", CASES)
def test_gram_logit_error_equals_the_error_of_the_activations(case):
    K, (Q,) = _case(case)
    g = torch.Generator().manual_seed(3)
    A, B = (
        torch.randn(D, 6, generator=g, dtype=torch.float64),
        torch.randn(D, 6, generator=g, dtype=torch.float64),
    )
    E = torch.eye(D, dtype=torch.float64) - A @ B.mT
    direct = (K @ E @ Q.mT).square().sum()
    bound = ROUND * _scale(K, Q) * float(torch.linalg.matrix_norm(E, 2)) ** 2
    assert abs(float(logit_error(K.mT @ K, Q.mT @ Q, A, B) - direct)) <= bound
    assert abs(float(logit_energy(K.mT @ K, Q.mT @ Q) - (K @ Q.mT).square().sum())) <= ROUND * _scale(K, Q)


@pytest.mark.parametrize("case", CASES)
def test_epsilon_gap_is_the_excess_error_of_k_svd(case):
    K, (Q,) = _case(case)
    G_K, G_Q = K.mT @ K, Q.mT @ Q
    tol = ROUND * _scale(K, Q)
    for R in range(1, D + 1):
        p_svd, p_kq = k_svd(G_K, R), kq(G_K, G_Q, R)
        measured = (K @ p_svd.A @ p_svd.B.mT @ Q.mT - K @ Q.mT).square().sum() - _best(K @ Q.mT, R)
        eps_R = epsilon_gap(G_K, G_Q, R)
        assert eps_R >= -tol and abs(float(eps_R - measured)) <= tol, R
        gram = logit_error(G_K, G_Q, p_svd.A, p_svd.B) - logit_error(G_K, G_Q, p_kq.A, p_kq.B)
        assert abs(float(eps_R - gram)) <= tol
    if case == "adversarial":  # k_svd keeps K's strong directions, which the queries barely read
        assert epsilon_gap(G_K, G_Q, 4) > 0.1 * logit_energy(G_K, G_Q)


@pytest.mark.parametrize("case", CASES)
def test_full_rank_reproduces_the_keys_exactly(case):
    K, (Q,) = _case(case)
    p = kq(K.mT @ K, Q.mT @ Q, D)
    P = p.A @ p.B.mT
    # A Bᵀ is the orthogonal projector onto the row space of K (the identity when K has full column rank)
    Vr = torch.linalg.svd(K, full_matrices=False).Vh[: torch.linalg.matrix_rank(K)].mT
    kappa = float(torch.linalg.cond(K @ Vr))  # Σ_K⁺ amplifies rounding of the eigenvectors by at most κ
    torch.testing.assert_close(P, Vr @ Vr.mT, rtol=0, atol=64 * D * EPS * kappa)
    assert float((K @ P - K).norm()) <= 64 * D * EPS * float(K.norm())
    assert float(p.objective) <= ROUND * _scale(K, Q)


@pytest.mark.parametrize("case", CASES)
def test_one_decoder_serves_every_query(case):
    """K A Bᵀ = (K A)(K A)⁺ K: B is the least-squares decoder of the cache K A whatever the query, so
    giving each head of a group its own B_i cannot help."""
    K, Q = _case(case, g=3)
    G_Q = (Q.mT @ Q).sum(0)
    for R in (2, 7):
        p = kq(K.mT @ K, G_Q, R)
        KA = K @ p.A
        torch.testing.assert_close(
            KA @ p.B.mT, KA @ torch.linalg.pinv(KA) @ K, rtol=0, atol=1e-10 * float(K.norm())
        )


@pytest.mark.parametrize("case", CASES)
def test_gqa_per_head_and_summed_objectives_match_brute_force(case):
    g = 4
    K, Q = _case(case, g=g)
    G_K = K.mT @ K
    per_head_target = K @ torch.cat(list(Q), 0).mT  # K [Q_1ᵀ … Q_gᵀ]: n × g·n
    summed_target = K @ Q.sum(0).mT
    tol = ROUND * _scale(K, Q)
    Qs = Q.sum(0)
    advantage = []
    for R in (1, 3, 8, 12):
        per = kq(G_K, (Q.mT @ Q).sum(0), R)
        err = sum((K @ per.A @ per.B.mT @ Qi.mT - K @ Qi.mT).square().sum() for Qi in Q)
        assert abs(float(err - _best(per_head_target, R))) <= tol
        summed = kq(G_K, Qs.mT @ Qs, R)
        err = sum(K @ summed.A @ summed.B.mT @ Qi.mT - K @ Qi.mT for Qi in Q).square().sum()
        assert abs(float(err - _best(summed_target, R))) <= g * tol  # ‖Σ_i Q_i‖² ≤ g Σ_i ‖Q_i‖²
        per_on_summed = sum(K @ per.A @ per.B.mT @ Qi.mT - K @ Qi.mT for Qi in Q).square().sum()
        advantage.append(float(per_on_summed - err))
    # the objectives differ: the per-head solution is not optimal for the summed one
    assert min(advantage) >= -g * tol and max(advantage) > 1e-3 * float(summed_target.square().sum())


@pytest.mark.parametrize("case", CASES)
def test_wo_aware_values_match_brute_force_and_beat_v_svd(case):
    g, hidden = 2, 40
    V, _ = _case(case, seed=5)
    gen = torch.Generator().manual_seed(7)
    # o_proj with uneven column scales, so that the output weighting matters
    W_O = torch.randn(hidden, g * D, generator=gen, dtype=torch.float64) * torch.logspace(
        0, -2, g * D, dtype=torch.float64
    )
    blocks = W_O.mT.reshape(g, D, hidden)  # blocks[i] = W_O[:, i*d:(i+1)*d].T
    G_V = V.mT @ V
    target = V @ torch.cat(list(blocks), 1)  # V [W_{O,1} … W_{O,g}]
    scale = float(V.square().sum() * blocks.square().sum())
    better = []
    for R in range(1, D + 1):
        p, base = wo_aware(G_V, blocks, R), v_svd(G_V, R)
        err = sum((V @ p.A @ p.B.mT @ W - V @ W).square().sum() for W in blocks)
        err_base = sum((V @ base.A @ base.B.mT @ W - V @ W).square().sum() for W in blocks)
        assert (
            abs(float(err - _best(target, R))) <= ROUND * scale
            and abs(float(p.objective - err)) <= ROUND * scale
        )
        assert err <= err_base + ROUND * scale
        better.append(float(err_base - err))
    assert max(better) > 1e-3 * float(target.square().sum())


def test_batched_heads_equal_one_head_at_a_time():
    Ks, Qs = zip(*(_case(c, seed=i) for i, c in enumerate(CASES)), strict=True)
    G_K = torch.stack([K.mT @ K for K in Ks])
    G_Q = torch.stack([Q[0].mT @ Q[0] for Q in Qs])
    W = torch.randn(3, 2, D, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for method in (
        lambda K, Q, w: kq(K, Q, 5),
        lambda K, Q, w: eigen(K, Q, 5),
        lambda K, Q, w: k_svd(K, 5),
        lambda K, Q, w: wo_aware(K, w, 5),
    ):
        batched = method(G_K, G_Q, W)
        for h in range(3):
            single = method(G_K[h], G_Q[h], W[h])
            torch.testing.assert_close(batched.A[h] @ batched.B[h].mT, single.A @ single.B.mT)
            torch.testing.assert_close(batched.objective[h], single.objective)
    errors = logit_error(G_K, G_Q, kq(G_K, G_Q, 5).A, kq(G_K, G_Q, 5).B)
    assert errors.shape == (3,) and epsilon_gap(G_K, G_Q, 5).shape == (3,)


def test_zero_keys_give_a_zero_projection():
    G_Q = torch.eye(D, dtype=torch.float64)
    p = kq(torch.zeros(D, D, dtype=torch.float64), G_Q, 3)
    assert torch.all(p.A == 0) and torch.all(p.B == 0) and p.objective == 0


G = torch.eye(4, dtype=torch.float64)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda: kq(torch.ones(4, 3, dtype=torch.float64), torch.ones(4, 3, dtype=torch.float64), 2),
            r"G_K .*\(4, 3\)",
        ),
        (lambda: kq(G, torch.eye(5, dtype=torch.float64), 2), r"same shape; got \(4, 4\) and \(5, 5\)"),
        (lambda: kq(G, G, 0), r"R=0"),
        (lambda: k_svd(G, 5), r"R=5"),
        (lambda: eigen(G, G, 2.0), r"R=2.0"),
        (lambda: kq(G * float("nan"), G, 2), r"G_K has 16 non-finite"),
        (lambda: v_svd(torch.eye(4, dtype=torch.int64), 2), r"G_V must be a floating"),
        (
            lambda: wo_aware(G, torch.ones(3, 4, 8, dtype=torch.float64)[:, :3], 2),
            r"W_O_blocks .*\(3, 3, 8\)",
        ),
        (lambda: logit_error(G, G, torch.ones(4, 2), torch.ones(4, 3)), r"A and B .*\(4, 2\) and \(4, 3\)"),
        (lambda: logit_error(G, G, torch.ones(3, 2), torch.ones(3, 2)), r"A must have shape .*\(3, 2\)"),
    ],
)
def test_bad_input_is_a_one_line_value_error(call, message):
    with pytest.raises(ValueError, match=message) as info:
        call()
    assert "\n" not in str(info.value)
