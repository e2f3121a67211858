"""Methods plug in through the registry alone: a toy method defined here is found by the CLI, runs,
saves and reloads; and every registered method runs on every tiny architecture."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
from _tiny import save_tiny_model_dir
from conftest import ARCHITECTURES, make_tiny_model, random_tokens
from torch import nn

import lowrank.methods.base as base
import lowrank.nn.registry as replacements
from lowrank.cli import main
from lowrank.loading.serialization import load_compressed, save_compressed
from lowrank.methods import (
    CompressionResult,
    MethodConfig,
    ModuleKind,
    ModuleRecord,
    SVDConfig,
    SVDLLMConfig,
    compress,
    config_class,
    count_parameters,
    method_names,
    register_method,
)
from lowrank.methods.base import refusal
from lowrank.nn import register_replacement

pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def toy_method(monkeypatch):
    """Register a toy method and replacement module for one test (the registries are restored after)."""
    monkeypatch.setattr(base, "_METHODS", dict(base._METHODS))
    monkeypatch.setattr(replacements, "_REPLACEMENTS", dict(replacements._REPLACEMENTS))

    @register_replacement
    class ScaledLinear(nn.Module):
        """y = scale · (x Wᵀ + b); rebuilt from the module it replaces (its shape) and a spec (the scale)."""

        def __init__(self, linear: nn.Linear, scale: float) -> None:
            super().__init__()
            self.linear, self.scale = linear, scale

        def forward(self, x):
            return self.scale * self.linear(x)

        def replacement_spec(self) -> dict[str, Any]:
            return {"scale": self.scale}

        @classmethod
        def from_spec(cls, spec, *, original=None, model_config=None, device=None, dtype=None):
            assert model_config is not None  # the loader hands over the model config …
            shape = (original.in_features, original.out_features)  # … and the module being replaced
            return cls(
                nn.Linear(*shape, bias=original.bias is not None, device=device, dtype=dtype), spec["scale"]
            )

    @dataclass(kw_only=True)
    class ToyConfig(MethodConfig):
        """Scale every o_proj output."""

        method: ClassVar[str] = "toy-scale"
        example: ClassVar[dict[str, Any]] = {"scale": 0.5}
        scale: float = 1.0
        """Factor applied to the output of every attention output projection."""

        def __post_init__(self) -> None:
            super().__post_init__()
            if not self.scale > 0:
                raise ValueError(f"scale must be > 0; got {self.scale}")

    @register_method(ToyConfig)
    def compress_toy(model, config, ctx) -> CompressionResult:
        def process(index, layer, stats):
            layer.self_attn.o_proj = ScaledLinear(layer.self_attn.o_proj, config.scale)
            return {}

        records = ctx.layer_pass(None, process, desc="toy")
        modules = {
            f"model.layers.{r['layer']}.self_attn.o_proj": ModuleRecord(kind=ModuleKind.OTHER, role="o")
            for r in records
        }
        return CompressionResult(method=config.method, config=config.to_dict(), modules=modules)

    return ToyConfig


def test_a_method_registered_in_a_test_is_in_the_cli_runs_saves_and_reloads(toy_method, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    assert "toy-scale" in (help_text := capsys.readouterr().out) and "--scale" in help_text
    assert "Factor applied to the output" in help_text
    save_tiny_model_dir(tmp_path / "tiny", "llama")
    rc = main(
        [
            "compress",
            "--model",
            str(tmp_path / "tiny"),
            "--method",
            "toy-scale",
            "--scale",
            "0.25",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert rc == 0
    loaded, _ = load_compressed(tmp_path / "out")
    assert loaded.model.layers[1].self_attn.o_proj.scale == 0.25
    original, _ = load_compressed(tmp_path / "out")  # rebuilt twice: deterministic
    ids = random_tokens(1, 8)
    assert torch.equal(_logits(loaded, ids), _logits(original, ids))
    assert (
        main(["compress", "--model", str(tmp_path / "tiny"), "--method", "toy-scale", "--scale", "-1"]) == 2
    )
    assert "scale must be > 0; got -1.0" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("method", method_names())
def test_every_registered_method_on_every_architecture(tmp_path, arch, method):
    cls = config_class(method)
    # the stacking declaration: None (any) or registered method names
    assert cls.follows is None or (isinstance(cls.follows, tuple) and set(cls.follows) <= set(method_names()))
    model = make_tiny_model(arch)
    ids = random_tokens(2, 16, seed=7)
    reason = refusal(cls, model)
    if reason:  # refused up front, with one line saying why
        with pytest.raises(ValueError, match="does not support") as info:
            compress(model, cls(**cls.example), calibration=random_tokens(16, 48))
        assert reason in str(info.value) and "\n" not in str(info.value)
        return
    result = compress(
        model, cls(**cls.example), calibration=random_tokens(16, 48) if cls.calibrated else None
    )
    assert result.parameters_after == count_parameters(model)
    assert result.kv_bytes_per_token_before > 0 and result.kv_bytes_per_token_after > 0
    # every method makes something smaller: the weights or the KV cache
    assert (
        result.weight_bytes_after < result.weight_bytes_before
        or result.kv_bytes_per_token_after < result.kv_bytes_per_token_before
    )
    logits = _logits(model, ids)
    assert torch.isfinite(logits).all()
    save_compressed(model, tmp_path / "m")
    loaded, _ = load_compressed(tmp_path / "m")
    assert torch.equal(_logits(loaded, ids), logits)


def test_calibration_given_to_a_data_free_method_is_ignored_with_a_warning(caplog):
    ids = random_tokens(16, 48)
    a, b = make_tiny_model("llama"), make_tiny_model("llama")
    with caplog.at_level(logging.WARNING, logger="lowrank.methods.base"):
        compress(a, SVDConfig(ratio=0.5))
        assert not caplog.records
        compress(b, SVDConfig(ratio=0.5), calibration=ids)
    (record,) = caplog.records
    assert record.getMessage() == (
        "method 'svd' reads no calibration text with these settings; the calibration given is ignored"
    )
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    with caplog.at_level(logging.WARNING, logger="lowrank.methods.base"):
        caplog.clear()
        compress(make_tiny_model("llama"), SVDLLMConfig(ratio=0.5), calibration=ids)
    assert not caplog.records  # a calibrated method reads it, silently


def test_ranks_are_recorded_as_built_with_an_adaptive_decomposer():
    from lowrank.methods import SVDConfig

    model = make_tiny_model("llama")
    config = SVDConfig(keep_singular_fraction=0.5, decomposer={"name": "adaptive", "tol": 0.9})
    result = compress(model, config)
    built = {n: m.rank for n, m in model.named_modules() if hasattr(m, "rank")}
    assert {n: k for n, k in result.ranks.items() if k is not None} == built
    assert any(
        e.rank is not None and e.rank < e.planned_rank for e in result.modules.values()
    )  # the tolerance cut deeper
    linear = sum(p.numel() for layer in model.model.layers for p in layer.parameters()) - sum(
        p.numel() for layer in model.model.layers for n, p in layer.named_parameters() if "norm" in n
    )
    assert linear == result.details["linear_parameters_after"]
