"""Seed Table 1 and beyond: exact SVD vs this toolkit's randomized SVD vs torch.svd_lowrank (and sklearn).

    python -m benchmarks.rsvd_table --device cpu --out benchmarks/results/rsvd_table_cpu
    python -m benchmarks.rsvd_table --device cuda --out benchmarks/results/rsvd_table_h100

Same code as ``lowrank bench rsvd`` (see ``lowrank.benchmarking.rsvd_table``).
"""

from __future__ import annotations

import sys

from lowrank.benchmarking.rsvd_table import main

if __name__ == "__main__":
    sys.exit(main())
