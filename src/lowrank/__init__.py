"""lowrank: make large language models cheaper by low-rank factorization.

The top-level names are imported lazily, so ``import lowrank`` is instant, pulls in no transformers
and initializes no CUDA.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "load_model": "lowrank.loading.models",
    "load_text": "lowrank.io.data",
    "calibration_batches": "lowrank.io.data",
    "perplexity": "lowrank.evaluation",
    "throughput": "lowrank.evaluation",
    "memory_report": "lowrank.evaluation",
    "compress": "lowrank.methods",
    "save_compressed": "lowrank.loading.serialization",
    "randomized_svd": "lowrank.linalg",
    "truncated_svd": "lowrank.linalg",
    "get_decomposer": "lowrank.linalg",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lowrank' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
