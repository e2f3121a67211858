"""The seed's Table 1 (exact SVD vs randomized SVD), extended: this engine vs ``torch.svd_lowrank`` vs
scikit-learn, on Gaussian, decaying-spectrum and real weight matrices, plus the speed targets.

Used by ``benchmarks/rsvd_table.py`` and ``lowrank bench rsvd``. Prints Markdown tables, writes
``<out>.json``, ``<out>.md`` and (when matplotlib is installed) ``<out>.png``, and prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lowrank.benchmarking._timing import FAMILIES, make_matrix, rel_error, timed, weight_matrices
from lowrank.benchmarking.rsvd_args import CONFIGS, CPU_MAX_SIZE, SEED_SIZES, add_arguments

__all__ = ["SEED_SIZES", "CONFIGS", "add_arguments", "run", "main", "methods_for"]

logger = logging.getLogger(__name__)

Method = tuple[str, str, Callable[[torch.Tensor, int], Any]]


def _sizes(spec: str | None, device: str) -> list[tuple[int, int]]:
    if spec is None:
        return [s for s in SEED_SIZES if device != "cpu" or s[0] <= CPU_MAX_SIZE]
    seed = dict(SEED_SIZES)
    out = []
    for item in spec.split(","):
        n, _, r = item.strip().partition(":")
        if not n.isdigit() or (r and not r.isdigit()) or (not r and int(n) not in seed):
            raise ValueError(f"--sizes entry {item!r} must be a seed size {sorted(seed)} or n:rank")
        out.append((int(n), int(r) if r else seed[int(n)]))
    return out


def _truncate(U, S, V_or_Vh, r, transpose):
    Vh = V_or_Vh.mT if transpose else V_or_Vh
    return U[..., :r], S[..., :r], Vh[..., :r, :]


def methods_for(device: str) -> list[Method]:
    """(label, kind, fn(A, rank)) for every method of the table; kind groups rows for the plot."""
    from lowrank.linalg import block_krylov_svd, randomized_svd, truncated_svd

    def torch_lowrank(p, q):
        def fn(A, r):
            torch.manual_seed(0)  # torch.svd_lowrank draws from the global generator
            return _truncate(*torch.svd_lowrank(A, q=min(r + p, min(A.shape)), niter=q), r, True)

        return fn

    out: list[Method] = [
        (
            "SVD (torch.linalg.svd)",
            "svd",
            lambda A, r: _truncate(*torch.linalg.svd(A, full_matrices=False), r, False),
        ),
        ("exact (lowrank, Gram+eigh)", "exact", lambda A, r: truncated_svd(A, r)),
    ]
    for p, q in CONFIGS:
        out.append(
            (
                f"lowrank rsvd (p={p}, q={q})",
                f"lowrank-{p}-{q}",
                lambda A, r, p=p, q=q: randomized_svd(A, r, oversample=p, power_iters=q),
            )
        )
        out.append((f"torch.svd_lowrank (p={p}, q={q})", f"torch-{p}-{q}", torch_lowrank(p, q)))
        if device == "cpu" and _have_sklearn():
            out.append((f"sklearn (p={p}, q={q})", f"sklearn-{p}-{q}", _sklearn(p, q)))
    out.append(("lowrank krylov (block (r+10)/3, depth 7)", "krylov", lambda A, r: block_krylov_svd(A, r)))
    return out


def _have_sklearn() -> bool:
    try:
        import sklearn.utils.extmath  # noqa: F401
    except ImportError:
        logger.info("scikit-learn is not installed: its rows are skipped")
        return False
    return True


def _sklearn(p, q):
    from sklearn.utils.extmath import randomized_svd as sk_rsvd

    def fn(A, r):
        U, S, Vt = sk_rsvd(A.numpy(), r, n_oversamples=p, n_iter=q, random_state=0)
        return torch.from_numpy(U), torch.from_numpy(S), torch.from_numpy(Vt)

    return fn


def _bench_matrix(A, rank, label, methods, device, repeats) -> list[dict[str, Any]]:
    rows = []
    for name, kind, fn in methods:
        t, (U, S, Vh) = timed(lambda fn=fn: fn(A, rank), device, repeats)
        rows.append(
            {
                "matrix": label,
                "m": A.shape[0],
                "n": A.shape[1],
                "rank": rank,
                "method": name,
                "kind": kind,
                "time_s": t,
                "rel_error": rel_error(A, U, S, Vh),
            }
        )
    base = rows[0]
    for row in rows:
        row["speedup"] = base["time_s"] / row["time_s"]
        row["delta_vs_svd"] = row["rel_error"] - base["rel_error"]
    return rows


def run_table(device: str, sizes, families, repeats, model: str) -> list[dict[str, Any]]:
    from tqdm import tqdm

    methods = methods_for(device)
    jobs = []
    for family in families:
        if family == "weights":
            for name, W in weight_matrices(model, device):
                jobs.append(("weights", f"{name} ({W.shape[0]}×{W.shape[1]})", W, max(1, min(W.shape) // 8)))
        else:
            jobs += [(family, f"{n}×{n}", (family, n), r) for n, r in sizes]
    rows = []
    for family, label, A, rank in tqdm(jobs, desc="rsvd table", unit="matrix"):
        A = make_matrix(A[0], A[1], A[1], device) if isinstance(A, tuple) else A
        for row in _bench_matrix(A, rank, label, methods, device, repeats):
            rows.append({"family": family, **row})
        del A
    return rows


def provenance(device: str) -> dict[str, Any]:
    """Device, torch version and git SHA (from ``git`` or the ``LOWRANK_GIT_SHA`` environment variable)."""
    sha = os.environ.get("LOWRANK_GIT_SHA")
    if sha is None:
        try:
            root = Path(__file__).resolve().parents[3]
            sha = subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            sha = None
    name = torch.cuda.get_device_name() if device.startswith("cuda") else (platform.processor() or "cpu")
    return {
        "device": device,
        "device_name": name,
        "torch": torch.__version__,
        "git_sha": sha,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args`` (see :func:`add_arguments`); returns an exit code."""
    from lowrank.benchmarking.rsvd_report import markdown, plot, write_outputs
    from lowrank.benchmarking.rsvd_targets import measure_targets

    if args.plot_only:
        payload = json.loads(Path(args.plot_only).read_text())
        print(plot(payload, Path(args.plot_only).with_suffix(".png")) or "matplotlib missing: no PNG")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    bad = [f for f in families if f not in FAMILIES]
    if bad or args.repeats < 1:
        raise ValueError(
            f"--families must be a subset of {FAMILIES} (got {bad}); --repeats >= 1 (got {args.repeats})"
        )
    sizes = _sizes(args.sizes, device)
    payload: dict[str, Any] = {
        "provenance": provenance(device),
        "sizes": sizes,
        "configs": CONFIGS,
        "repeats": args.repeats,
    }
    payload["rows"] = run_table(device, sizes, families, args.repeats, args.model)
    out = Path(args.out) if args.out else Path("benchmarks/results") / f"rsvd_table_{device.split(':')[0]}"
    write_outputs(payload, markdown(payload), out)  # the table is kept even if a target fails below
    if not args.no_targets:
        scale = args.targets_scale or (1 if device.startswith("cuda") else 4)
        payload["targets"] = measure_targets(device, payload["rows"], scale, args.repeats)
    from lowrank.linalg import fallback_counts

    payload["fallbacks"] = fallback_counts()
    text = markdown(payload)
    print(text)
    write_outputs(payload, text, out)
    prov = payload["provenance"]
    print(json.dumps({"benchmark": "rsvd_table", **prov, "out": str(out)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run(parser.parse_args(argv))
