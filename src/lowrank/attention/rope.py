"""Rotary position embedding helpers (rotate-half convention, as every registered family uses).

``cos``/``sin`` have the layout transformers' rotary modules return, (b, t, d) with
``cos[..., i] == cos[..., i + d/2]`` (frequency pair i rotates features i and i + d/2).
"""

from __future__ import annotations

import torch

__all__ = ["rotate", "unrotate", "pair_dims"]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of x: (b, h, t, d) with cos, sin: (b, t, d)."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    return x * cos + _rotate_half(x) * sin


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`rotate` (rotation by the opposite angles)."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    return x * cos - _rotate_half(x) * sin


def pair_dims(pairs: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Feature indices of frequency pairs: (..., p) pair indices → (..., 2p) as [pairs, pairs + d/2]."""
    return torch.cat([pairs, pairs + head_dim // 2], dim=-1)
