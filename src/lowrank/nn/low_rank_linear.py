"""``LowRankLinear``: a drop-in replacement for ``nn.Linear`` stored as two thin factors.

``y = up(down(x))`` with ``down: in_features -> rank`` (no bias) and ``up: rank -> out_features``
(carrying the original bias), i.e. ``W ≈ B @ A`` with ``A = down.weight`` (rank × in) and
``B = up.weight`` (out × rank). Both factors are plain ``nn.Linear`` modules, so every tool that
understands linear layers (quantizers, LoRA, ``torch.compile``) understands this one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowrank.linalg.allocation import dense_parameters, factored_parameters
from lowrank.nn.registry import register_replacement

__all__ = [
    "LowRankLinear",
    "dense_parameters",
    "factored_parameters",
    "parameters_saved",
    "dense_weight",
    "folded_linear",
]


def parameters_saved(out_features: int, in_features: int, rank: int) -> int:
    """Weights saved by factorizing an ``out × in`` matrix at ``rank`` (negative: the factors are larger)."""
    return dense_parameters(out_features, in_features) - factored_parameters(out_features, in_features, rank)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The (out × in) weight of an ``nn.Linear``, or the product B A of a :class:`LowRankLinear`."""
    if isinstance(module, LowRankLinear):
        return module.up.weight @ module.down.weight
    return module.weight


def folded_linear(
    linear: nn.Linear, *, outputs: torch.Tensor | None = None, inputs: torch.Tensor | None = None
) -> nn.Linear:
    """A new ``nn.Linear`` computing ``outputsᵀ · linear(inputs · x)`` (W' = outputsᵀ W inputs).

    Folds a fixed linear map applied after a projection (``outputs``: out_features × new_out) or before it
    (``inputs``: in_features × new_in) into its weight, so the product costs one matrix. The product is
    formed in float64 and cast to the layer's dtype.

    Raises:
        ValueError: ``linear`` is not a plain ``nn.Linear``, or a map's shape does not fit it.
    """
    if type(linear) is not nn.Linear:
        raise ValueError(f"only a plain nn.Linear can absorb a map; got {type(linear).__name__}")
    for name, m, size in (("outputs", outputs, linear.out_features), ("inputs", inputs, linear.in_features)):
        if m is not None and (m.ndim != 2 or m.shape[0] != size):
            raise ValueError(f"{name} map must have {size} rows for this layer; got shape {tuple(m.shape)}")
    weight = linear.weight.detach().double()
    bias = None if linear.bias is None else linear.bias.detach().double()
    if outputs is not None:
        weight = outputs.to(weight).T @ weight
        bias = None if bias is None else outputs.to(bias).T @ bias
    if inputs is not None:
        weight = weight @ inputs.to(weight)
    out_features, in_features = weight.shape
    like = linear.weight
    new = nn.Linear(in_features, out_features, bias=bias is not None, device=like.device, dtype=like.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


@register_replacement
class LowRankLinear(nn.Module):
    """A linear layer ``y = x Aᵀ Bᵀ + b`` with ``A`` (rank × in) and ``B`` (out × rank).

    Args:
        in_features: size of each input sample.
        out_features: size of each output sample.
        rank: inner dimension of the factorization.
        bias: whether ``up`` carries a bias (the original layer's).
        device, dtype: where and how the (uninitialised) factors are allocated.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(
                f"rank must be in [1, min(in_features, out_features)] = "
                f"[1, {min(in_features, out_features)}]; "
                f"got {rank}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    @classmethod
    def from_factors(
        cls, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None = None
    ) -> LowRankLinear:
        """Build from factors ``A`` (rank × in) and ``B`` (out × rank) so that ``W = B @ A``."""
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(
                "factors must be A (rank × in) and B (out × rank); "
                f"got A {tuple(A.shape)}, B {tuple(B.shape)}"
            )
        module = cls(
            A.shape[1], B.shape[0], A.shape[0], bias=bias is not None, device=A.device, dtype=A.dtype
        )
        with torch.no_grad():
            module.down.weight.copy_(A)
            module.up.weight.copy_(B.to(A.dtype))
            if bias is not None:
                module.up.bias.copy_(bias)
        return module

    @classmethod
    def from_linear(cls, linear: nn.Linear, A: torch.Tensor, B: torch.Tensor) -> LowRankLinear:
        """Replace ``linear`` by factors ``A`` (rank × in), ``B`` (out × rank), keeping bias/device/dtype."""
        if A.shape[1] != linear.in_features or B.shape[0] != linear.out_features:
            raise ValueError(
                f"factors {tuple(B.shape)} @ {tuple(A.shape)} do not fit a linear layer "
                f"{linear.out_features} × {linear.in_features}"
            )
        w = linear.weight
        bias = None if linear.bias is None else linear.bias.detach()
        return cls.from_factors(A.to(w.device, w.dtype), B.to(w.device, w.dtype), bias)

    def to_linear(self) -> nn.Linear:
        """The equivalent dense ``nn.Linear`` (weight ``B @ A``)."""
        w = self.down.weight
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.up.bias is not None, device=w.device, dtype=w.dtype
        )
        with torch.no_grad():
            linear.weight.copy_(self.up.weight @ self.down.weight)
            if self.up.bias is not None:
                linear.bias.copy_(self.up.bias)
        return linear

    @property
    def parameters_saved(self) -> int:
        """Weights saved against the dense layer it replaces."""
        return parameters_saved(self.out_features, self.in_features, self.rank)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.up.bias is not None}"
        )

    # -- serialization protocol (see lowrank.nn.registry) --------------------------------------
    def replacement_spec(self) -> dict[str, Any]:
        """JSON-able description from which :meth:`from_spec` rebuilds an empty module of this shape."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "bias": self.up.bias is not None,
        }

    @classmethod
    def from_spec(
        cls,
        spec: dict[str, Any],
        *,
        original: nn.Module | None = None,
        model_config: Any = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> LowRankLinear:
        """An uninitialised module with the shape described by ``spec`` (weights loaded afterwards).

        Raises:
            ValueError: a spec without the integer fields ``in_features``, ``out_features``, ``rank`` or
                with sizes that do not fit (the message names them).
        """
        try:
            sizes = [int(spec[k]) for k in ("in_features", "out_features", "rank")]
            bias = bool(spec["bias"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                "LowRankLinear spec needs integer in_features, out_features, rank and a bias flag; "
                f"got {spec!r}"
            ) from exc
        if original is not None and (
            getattr(original, "in_features", sizes[0]),
            getattr(original, "out_features", sizes[1]),
        ) != (sizes[0], sizes[1]):
            raise ValueError(
                f"LowRankLinear spec {sizes[1]} × {sizes[0]} does not fit the module it replaces "
                f"({original.out_features} × {original.in_features})"
            )
        return cls(*sizes, bias=bias, device=device, dtype=dtype)
