"""Drop-in modules that replace dense layers (torch only)."""

from lowrank.nn.low_rank_linear import (  # noqa: I001  (registry first: the module registers itself)
    LowRankLinear,
    dense_parameters,
    dense_weight,
    factored_parameters,
    folded_linear,
    parameters_saved,
)
from lowrank.nn.quantized_linear import QuantizedLinear
from lowrank.nn.registry import (
    build_replacement,
    describe_replacement,
    describe_replacements,
    register_replacement,
    replacement_class,
)

__all__ = [
    "LowRankLinear",
    "QuantizedLinear",
    "dense_parameters",
    "dense_weight",
    "folded_linear",
    "factored_parameters",
    "parameters_saved",
    "register_replacement",
    "replacement_class",
    "describe_replacement",
    "describe_replacements",
    "build_replacement",
]
