"""Command-line flags and constants of the SVD benchmark (no torch import: ``lowrank --help`` stays fast)."""

from __future__ import annotations

import argparse

__all__ = ["SEED_SIZES", "CONFIGS", "CPU_MAX_SIZE", "add_arguments"]

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
    """The benchmark's flags (shared by the script and ``lowrank bench rsvd``)."""
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
