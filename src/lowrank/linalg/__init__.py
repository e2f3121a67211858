"""Pure tensor linear algebra (torch only): the SVD engine and its building blocks.

>>> from lowrank.linalg import get_decomposer
>>> U, S, Vh = get_decomposer("rsvd", oversample=10, power_iters=2)(W, 64)
"""

from lowrank.linalg._kernels import fallback_counts
from lowrank.linalg.adaptive import rank_by_tolerance
from lowrank.linalg.decomposer import (
    Decomposer,
    DecomposerConfig,
    available_decomposers,
    get_decomposer,
    register_decomposer,
)
from lowrank.linalg.exact import truncated_svd
from lowrank.linalg.krylov import block_krylov_svd
from lowrank.linalg.kv_projection import (
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
from lowrank.linalg.rsvd import randomized_svd

__all__ = [
    "Decomposer",
    "DecomposerConfig",
    "Projection",
    "available_decomposers",
    "block_krylov_svd",
    "eigen",
    "epsilon_gap",
    "fallback_counts",
    "get_decomposer",
    "k_svd",
    "kq",
    "logit_energy",
    "logit_error",
    "randomized_svd",
    "rank_by_tolerance",
    "register_decomposer",
    "truncated_svd",
    "v_svd",
    "wo_aware",
]
