"""What a model stores and represents: parameter counts and weight bytes, replacement modules included.

Each registered replacement module answers for what it holds outside ``nn.Parameter`` s
(``stored_bytes``, ``represented_parameters``: see :mod:`lowrank.nn.registry`), so no class is named here.
"""

from __future__ import annotations

from torch import nn

from lowrank.nn.registry import replacement_modules

__all__ = ["count_parameters", "weight_bytes", "stored_bytes", "represented_parameters"]


def stored_bytes(model: nn.Module) -> int:
    """Bytes the replacement modules of ``model`` store outside parameters (quantized weights, scales, …)."""
    return sum(m.stored_bytes() for m in replacement_modules(model) if hasattr(m, "stored_bytes"))


def represented_parameters(model: nn.Module) -> int:
    """Weights the replacement modules of ``model`` stand for without holding them as parameters."""
    return sum(
        m.represented_parameters() for m in replacement_modules(model) if hasattr(m, "represented_parameters")
    )


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters of ``model`` (tied weights counted once); a quantized layer counts the
    out × in weights it stores, so quantization leaves the count unchanged."""
    return sum(p.numel() for p in model.parameters()) + represented_parameters(model)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the distinct parameters of ``model`` in their current dtypes, plus what every replacement
    module stores outside parameters (packed weights, scales and zero points)."""
    return sum(p.numel() * p.element_size() for p in model.parameters()) + stored_bytes(model)
