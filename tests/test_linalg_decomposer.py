"""Decomposer registry and config: names, validation, determinism, auto rule, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from _linalg_helpers import decaying, optimal_error, rel_error

from lowrank.linalg import (
    DecomposerConfig,
    available_decomposers,
    get_decomposer,
    randomized_svd,
    truncated_svd,
)
from lowrank.linalg.decomposer import auto_uses_exact


def test_available_names_and_config_round_trip():
    names = available_decomposers()
    assert {"svd", "rsvd", "auto"} <= set(names)
    for name in names:
        cfg = DecomposerConfig(name=name, oversample=4, power_iters=1, seed=3)
        assert DecomposerConfig.from_dict(cfg.to_dict()) == cfg
        dec = get_decomposer(cfg)
        assert dec.name == name and dec.config == cfg


def test_get_decomposer_overrides():
    dec = get_decomposer("rsvd", oversample=20, power_iters=4)
    assert (dec.config.oversample, dec.config.power_iters) == (20, 4)
    assert get_decomposer({"name": "svd"}).name == "svd"
    assert get_decomposer(DecomposerConfig(name="rsvd"), seed=5).config.seed == 5


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"name": "lanczos"}, "'name' must be one of .*'svd'.*; got 'lanczos'"),
        ({"oversample": -1}, "oversample.*-1"),
        ({"power_iters": -2}, "power_iters.*-2"),
        ({"power_iters": 1.5}, "power_iters.*1.5"),
        ({"auto_rank_fraction": 1.5}, "auto_rank_fraction.*1.5"),
        ({"exact_method": "qr"}, "exact_method.*'qr'"),
        ({"tol": 0.0}, "tol.*0.0"),
    ],
)
def test_config_validation(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        DecomposerConfig(**kwargs)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="'rnak'"):
        DecomposerConfig.from_dict({"name": "rsvd", "rnak": 3})


@pytest.mark.parametrize("name", ["svd", "rsvd", "auto", "krylov", "adaptive"])
@pytest.mark.parametrize(
    ("A", "rank", "needle"),
    [
        (torch.ones(5, 4), 0, "rank=0"),
        (torch.ones(5, 4), 5, "rank=5"),
        (torch.ones(5, 4), 2.0, "2.0"),
        (torch.ones(4), 1, "ndim=1"),
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), 1, "non-finite"),
        (torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), 1, "non-finite"),
        (torch.ones(3, 3, dtype=torch.int64), 1, "int64"),
    ],
)
def test_bad_input_raises(name, A, rank, needle):
    with pytest.raises(ValueError, match=needle):
        get_decomposer(name)(A, rank)


def test_bad_function_arguments():
    A = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="oversample.*-1"):
        randomized_svd(A, 2, oversample=-1)
    with pytest.raises(ValueError, match="power_iters.*-1"):
        randomized_svd(A, 2, power_iters=-1)
    with pytest.raises(ValueError, match="rank=6"):
        truncated_svd(A, 6)


def test_same_config_same_output_on_every_call():
    A = decaying(70, 50, seed=3)
    dec = get_decomposer("rsvd", power_iters=0, seed=11)
    r1, r2 = dec(A, 6), dec(A, 6)
    assert all(torch.equal(a, b) for a, b in zip(r1, r2, strict=True))
    assert not torch.equal(r1[0], get_decomposer("rsvd", power_iters=0, seed=12)(A, 6)[0])


def test_auto_rule_as_documented():
    cfg = DecomposerConfig(name="auto", auto_rank_fraction=0.5, oversample=10)
    assert not auto_uses_exact(cfg, 1000, 800, 400)  # 50 % of min(m, n): randomized
    assert auto_uses_exact(cfg, 1000, 800, 401)  # above 50 %: exact
    assert auto_uses_exact(cfg, 100, 30, 25)  # rank + oversample >= min(m, n): sketch would be full
    default = DecomposerConfig(name="auto")  # per-device measured crossover
    assert default.auto_rank_fraction is None
    assert not auto_uses_exact(default, 1000, 1000, 700, "cuda") and auto_uses_exact(
        default, 1000, 1000, 760, "cuda"
    )
    assert not auto_uses_exact(default, 1000, 1000, 500, "cpu") and auto_uses_exact(
        default, 1000, 1000, 510, "cpu"
    )
    A = decaying(120, 100, seed=4)
    dec = get_decomposer("auto")
    # below the threshold auto is exactly rsvd with the same config, above it exactly the exact route
    lo = dec(A, 20)
    assert torch.equal(lo[1], randomized_svd(A, 20, oversample=10, power_iters=2, seed=0)[1])
    hi = dec(A, 70)  # 70 % > the CPU crossover
    assert torch.equal(hi[1], truncated_svd(A, 70)[1])


@pytest.mark.parametrize("name", ["svd", "rsvd", "auto", "krylov"])
def test_every_decomposer_near_optimal(name):
    A = decaying(90, 80, seed=5, rate=0.08)
    U, S, Vh = get_decomposer(name)(A, 15)
    assert rel_error(A, U, S, Vh) <= optimal_error(A, 15) * 1.01
    assert math.isclose(float(S[0]), 1.0, rel_tol=1e-4)
