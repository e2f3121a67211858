"""``lowrank bench``: a thin launcher of the benchmark scripts under ``benchmarks/`` in the source checkout.

``lowrank bench rsvd ARGS`` runs ``python -m benchmarks.rsvd_table ARGS`` in a child process (the same
interpreter, the checkout and this ``lowrank`` on its path) and returns its exit code; ``--help`` after the
benchmark's name shows the script's own flags. The benchmarks are not part of the installed package: an
installation without the repository says so in one line.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

__all__ = ["BENCHMARKS", "register", "run", "source_checkout"]

#: benchmark name -> (module under ``benchmarks/``, one-line help)
BENCHMARKS = {
    "rsvd": (
        "rsvd_table",
        "exact SVD vs this toolkit's randomized SVD vs torch.svd_lowrank (and scikit-learn on CPU): the "
        "seed's Table 1 and the SVD engine's speed targets",
    ),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="run a benchmark script of the source checkout (rsvd: exact vs randomized SVD, seed Table 1)",
        description="Run a benchmark script of the source checkout (python -m benchmarks.<script>); each "
        "prints Markdown tables, writes JSON/Markdown/PNG results and ends with one JSON line (device, "
        "torch version, git SHA). Flags after the benchmark's name go to the script (--help lists them).",
    )
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, (module, text) in BENCHMARKS.items():
        # no option of its own: every flag after the name goes to the script, --help included
        child = sub.add_parser(name, help=text, description=text, add_help=False, prefix_chars="\0")
        child.add_argument("script_args", nargs="*", metavar=f"ARGS of benchmarks/{module}.py")
    parser.set_defaults(func=run)


def source_checkout() -> Path | None:
    """The repository this ``lowrank`` was imported from when it holds ``benchmarks/``, else ``None``."""
    root = Path(__file__).resolve().parents[3]  # <root>/src/lowrank/cli/bench.py
    return root if (root / "benchmarks" / "__init__.py").is_file() else None


def run(args: argparse.Namespace) -> int:
    if args.benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {args.benchmark!r}; valid: {', '.join(BENCHMARKS)}")
    root = source_checkout()
    if root is None:
        raise ValueError(
            "the benchmarks are not installed with the package: run `lowrank bench` from a source checkout "
            "of the repository (pip install -e .)"
        )
    module = BENCHMARKS[args.benchmark][0]
    paths = [str(root), str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    command = [sys.executable, "-m", f"benchmarks.{module}", *args.script_args]
    return subprocess.run(command, env=env).returncode
