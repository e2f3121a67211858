"""One verb for every method: ``compress(model, config, calibration=...)``.

A method is a small keyword-only config dataclass plus a handler registered for it with
:func:`register_method`; :func:`compress` dispatches on the config's type, so adding a method never
touches this file. Configs round-trip through ``to_dict``/``from_dict`` (the same dict is what
``--config file.json`` loads and what a saved model records).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

__all__ = [
    "MethodConfig",
    "CompressionResult",
    "register_method",
    "compress",
    "config_from_dict",
    "method_names",
    "count_parameters",
]

_METHODS: dict[str, tuple[type[MethodConfig], Callable[..., CompressionResult]]] = {}

C = TypeVar("C", bound="type[MethodConfig]")


@dataclass(kw_only=True)
class MethodConfig:
    """Base class of method configs. Subclasses set ``method`` (the registry name) as a ClassVar."""

    method: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict with a ``"method"`` key; nested configs serialise through their ``to_dict``."""
        out: dict[str, Any] = {"method": self.method}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if hasattr(value, "to_dict"):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodConfig:
        """Inverse of :meth:`to_dict` (unknown keys raise a one-line ``ValueError``)."""
        data = dict(data)
        method = data.pop("method", cls.method)
        if method != cls.method:
            raise ValueError(f"config is for method {method!r}, not {cls.method!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown field(s) {unknown} for method {cls.method!r}; valid: {sorted(names)}")
        return cls(**data)


@dataclass(kw_only=True)
class CompressionResult:
    """What a compression did. Ratios follow SVD-LLM: fraction of parameters REMOVED."""

    method: str
    config: dict[str, Any]
    decomposer: dict[str, Any] | None
    ratio_target: float | None
    """Requested fraction of targeted linear parameters removed (None when a keep fraction was given)."""
    ratio_params_removed: float
    """Achieved fraction of the targeted linear layers' parameters removed."""
    keep_singular_fraction_target: float | None
    keep_singular_fraction: float
    """Achieved Σ ranks / Σ min(m, n) over targeted matrices (dense-kept ones count as full)."""
    parameters_before: int
    parameters_after: int
    linear_parameters_before: int
    linear_parameters_after: int
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per targeted module: kind, shape, rank (None if kept dense), loss, fallback."""
    dense_kept: list[str] = field(default_factory=list)
    fallbacks: int = 0
    fallback_modules: list[str] = field(default_factory=list)
    calibration_tokens: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    time_total_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def time_decomposition_s(self) -> float:
        return self.timings.get("decomposition", 0.0)

    @property
    def ranks(self) -> dict[str, int | None]:
        return {name: info.get("rank") for name, info in self.modules.items()}

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["decomposer_name"] = (self.decomposer or {}).get("name")
        out["time_decomposition_s"] = self.time_decomposition_s
        return out

    def summary(self) -> dict[str, Any]:
        """The flat summary written by ``lowrank compress --json`` (no per-module table)."""
        out = {k: v for k, v in self.to_dict().items() if k not in ("modules", "extra")}
        out["ranks"] = self.ranks
        out.update({f"time_{k}_s": v for k, v in self.timings.items()})
        return out


def register_method(
    config_cls: C,
) -> Callable[[Callable[..., CompressionResult]], Callable[..., CompressionResult]]:
    """Decorator registering ``handler(model, config, *, calibration, device, checkpoint_dir)``."""
    if not config_cls.method:
        raise ValueError(f"{config_cls.__name__} must set the ClassVar 'method' to register")

    def decorator(handler: Callable[..., CompressionResult]) -> Callable[..., CompressionResult]:
        _METHODS[config_cls.method] = (config_cls, handler)
        return handler

    return decorator


def method_names() -> list[str]:
    """Names of the registered methods."""
    return sorted(_METHODS)


def config_from_dict(data: dict[str, Any]) -> MethodConfig:
    """Build the config of the method named in ``data["method"]``."""
    name = data.get("method")
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(method_names())}")
    return _METHODS[name][0].from_dict(data)


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters of ``model`` (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def compress(
    model: nn.Module,
    config: MethodConfig,
    *,
    calibration: Any = None,
    device: torch.device | str | None = None,
    checkpoint_dir: str | Path | None = None,
) -> CompressionResult:
    """Compress ``model`` in place with the method configured by ``config``.

    Args:
        model: a causal LM (Llama-like layout); its weights may stay on CPU.
        config: a registered method config (``SVDConfig``, ``SVDLLMConfig``, ``SVDLLMV2Config``, …).
        calibration: (samples, seq_len) token ids, or statistics precomputed by
            ``lowrank.methods.collect_gram_statistics`` (non-sequential mode, reusable across ratios);
            data-free methods ignore it.
        device: compute device; layers visit it one at a time (default: the model's device).
        checkpoint_dir: save after every layer and resume an interrupted run from there.

    Returns:
        A :class:`CompressionResult` (ranks, parameters, time breakdown, fallbacks).
    """
    entry = _METHODS.get(getattr(type(config), "method", ""))
    if entry is None or not isinstance(config, entry[0]):
        raise ValueError(
            f"no compression method registered for {type(config).__name__}; "
            f"available: {', '.join(method_names())}"
        )
    from lowrank.linalg import fallback_counts

    before = fallback_counts()
    start = time.perf_counter()
    result = entry[1](model, config, calibration=calibration, device=device, checkpoint_dir=checkpoint_dir)
    result.time_total_s = round(time.perf_counter() - start, 4)
    after = fallback_counts()
    decomposer_fallbacks = {k: v - before.get(k, 0) for k, v in after.items() if v > before.get(k, 0)}
    if decomposer_fallbacks:
        result.extra["decomposer_fallbacks"] = decomposer_fallbacks
    result.timings["total"] = result.time_total_s
    return result
