"""LowRankLinear: an honest drop-in for nn.Linear, rebuildable from its spec."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowrank.nn import (
    LowRankLinear,
    build_replacement,
    describe_replacement,
    factored_parameters,
    parameters_saved,
    replacement_class,
)


def _factors(out=12, inp=10, rank=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, inp, generator=g), torch.randn(out, rank, generator=g)


def test_forward_is_product_of_factors_plus_bias():
    A, B = _factors()
    bias = torch.arange(12, dtype=torch.float32)
    module = LowRankLinear.from_factors(A, B, bias)
    x = torch.randn(5, 10)
    torch.testing.assert_close(module(x), x @ (B @ A).T + bias)
    assert (module.in_features, module.out_features, module.rank) == (10, 12, 3)
    assert "rank=3" in repr(module)


def test_from_linear_keeps_bias_device_dtype_and_to_linear_round_trips():
    linear = nn.Linear(10, 12, bias=True).to(torch.float64)
    A, B = _factors()
    module = LowRankLinear.from_linear(linear, A, B)
    assert module.up.bias is not None and torch.equal(module.up.bias, linear.bias)
    assert module.down.weight.dtype == torch.float64 and module.down.bias is None
    dense = module.to_linear()
    x = torch.randn(4, 10, dtype=torch.float64)
    torch.testing.assert_close(dense(x), module(x))


def test_parameter_helpers():
    module = LowRankLinear.from_factors(*_factors(out=12, inp=10, rank=3))
    assert sum(p.numel() for p in module.parameters()) == factored_parameters(12, 10, 3)
    assert module.parameters_saved == 12 * 10 - 3 * 22 == parameters_saved(12, 10, 3)
    assert parameters_saved(10, 10, 6) < 0  # past the break-even rank the factors are larger


@pytest.mark.parametrize("rank", [0, 11])
def test_bad_rank_is_one_line_error(rank):
    with pytest.raises(ValueError, match=f"got {rank}"):
        LowRankLinear(10, 12, rank)


def test_mismatched_factors_raise():
    A, B = _factors()
    with pytest.raises(ValueError, match="factors"):
        LowRankLinear.from_factors(A, B[:, :2])
    with pytest.raises(ValueError, match="do not fit"):
        LowRankLinear.from_linear(nn.Linear(9, 12), A, B)


def test_registry_rebuilds_the_same_shape():
    module = LowRankLinear.from_factors(*_factors(), torch.zeros(12))
    desc = describe_replacement(module)
    assert desc == {
        "class": "LowRankLinear",
        "spec": {"in_features": 10, "out_features": 12, "rank": 3, "bias": True},
    }
    rebuilt = build_replacement(desc)
    rebuilt.load_state_dict(module.state_dict(), strict=True)
    x = torch.randn(2, 10)
    assert torch.equal(rebuilt(x), module(x))
    assert describe_replacement(nn.Linear(2, 2)) is None
    with pytest.raises(ValueError, match="NoSuchModule"):
        replacement_class("NoSuchModule")


def test_every_built_in_replacement_resolves_from_a_bare_registry_import():
    """Loading a saved model must not depend on what the caller imported first: in a fresh interpreter that
    imports only the registry, every built-in replacement class is found by name."""
    import subprocess
    import sys

    code = (
        "from lowrank.nn.registry import replacement_class\n"
        "for name in ('LowRankLinear', 'QuantizedLinear', 'ProjectedAttention', 'DeepseekLatentAttention'):\n"
        "    assert replacement_class(name).__name__ == name, name\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
