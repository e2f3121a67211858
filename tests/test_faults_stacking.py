"""Fault injection, method stacking: every ordered pair of registered methods is either declared (the
second method's ``follows``) or refused in one line before any work."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import make_tiny_model

from lowrank.methods import compress, config_class, method_names
from lowrank.methods.base import set_applied_methods


@pytest.mark.parametrize(("first", "second"), list(itertools.product(method_names(), repeat=2)))
def test_every_ordered_pair_is_declared_or_refused_before_work(first, second):
    cls = config_class(second)
    model = make_tiny_model("llama")
    set_applied_methods(model, [{"method": first}], [])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = cls.from_dict(dict(cls.example))
    if cls.follows is None or first in cls.follows:
        return  # declared: the shared method x architecture tester runs the stack
    with pytest.raises(ValueError, match=f"cannot be applied after '{first}'") as info:
        compress(model, config, calibration=torch.zeros(2, 8, dtype=torch.long))
    assert "\n" not in str(info.value)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("second", ["mla", "kv-projection", "svd-llm"])
def test_nothing_follows_quantize_but_heal_and_quantize(second):
    assert "quantize" not in config_class(second).follows
