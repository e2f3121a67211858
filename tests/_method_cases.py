"""The shared method tester's cases: what each registered method promises, checked on every architecture by
``tests/test_method_properties.py``.

A method registers one :class:`MethodCase` here (a new method must: the tester refuses a registered method
without one). The tester then runs, for each tiny architecture the method supports:

* ``exact``: a config at which the method changes no logit (full rank, every rotary pair, …);
* decode equals forward: a prefill then one-token steps through the model's own cache give the logits of
  one cache-free pass;
* the KV-cache bytes: the number the method reports, the analytic ``kv_bytes_per_token`` and the bytes
  measured on a filled cache object agree, and equal ``kv_bytes`` when the case predicts them;
* ``check``: any further property of the method, given the model before and after.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from conftest import random_tokens
from torch import nn

from lowrank.nn.attention_layout import attention_info


@dataclass(frozen=True)
class MethodCase:
    method: str
    exact: dict[str, Any] | None = None
    """Config keyword arguments at which the method reproduces the original logits (None: no such point)."""
    exact_tolerance: float = 1e-4
    before: tuple[tuple[str, dict[str, Any]], ...] = ()
    """Methods (name, config keyword arguments) applied first: a method that only follows others."""
    kv_bytes: Callable[[nn.Module, dict[str, Any]], float] | None = None
    """Predicted KV-cache bytes per token of the compressed model, from the model and the example config."""
    check: Callable[[nn.Module, nn.Module, Any], None] | None = None
    """Further property: ``check(original, compressed, result)``."""
    config: dict[str, Any] = field(default_factory=dict)
    """Overrides of the method's ``example`` config for the decode and bytes checks."""


def _float_bytes(model: nn.Module) -> int:
    return next(model.parameters()).element_size()


def _kv_projection_bytes(model: nn.Module, config: dict[str, Any]) -> float:
    shape = attention_info(model).shape
    rank = round(config["rank_fraction"] * shape.head_dim)
    layers = model.config.num_hidden_layers
    return layers * shape.num_kv_heads * 2 * rank * _float_bytes(model)


def _mla_bytes(model: nn.Module, config: dict[str, Any]) -> float:
    shape = attention_info(model).shape
    layers = model.config.num_hidden_layers
    if config.get("partial_rope", "rorope") == "rorope":  # one latent and one rotary key per layer
        return layers * (config["rope_dim"] + config["kv_lora_rank"]) * _float_bytes(model)
    return layers * shape.num_kv_heads * (config["rope_dim"] + config["kv_rank"]) * _float_bytes(model)


def _full_mla(model_head_dim: int = 16) -> dict[str, Any]:
    """MHA2MLA's recipe with every rotary pair and a full latent (the DeepSeek layout is exact on MQA only:
    tests/test_mla_rorope.py)."""
    return {"partial_rope": "mha2mla", "rope_dim": model_head_dim, "kv_rank": model_head_dim}


def _factors_only_where_planned(original: nn.Module, model: nn.Module, result) -> None:
    """Weight methods: every module the result names was replaced, nothing else changed."""
    named = dict(model.named_modules())
    for name, entry in result.modules.items():
        assert name in named, name
        if entry.rank is not None:
            assert hasattr(named[name], "rank") and named[name].rank == entry.rank, name
    assert result.parameters_after < result.parameters_before


def _quantized_close(original: nn.Module, model: nn.Module, result) -> None:
    """8-bit weights: the logits stay close; the parameter count is unchanged, the bytes drop."""
    ids = random_tokens(2, 12, seed=11)
    with torch.no_grad():
        a, b = original(ids).logits, model(ids).logits
    assert (a - b).norm() / a.norm() < 0.02
    assert result.parameters_after == result.parameters_before
    assert result.weight_bytes_after < result.weight_bytes_before


def _healed_in_place(original: nn.Module, model: nn.Module, result) -> None:
    """Healing trains the replaced modules only: the structure, sizes and cache are kept."""
    assert result.parameters_after == result.parameters_before
    assert result.kv_bytes_per_token_after == result.kv_bytes_per_token_before
    details = result.details
    assert details["heldout_loss_after"] <= details["heldout_loss_before"]


CASES: dict[str, MethodCase] = {
    case.method: case
    for case in (
        MethodCase("svd", exact={"keep_singular_fraction": 1.0, "factorize_all": True}),
        MethodCase(
            "svd-llm",
            exact={"keep_singular_fraction": 1.0, "factorize_all": True},
            check=_factors_only_where_planned,
        ),
        MethodCase(
            "svd-llm-v2",
            exact={"keep_singular_fraction": 1.0, "factorize_all": True},
            check=_factors_only_where_planned,
        ),
        MethodCase(
            "kv-projection",
            exact={"rank_fraction": 1.0, "kv_method": "k-svd", "value_method": "v-svd"},
            kv_bytes=_kv_projection_bytes,
        ),
        MethodCase(
            "mla", exact=_full_mla(), kv_bytes=_mla_bytes, config={"kv_lora_rank": 8, "kv_fraction": None}
        ),
        MethodCase("quantize", config={"bits": 8, "group_size": 16}, check=_quantized_close),
        MethodCase("heal", before=(("svd-llm", {"ratio": 0.3}),), check=_healed_in_place),
    )
}
