"""Every ordered pair of registered methods, for real, on a tiny model: the first runs, then the second
either runs (its ``follows`` declares the first) or is refused in one line before any work, the model
untouched. A declared pair may still be refused for what the model holds (nothing left to replace)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from conftest import make_tiny_model, random_tokens

from lowrank.methods import applied_methods, compress, config_class, method_names
from lowrank.methods.base import refusal

pytestmark = pytest.mark.usefixtures("one_thread")

#: Smaller than the shared tiny model: one layer, so each pair runs in about a second.
TINIER = dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2, head_dim=16)
CALIBRATION = random_tokens(12, 32)


def _config(method):
    cls = config_class(method)
    return cls.from_dict(dict(cls.example))


def _run(model, method):
    return compress(
        model, _config(method), calibration=CALIBRATION if config_class(method).calibrated else None
    )


_FIRST: dict[str, torch.nn.Module] = {}


def _after(first: str) -> torch.nn.Module:
    """A tiny model with ``first`` applied for real (``heal`` needs something compressed: ``svd`` first)."""
    if first not in _FIRST:
        model = make_tiny_model("llama", num_key_value_heads=1, **TINIER)
        if refusal(config_class(first), model):
            _run(model, "svd")
        _run(model, first)
        _FIRST[first] = model
    return copy.deepcopy(_FIRST[first])


@pytest.mark.parametrize(("first", "second"), list(itertools.product(method_names(), repeat=2)))
def test_every_ordered_pair_for_real(first, second):
    model = _after(first)
    before = [m["method"] for m in applied_methods(model)]
    assert before[-1] == first
    cls = config_class(second)
    declared = cls.follows is None or all(name in cls.follows for name in before)
    reason = refusal(cls, model)
    assert (reason is None) <= declared  # what the declaration refuses, the check refuses
    ids = random_tokens(1, 8, seed=5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        _run(model, second)
    except ValueError as exc:
        message = str(exc)
        assert "\n" not in message
        if reason is not None:  # refused by the declaration or the method's unsupported check
            assert message == reason
        if not declared:
            assert reason is not None and "cannot be applied after" in reason
        after = model.state_dict()
        assert set(after) == set(state) and all(torch.equal(after[k], state[k]) for k in state)
        assert [m["method"] for m in applied_methods(model)] == before
        return
    assert declared and reason is None, f"{second} ran after {before} though refused: {reason}"
    assert [m["method"] for m in applied_methods(model)] == [*before, second]
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
