"""The seed's Table 1 (exact SVD vs randomized SVD), extended: this engine vs ``torch.svd_lowrank`` vs
scikit-learn, on Gaussian, decaying-spectrum and real weight matrices, plus the speed targets.

    python -m benchmarks.rsvd_table --device cpu      # results/rsvd_table_cpu.{json,md,png}
    python -m benchmarks.rsvd_table --device cuda --out benchmarks/results/rsvd_table_h100
    python -m benchmarks.rsvd_table --device cpu --sizes 48:6 --families gaussian --no-targets --out /tmp/r

``lowrank bench rsvd`` runs this script from the source checkout. Prints Markdown tables, writes
``<out>.json``, ``<out>.md`` and (when matplotlib is installed) ``<out>.png``, and prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import RESULTS_DIR, git_sha
from benchmarks._timing import FAMILIES, make_matrix, rel_error, timed, weight_matrices

__all__ = ["SEED_SIZES", "CONFIGS", "add_arguments", "run", "main", "methods_for"]

logger = logging.getLogger(__name__)

Method = tuple[str, str, Callable[[torch.Tensor, int], Any]]

#: (n, rank) of the seed's Table 1.
SEED_SIZES = (
    (256, 32),
    (384, 48),
    (512, 64),
    (768, 96),
    (1024, 128),
    (1536, 160),
    (2048, 256),
    (3072, 320),
    (4096, 384),
    (6144, 512),
)
#: (oversample p, power iterations q) of the seed's Table 1.
CONFIGS = ((10, 2), (20, 4), (5, 1))
CPU_MAX_SIZE = 2048


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's flags."""
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    parser.add_argument(
        "--sizes",
        default=None,
        help="comma-separated sizes n of the seed's table (its rank is used) or n:rank pairs; default: all "
        f"seed sizes on cuda, sizes <= {CPU_MAX_SIZE} on cpu (exact SVD of 3072² and up takes minutes there)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median)")
    parser.add_argument(
        "--families", default="gaussian,decaying,weights", help="subset of gaussian,decaying,weights"
    )
    parser.add_argument(
        "--model",
        default="smollm2-135m",
        help="built-in model for the 'weights' family, or a .pt file of {name: W} saved from it",
    )
    parser.add_argument("--no-targets", action="store_true", help="skip the speed-target measurements")
    parser.add_argument(
        "--targets-scale",
        type=int,
        default=None,
        help="divide the target shapes (4096x11008, 4096², batch of 30) by this; default 1 on cuda, 4 on cpu",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--out", default=None, help="output prefix (default benchmarks/results/rsvd_table_<dev>)"
    )
    parser.add_argument("--plot-only", default=None, help="only draw the PNG from an existing JSON result")


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
    name = torch.cuda.get_device_name() if device.startswith("cuda") else (platform.processor() or "cpu")
    return {
        "device": device,
        "device_name": name,
        "torch": torch.__version__,
        "git_sha": git_sha(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args`` (see :func:`add_arguments`); returns an exit code."""
    from benchmarks._rsvd_report import markdown, plot, write_outputs
    from benchmarks._rsvd_targets import measure_targets

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
    out = Path(args.out) if args.out else RESULTS_DIR / f"rsvd_table_{device.split(':')[0]}"
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
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ValueError as e:  # a bad flag value: one line, as argparse does
        parser.exit(2, f"{parser.prog}: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
