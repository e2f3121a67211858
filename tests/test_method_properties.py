"""The shared method tester: every registered method's own promises (``tests/_method_cases.py``) on every
tiny architecture it supports, as PEFT's common tester runs each tuner's checks on every model."""

from __future__ import annotations

import copy

import pytest
import torch
from _decoding import decoded, logits
from _method_cases import CASES, MethodCase
from conftest import ARCHITECTURES, make_tiny_model, random_tokens

from lowrank.attention.cache import kv_bytes_per_token
from lowrank.evaluation.memory import memory_report
from lowrank.methods import compress, config_class, method_names
from lowrank.methods.base import refusal

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = random_tokens(2, 20, seed=5)
CALIBRATION = random_tokens(16, 48)


def _apply(model, method: str, overrides: dict, *, from_example: bool = True):
    cls = config_class(method)
    config = cls(**({**cls.example, **overrides} if from_example else overrides))
    return compress(model, config, calibration=CALIBRATION if cls.calibrated else None)


def _prepared(arch: str, case: MethodCase):
    """A tiny model of ``arch`` after the case's prerequisite methods; skipped where the method refuses."""
    model = make_tiny_model(arch)
    for method, overrides in case.before:
        _apply(model, method, overrides)
    reason = refusal(config_class(case.method), model)
    if reason:
        pytest.skip(f"{case.method} refuses {arch}: {reason}")
    return model


def test_every_registered_method_has_a_case():
    missing = sorted(set(method_names()) - set(CASES))
    assert not missing, f"methods without a case in tests/_method_cases.py: {missing}"


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("method", sorted(m for m in CASES if CASES[m].exact is not None))
def test_exact_where_the_method_promises_it(method, arch):
    case = CASES[method]
    model = _prepared(arch, case)
    reference = logits(model, IDS)
    _apply(model, method, case.exact, from_example=False)
    torch.testing.assert_close(
        logits(model, IDS), reference, rtol=case.exact_tolerance, atol=case.exact_tolerance
    )


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("method", sorted(CASES))
def test_decode_equals_forward_and_the_cache_holds_what_is_reported(method, arch):
    case = CASES[method]
    model = _prepared(arch, case)
    original = copy.deepcopy(model)
    result = _apply(model, method, case.config)
    stepwise, _ = decoded(model, IDS, prompt=12)
    torch.testing.assert_close(stepwise, logits(model, IDS), rtol=1e-4, atol=1e-4)
    measured = memory_report(model, tokens=8, batch_size=2).kv_cache_bytes_per_token
    assert result.kv_bytes_per_token_after == kv_bytes_per_token(model) == measured
    if case.kv_bytes is not None:
        config = {**config_class(method).example, **case.config}
        assert measured == case.kv_bytes(model, config) < result.kv_bytes_per_token_before
    if case.check is not None:
        case.check(original, model, result)
