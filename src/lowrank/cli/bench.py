"""``lowrank bench``: reproducible benchmarks of the toolkit's building blocks.

``lowrank bench rsvd`` runs the seed's Table 1 (exact vs randomized SVD) and the SVD engine's speed
targets; it is the same code as ``benchmarks/rsvd_table.py``.
"""

from __future__ import annotations

import argparse

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    from lowrank.benchmarking.rsvd_args import add_arguments

    parser = subparsers.add_parser(
        "bench",
        help="run a benchmark (rsvd: exact vs randomized SVD, seed Table 1)",
        description="Run a benchmark; each prints Markdown tables, writes JSON/Markdown/PNG results and ends "
        "with one JSON line (device, torch version, git SHA).",
    )
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    rsvd = sub.add_parser(
        "rsvd",
        help="exact SVD vs this toolkit's randomized SVD vs torch.svd_lowrank (and scikit-learn on CPU)",
        description="Seed Table 1 (sizes 256..6144, (p, q) in (10,2), (20,4), (5,1)) on Gaussian, "
        "decaying-spectrum and real weight matrices, then the speed targets (wide matrices, exact route, "
        "auto crossover, batching, Krylov, rank by tolerance).",
    )
    add_arguments(rsvd)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.benchmark == "rsvd":
        from lowrank.benchmarking.rsvd_table import run as run_rsvd

        return run_rsvd(args)
    raise ValueError(f"unknown benchmark {args.benchmark!r}; valid: rsvd")
