"""The speed targets of the SVD engine, each a ratio measured side by side in one run.

Shapes are those of the targets (4096×11008, 4096², a batch of 30) divided by ``scale`` (4 on CPU).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from benchmarks._timing import make_matrix, rel_error, timed

__all__ = ["measure_targets"]

logger = logging.getLogger(__name__)


def _lowrank_torch(A, r, p=10, q=2):
    torch.manual_seed(0)
    U, S, V = torch.svd_lowrank(A, q=r + p, niter=q)
    return U[..., :r], S[..., :r], V.mT[..., :r, :]


def _svd(A, r):
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    return U[..., :r], S[..., :r], Vh[..., :r, :]


def from_table(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Ratios vs ``torch.svd_lowrank`` and ``torch.linalg.svd`` read off the table (same inputs, same run)."""
    out: dict[str, Any] = {"vs_svd_lowrank": [], "vs_linalg_svd": []}
    index = {(r["family"], r["matrix"], r["kind"]): r for r in rows}
    for (family, matrix, kind), row in index.items():
        if not kind.startswith("lowrank-"):
            continue
        ref = index.get((family, matrix, kind.replace("lowrank-", "torch-")))
        if ref is not None:
            out["vs_svd_lowrank"].append(
                {
                    "family": family,
                    "matrix": matrix,
                    "rank": row["rank"],
                    "config": kind[8:],
                    "speedup": ref["time_s"] / row["time_s"],
                    "time_s": row["time_s"],
                    "torch_time_s": ref["time_s"],
                    "rel_error": row["rel_error"],
                    "torch_rel_error": ref["rel_error"],
                    "error_rel_diff": row["rel_error"] / ref["rel_error"] - 1,
                }
            )
        svd = index[(family, matrix, "svd")]
        out["vs_linalg_svd"].append(
            {"family": family, "matrix": matrix, "config": kind[8:], "speedup": svd["time_s"] / row["time_s"]}
        )
    return out


def wide_vs_torch(device, scale, repeats) -> list[dict[str, Any]]:
    """4096×11008 (÷scale) at ranks 25 %, 37.5 %, 50 % of 4096: this engine vs torch.svd_lowrank, (10, 2)."""
    from lowrank.linalg import randomized_svd

    m, n = 4096 // scale, 11008 // scale
    A = make_matrix("gaussian", m, n, device, seed=1)
    out = []
    for frac in (0.25, 0.375, 0.5):
        r = int(frac * m)
        t_ours, res = timed(lambda r=r: randomized_svd(A, r), device, repeats)
        t_torch, ref = timed(lambda r=r: _lowrank_torch(A, r), device, repeats)
        e_ours, e_torch = rel_error(A, *res), rel_error(A, *ref)
        out.append(
            {
                "shape": [m, n],
                "rank": r,
                "fraction": frac,
                "time_s": t_ours,
                "torch_time_s": t_torch,
                "speedup": t_torch / t_ours,
                "rel_error": e_ours,
                "torch_rel_error": e_torch,
                "error_rel_diff": e_ours / e_torch - 1,
            }
        )
    return out


def exact_route(device, scale, repeats) -> list[dict[str, Any]]:
    """Gram+eigh exact route vs torch.linalg.svd: time, truncation error, smallest retained σ."""
    from lowrank.linalg import fallback_counts, truncated_svd

    out = []
    for m, n in ((4096 // scale, 4096 // scale), (4096 // scale, 11008 // scale)):
        for family in ("gaussian", "decaying"):
            A = make_matrix(family, m, n, device, seed=2)
            r = m // 4
            before = fallback_counts().get("exact_svd", 0)
            t_ours, res = timed(lambda A=A, r=r: truncated_svd(A, r), device, repeats)
            t_svd, ref = timed(lambda A=A, r=r: _svd(A, r), device, repeats)
            s_ours, s_ref = res[1][-1].double(), ref[1][-1].double()
            out.append(
                {
                    "shape": [m, n],
                    "family": family,
                    "rank": r,
                    "time_s": t_ours,
                    "svd_time_s": t_svd,
                    "speedup": t_svd / t_ours,
                    "rel_error": rel_error(A, *res),
                    "svd_rel_error": rel_error(A, *ref),
                    "sigma_r_rel_diff": float((s_ours - s_ref).abs() / s_ref),
                    "fell_back_to_svd": fallback_counts().get("exact_svd", 0) > before,
                }
            )
    return out


def auto_crossover(device, scale, repeats) -> dict[str, Any]:
    """Exact vs randomized (10, 2) vs auto over rank fractions of a 4096² matrix (÷scale)."""
    from lowrank.linalg import get_decomposer
    from lowrank.linalg.decomposer import AUTO_RANK_FRACTION

    m = 4096 // scale
    A = make_matrix("decaying", m, m, device, seed=3)
    exact, rsvd, auto = get_decomposer("svd"), get_decomposer("rsvd"), get_decomposer("auto")
    rows = []
    for frac in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8):
        r = int(frac * m)
        t_e, _ = timed(lambda r=r: exact(A, r), device, repeats)
        t_r, _ = timed(lambda r=r: rsvd(A, r), device, repeats)
        t_a, _ = timed(lambda r=r: auto(A, r), device, repeats)
        rows.append(
            {
                "fraction": frac,
                "rank": r,
                "exact_s": t_e,
                "rsvd_s": t_r,
                "auto_s": t_a,
                "auto_vs_best": t_a / min(t_e, t_r),
            }
        )
    cross = next((row["fraction"] for row in rows if row["exact_s"] <= row["rsvd_s"]), None)
    return {
        "shape": [m, m],
        "rows": rows,
        "crossover_fraction": cross,
        "auto_rank_fraction": AUTO_RANK_FRACTION[torch.device(device).type],
        "worst_auto_vs_best": max(row["auto_vs_best"] for row in rows),
    }


def batched(device, scale, repeats) -> list[dict[str, Any]]:
    """30 same-shape matrices in one call vs a loop of 30 calls."""
    from lowrank.linalg import randomized_svd, truncated_svd

    out = []
    for m, n, r in ((1536, 576, 72), (2048 // scale, 2048 // scale, 256 // scale)):
        A = torch.stack([make_matrix("decaying", m, n, device, seed=s) for s in range(30)])
        for name, fn in (("rsvd", randomized_svd), ("exact", truncated_svd)):
            t_b, _ = timed(lambda fn=fn, A=A, r=r: fn(A, r), device, repeats)
            t_l, _ = timed(lambda fn=fn, A=A, r=r: [fn(a, r) for a in A], device, repeats)
            out.append(
                {
                    "method": name,
                    "batch": 30,
                    "shape": [m, n],
                    "rank": r,
                    "batched_s": t_b,
                    "loop_s": t_l,
                    "speedup": t_l / t_b,
                }
            )
    return out


def _gap_at_time(points: list[tuple[float, float]], t: float) -> float | None:
    """rsvd's gap at time ``t``, interpolated (log-linear) between its measured (time, gap) points."""
    pts = sorted(points)
    for (t0, g0), (t1, g1) in zip(pts, pts[1:], strict=False):
        if t0 <= t <= t1 and g0 > 0 and g1 > 0:
            w = (t - t0) / (t1 - t0) if t1 > t0 else 0.0
            return math.exp((1 - w) * math.log(g0) + w * math.log(g1))
    return None


def krylov_equal_time(device, scale, repeats) -> dict[str, Any]:
    """Block Krylov vs rsvd (10, q) on a decaying spectrum: error gap to optimal at equal time.

    rsvd is swept over q; for each Krylov setting the rsvd gap at the same time is interpolated, and
    ``gap_ratio`` = Krylov gap / rsvd gap at equal time (< 1: Krylov is more accurate for the same time).
    """
    from lowrank.linalg import block_krylov_svd, randomized_svd, truncated_svd

    m, r = 4096 // scale, 384 // scale
    k = r + 10
    A = make_matrix("decaying", m, m, device, seed=4)
    best = rel_error(A, *truncated_svd(A, r))
    rows, rsvd_pts = [], []
    for q in (1, 2, 3, 4, 6, 8, 12):
        t, res = timed(lambda q=q: randomized_svd(A, r, power_iters=q), device, repeats)
        rows.append({"method": f"rsvd (10, {q})", "time_s": t, "gap": rel_error(A, *res) - best})
        rsvd_pts.append((t, rows[-1]["gap"]))
    for b, depth in (
        (k, 2),
        (-(-k // 2), 4),
        (-(-k // 3), 5),
        (-(-k // 3), 7),
        (-(-k // 4), 8),
        (-(-k // 3), 9),
    ):
        t, res = timed(lambda b=b, d=depth: block_krylov_svd(A, r, block_size=b, depth=d), device, repeats)
        gap = rel_error(A, *res) - best
        ref = _gap_at_time(rsvd_pts, t)
        rows.append(
            {
                "method": f"krylov (block {b}, depth {depth})",
                "time_s": t,
                "gap": gap,
                "rsvd_gap_same_time": ref,
                "gap_ratio": None if ref is None else gap / ref,
            }
        )
    return {"shape": [m, m], "rank": r, "optimal_error": best, "rows": rows}


def tolerance(device, scale, repeats) -> list[dict[str, Any]]:
    """rank_by_tolerance: chosen rank vs the optimal rank for the tolerance, time vs rsvd at that rank."""
    from lowrank.linalg import randomized_svd, rank_by_tolerance

    m = 4096 // scale
    A = make_matrix("decaying", m, m, device, seed=5)
    s2 = torch.linalg.svdvals(A).double().square()
    tail = (s2.sum() - torch.cumsum(s2, 0)).clamp_min(0).sqrt() / s2.sum().sqrt()
    out = []
    for tol in (0.5, 0.3, 0.1):
        t, res = timed(lambda tol=tol: rank_by_tolerance(A, tol, max_rank=m // 2), device, repeats)
        r = res[1].shape[-1]
        t_r, _ = timed(lambda r=r: randomized_svd(A, r), device, repeats)
        out.append(
            {
                "tol": tol,
                "rank": r,
                "optimal_rank": int((tail > tol).sum()) + 1,
                "time_s": t,
                "rsvd_same_rank_s": t_r,
                "rel_error": rel_error(A, *res),
            }
        )
    return out


def measure_targets(device: str, rows: list[dict[str, Any]], scale: int, repeats: int) -> dict[str, Any]:
    """All target ratios; each entry records its own shapes."""
    out = {"scale": scale, **from_table(rows)}
    for name, fn in (
        ("wide_vs_svd_lowrank", wide_vs_torch),
        ("exact_route", exact_route),
        ("auto_crossover", auto_crossover),
        ("batched", batched),
        ("krylov_equal_time", krylov_equal_time),
        ("tolerance", tolerance),
    ):
        logger.info("measuring target %s", name)
        try:
            out[name] = fn(device, scale, repeats)
        except (RuntimeError, ValueError, torch.cuda.OutOfMemoryError) as exc:  # keep the other targets
            logger.error("target %s failed: %s: %s", name, type(exc).__name__, exc)
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
    return out
