"""The one map from dtype names to ``torch.dtype`` (configs, the CLI and manifests store names)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["DTYPES", "resolve_dtype", "dtype_name"]

DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def resolve_dtype(dtype: torch.dtype | str, allowed: Iterable[str] | None = None) -> torch.dtype:
    """Map a name (``'float32'``, …) or a ``torch.dtype`` to a ``torch.dtype`` among ``allowed`` names.

    Raises:
        ValueError: unknown or disallowed dtype (the message lists the valid names).
    """
    names = tuple(allowed) if allowed is not None else tuple(DTYPES)
    if isinstance(dtype, torch.dtype):
        if dtype_name(dtype) in names:
            return dtype
    elif isinstance(dtype, str) and dtype in names:
        return DTYPES[dtype]
    raise ValueError(f"dtype must be one of {', '.join(names)}; got {dtype!r}")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` → ``'float32'``."""
    return str(dtype).removeprefix("torch.")
