"""Whitened factors of every target, a masked stand-in for a linear, and the KL of a model to its original.

For a target W (m × n) with input Gram G = S Sᵀ, the whitened SVD W S = U Σ Vᵀ gives factors
A = U Σ (m × r) and B = Vᵀ S⁺ (r × n) with W ≈ A diag(μ) B for a mask μ over the sorted singular values:
μ = 1[j < k] is the optimal rank-k truncation (SVD-LLM), μ = 1 is W itself (for r = min(m, n) and G
positive definite). Probing a rank, or learning where to truncate, then costs one matrix product per
layer instead of a new decomposition.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lowrank.linalg.whitening import Whitening
from lowrank.methods.common import Target
from lowrank.nn.surgery import replace_module
from lowrank.training.losses import distillation_loss

__all__ = ["Factors", "MaskedLinear", "whitened_factors", "masked", "mean_kl", "reference_logits"]


@dataclass
class Factors:
    """W ≈ A[:, :k] @ B[:k] at rank k: A = U Σ (m × r), B = Vᵀ S⁺ (r × n), float32."""

    A: torch.Tensor
    B: torch.Tensor


def whitened_factors(weight: torch.Tensor, wh: Whitening, rank: int) -> Factors:
    """The top-``rank`` whitened factors of ``weight`` (m × n) under the whitening ``wh`` of its input
    Gram (:func:`lowrank.linalg.whitening.whiten`).

    Computed in float64 (exact SVD of W S, mapped back through S⁺) and stored in float32.
    """
    D = wh.apply(weight.detach().to(torch.float64))
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    r = min(rank, S.numel())
    return Factors(A=(U[:, :r] * S[:r]).float(), B=wh.apply_pinv(Vh[:r]).float())


class MaskedLinear(nn.Module):
    """``y = A diag(μ) B x + b`` over sorted whitened singular values, or the original linear.

    The mask μ is either fixed (``set_rank``: the first k ones) or learned through a truncation
    position τ (``learn_position``): forward uses the hard mask 1[j + ½ < τ] (so τ = k is exactly the
    rank-k truncation), backward the gradient of the soft mask sigmoid((τ − j − ½)/T)
    (straight-through; Dobi-SVD's differentiable truncation position).
    """

    def __init__(self, linear: nn.Linear, factors: Factors) -> None:
        super().__init__()
        self.linear = linear
        dtype = linear.weight.dtype
        self.register_buffer("A", factors.A.to(linear.weight.device, dtype), persistent=False)
        self.register_buffer("B", factors.B.to(linear.weight.device, dtype), persistent=False)
        self.register_buffer("mask", torch.ones(self.A.shape[1], dtype=dtype, device=self.A.device))
        self.dense = True
        self.position: torch.Tensor | None = None
        self.temperature = 1.0

    @property
    def max_rank(self) -> int:
        return int(self.A.shape[1])

    def set_rank(self, rank: int | None) -> None:
        """Truncate at ``rank`` (None: the original dense linear)."""
        self.position = None
        self.dense = rank is None
        if rank is not None:
            self.mask.zero_()
            self.mask[:rank] = 1

    def learn_position(self, position: torch.Tensor, temperature: float) -> None:
        """Mask through the (shared, trainable) scalar ``position``."""
        self.dense, self.position, self.temperature = False, position, float(temperature)

    def current_mask(self) -> torch.Tensor:
        if self.position is None:
            return self.mask
        j = torch.arange(self.max_rank, device=self.A.device, dtype=self.A.dtype) + 0.5
        soft = torch.sigmoid((self.position - j) / self.temperature)
        hard = (j < self.position.detach()).to(soft.dtype)
        return hard + soft - soft.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense:
            return self.linear(x)
        h = F.linear(x, self.B) * self.current_mask().to(x.dtype)
        return F.linear(h, self.A.to(x.dtype), self.linear.bias)


@contextlib.contextmanager
def masked(
    model: nn.Module, targets: list[Target], bank: dict[str, Factors]
) -> Iterator[dict[str, MaskedLinear]]:
    """Put a dense :class:`MaskedLinear` in place of every target for the ``with`` block; restore after."""
    installed: dict[str, MaskedLinear] = {}
    try:
        for t in targets:
            linear = model.get_submodule(t.name)
            installed[t.name] = MaskedLinear(linear, bank[t.name])
            replace_module(model, t.name, installed[t.name])
        yield installed
    finally:
        for name, module in installed.items():
            replace_module(model, name, module.linear)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


@torch.no_grad()
def reference_logits(model: nn.Module, ids: torch.Tensor, batch_size: int = 4) -> list[torch.Tensor]:
    """The model's logits on ``ids`` (samples, seq), in chunks of ``batch_size`` sequences."""
    return [_logits(model, chunk).float() for chunk in ids.split(batch_size)]


def batch_kl(model: nn.Module, ids: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-token KL(reference ‖ model) on one batch (the healing code's KD term at temperature 1; with
    ``kd_weight`` 1 its loss is exactly the KL and carries the gradient)."""
    kl, _, _ = distillation_loss(_logits(model, ids).float(), reference, ids, temperature=1.0, kd_weight=1.0)
    return kl


@torch.no_grad()
def mean_kl(model: nn.Module, ids: torch.Tensor, reference: list[torch.Tensor], batch_size: int = 4) -> float:
    """Per-token KL(original ‖ model) averaged over ``ids`` (samples, seq); ``reference`` from
    :func:`reference_logits` with the same ``batch_size``."""
    chunks = ids.split(batch_size)
    total = sum(float(batch_kl(model, c, r)) * c.shape[0] for c, r in zip(chunks, reference, strict=True))
    return total / ids.shape[0]
