"""Input validation shared by the decomposition routines (torch only)."""

from __future__ import annotations

import logging

import torch

__all__ = ["check_matrix", "check_rank", "compute_dtype", "sketch_size", "to_input_dtype"]

logger = logging.getLogger(__name__)

_HALF = (torch.float16, torch.bfloat16)


def check_matrix(A: torch.Tensor, *, check_finite: bool = True) -> None:
    """Raise ``ValueError`` unless ``A`` is a floating tensor of shape ``(..., m, n)`` with finite entries.

    The finiteness check reads one boolean back from the device (a single synchronisation).
    """
    if not isinstance(A, torch.Tensor):
        raise ValueError(f"A must be a torch.Tensor; got {type(A).__name__}")
    if A.ndim < 2:
        raise ValueError(
            f"A must have shape (..., m, n) with ndim >= 2; got ndim={A.ndim}, shape={tuple(A.shape)}"
        )
    if not A.is_floating_point():
        raise ValueError(f"A must be a floating-point tensor; got dtype={A.dtype}")
    if A.shape[-1] == 0 or A.shape[-2] == 0 or A.numel() == 0:
        raise ValueError(f"A must be non-empty; got shape={tuple(A.shape)}")
    if check_finite and not bool(torch.isfinite(A).all()):
        bad = int((~torch.isfinite(A)).sum())
        raise ValueError(f"A has {bad} non-finite entries (NaN or inf); decompositions need finite input")


def check_rank(rank: object, m: int, n: int) -> int:
    """Return ``rank`` as an int, or raise ``ValueError`` unless ``1 <= rank <= min(m, n)``."""
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise ValueError(f"rank must be an int in [1, min(m, n)={min(m, n)}]; got {rank!r}")
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be in [1, min(m, n)={min(m, n)}] for a {m}x{n} matrix; got rank={rank}")
    return rank


def check_nonnegative(name: str, value: object) -> int:
    """Return ``value`` as an int, or raise ``ValueError`` unless it is an int >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0; got {value!r}")
    return value


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16/bfloat16 inputs are computed in float32; float32/float64 in their own precision."""
    return torch.float32 if dtype in _HALF else dtype


def to_input_dtype(
    U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cast ``(U, S, Vh)`` computed in float32 back to the input ``dtype``.

    Singular values of a float16/bfloat16 matrix can exceed the dtype's range (σ₁ of an m × n matrix
    reaches √(mn)·max|a|); such a result is refused with ``ValueError`` instead of returning ``inf``
    (``U`` and ``Vh`` are orthonormal and always fit). Checked for half dtypes only (one synchronisation).
    """
    if dtype in _HALF and S.numel() > 0:
        top = float(S.abs().max())
        if not top <= torch.finfo(dtype).max:
            raise ValueError(
                f"singular values up to {top:.3g} exceed the {str(dtype).removeprefix('torch.')} range "
                f"(max {torch.finfo(dtype).max:.3g}); pass the matrix as float32 (A.float())"
            )
    return U.to(dtype), S.to(dtype), Vh.to(dtype)


def sketch_size(rank: int, oversample: int, m: int, n: int) -> int:
    """Number of sketch columns ``k = min(rank + oversample, min(m, n))``.

    Near full rank the oversampling is clamped so that the sketch never exceeds ``min(m, n)`` columns;
    the clamp is logged at debug level (it is expected and harmless: the sketch then spans the whole range).
    """
    k = rank + oversample
    if k > min(m, n):
        logger.debug(
            "sketch size rank+oversample=%d+%d exceeds min(m, n)=%d for a %dx%d matrix; clamped to %d",
            rank,
            oversample,
            min(m, n),
            m,
            n,
            min(m, n),
        )
        k = min(m, n)
    return k
