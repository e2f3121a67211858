"""One verb for every method: ``compress(model, config, calibration=...)``.

A method is a small keyword-only config dataclass plus a handler registered for it with
:func:`register_method`; :func:`compress` dispatches on the config's type, so adding a method never
touches this file. Configs round-trip through ``to_dict``/``from_dict`` (the same dict is what
``--config file.json`` loads and what a saved model records), and the command line derives each
method's flags from its dataclass (``lowrank.cli._flags``).

Methods stack: ``compress`` may be applied several times to one model (say ``svd-llm`` on the MLP, then
an attention method); the model remembers the ordered list of applied configs (:func:`applied_methods`),
which ``save_compressed`` records and ``load_model`` restores.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from lowrank.calibration.pipeline import RunContext
from lowrank.core.config import Config
from lowrank.methods.records import ModuleRecord
from lowrank.nn.accounting import count_parameters, weight_bytes
from lowrank.nn.history import applied_methods, applied_summaries, set_applied_methods

logger = logging.getLogger(__name__)

__all__ = [
    "MethodConfig",
    "CompressionResult",
    "register_method",
    "compress",
    "config_from_dict",
    "config_class",
    "method_names",
    "count_parameters",
    "weight_bytes",
    "applied_methods",
    "refusal",
    "applied_summaries",
]

Handler = Callable[[nn.Module, "MethodConfig", RunContext], "CompressionResult"]
_METHODS: dict[str, tuple[type[MethodConfig], Handler]] = {}

C = TypeVar("C", bound="type[MethodConfig]")


@dataclass(kw_only=True)
class MethodConfig(Config):
    """Base class of method configs. Subclasses set ``method`` (the registry name) as a ClassVar.

    Field checks (types, ``choices``, ``range``, ``exclusive`` groups) and the versioned dict form come
    from :class:`lowrank.core.config.Config`. A field whose type is a config dataclass
    (``CalibrationConfig``, ``DecomposerConfig``) is nested: its dict form is converted on construction,
    so ``from_dict`` and the CLI need no per-method code.
    """

    method: ClassVar[str] = ""
    calibrated: ClassVar[bool] = False
    """The method needs calibration data (its config has a ``calibration`` field)."""
    follows: ClassVar[tuple[str, ...] | None] = None
    """The methods this one may be applied after (None: any). A model that holds any other applied method
    is refused in one line before any work (e.g. an attention method after ``quantize``)."""
    detail_labels: ClassVar[dict[str, str]] = {}
    """How the report words the identifier keys of the result's ``details`` (default: the key itself)."""
    example: ClassVar[dict[str, Any]] = {}
    """Keyword arguments of a small valid config (the method × architecture test matrix uses it)."""

    @classmethod
    def config_label(cls) -> str:
        return cls.method or cls.__name__

    @classmethod
    def unsupported(cls, model: nn.Module) -> str | None:
        """Why the method cannot be applied to ``model`` (one line), or ``None``; checked before any work."""
        return None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict with ``"method"`` and ``"version"`` keys; nested configs carry their own version."""
        return {"method": self.method, **super().to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MethodConfig:
        """Inverse of :meth:`to_dict` for any version this code reads (unknown keys raise a one-line
        ``ValueError``)."""
        if not isinstance(data, dict):
            raise ValueError(f"a method config must be a JSON object; got {type(data).__name__}")
        data = dict(data)
        method = data.pop("method", cls.method)
        if method != cls.method:
            raise ValueError(f"config is for method {method!r}, not {cls.method!r}")
        return super().from_dict(data)


@dataclass(kw_only=True)
class CompressionResult:
    """What one ``compress`` call did: a common core for every method plus method-specific ``details``.

    Parameter and byte counts are measured on the model before and after (tied weights counted once);
    ``modules`` describes every module the method replaced, with ranks as built.
    """

    method: str
    config: dict[str, Any]
    parameters_before: int = 0
    parameters_after: int = 0
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0
    kv_bytes_per_token_before: float | None = None
    """KV-cache bytes per token of the model's cache (the installed cache class, else the default)."""
    kv_bytes_per_token_after: float | None = None
    modules: dict[str, ModuleRecord] = field(default_factory=dict)
    """Per targeted module, a typed record: kind, role, shape, rank as built (None if kept dense), loss,
    fallback and the method's own metrics."""
    details: dict[str, Any] = field(default_factory=dict)
    """Method-specific figures (ratio conventions, allocation, …)."""
    fallbacks: int = 0
    fallback_modules: list[str] = field(default_factory=list)
    calibration_tokens: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    time_total_s: float = 0.0

    @property
    def ranks(self) -> dict[str, int | None]:
        return {name: record.rank for name, record in self.modules.items()}

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["modules"] = {name: record.to_dict() for name, record in self.modules.items()}
        return out

    def summary(self) -> dict[str, Any]:
        """The flat summary written by ``lowrank compress --json`` (no per-module table)."""
        out = {k: v for k, v in self.to_dict().items() if k not in ("modules", "details")}
        out.update(self.details)
        out["ranks"] = self.ranks
        out.update({f"time_{k}_s": v for k, v in self.timings.items()})
        return out


def register_method(config_cls: C) -> Callable[[Handler], Handler]:
    """Decorator registering ``handler(model, config, ctx: RunContext) -> CompressionResult``."""
    if not config_cls.method:
        raise ValueError(f"{config_cls.__name__} must set the ClassVar 'method' to register")

    def decorator(handler: Handler) -> Handler:
        _METHODS[config_cls.method] = (config_cls, handler)
        return handler

    return decorator


def method_names() -> list[str]:
    """Names of the registered methods."""
    return sorted(_METHODS)


def config_class(name: str) -> type[MethodConfig]:
    """The config class of the method called ``name``."""
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(method_names())}")
    return _METHODS[name][0]


def config_from_dict(data: dict[str, Any]) -> MethodConfig:
    """Build the config of the method named in ``data["method"]``.

    A dict without a ``"version"`` key is read in the current form, as a user writes it (``{"method":
    "mla", "rope_dim": 32}`` gets today's defaults); one with a version, as every config lowrank saves
    carries, is migrated from that version. ``MethodConfig.from_dict`` itself reads a dict without a
    version as version 0 (saved before versions existed)."""
    if not isinstance(data, dict):
        raise ValueError(
            f"a method config must be a JSON object with a 'method' key; got {type(data).__name__}"
        )
    cls = config_class(data.get("method"))
    return cls.from_dict({"version": cls.version, **data})


def _kv_bytes(model: nn.Module) -> float | None:
    from lowrank.attention.cache import kv_bytes_per_token

    try:
        return kv_bytes_per_token(model)
    except ValueError:  # not a model with a known attention layout
        return None


def _stacking_problem(cls: type[MethodConfig], applied: list[dict[str, Any]]) -> str | None:
    """Why ``cls`` cannot follow the methods already ``applied`` (its ``follows`` declaration), or None."""
    if cls.follows is None:
        return None
    for earlier in applied:
        name = earlier.get("method") if isinstance(earlier, dict) else None
        if name not in cls.follows:
            allowed = ", ".join(cls.follows) or "none: an unmodified model only"
            return f"it cannot be applied after {name!r} (it may follow: {allowed})"
    return None


def refusal(cls: type[MethodConfig], model: nn.Module) -> str | None:
    """Why ``compress`` would refuse method ``cls`` on ``model`` before any work (one line), or None.

    The method's ``follows`` declaration against the methods already applied, then its ``unsupported``
    check. Tools that prepare a method (``kv-analyze`` for ``kv-projection``) refuse the same models.
    """
    reason = _stacking_problem(cls, applied_methods(model)) or cls.unsupported(model)
    if reason:
        return f"method {cls.method!r} does not support {type(model).__name__}: {reason}"
    return None


def compress(
    model: nn.Module,
    config: MethodConfig,
    *,
    calibration: Any = None,
    device: torch.device | str | None = None,
    checkpoint_dir: Any = None,
) -> CompressionResult:
    """Compress ``model`` in place with the method configured by ``config``.

    Args:
        model: a causal LM (Llama-like layout); its weights may stay on CPU.
        config: a registered method config (``SVDConfig``, ``SVDLLMConfig``, ``SVDLLMV2Config``, …).
        calibration: (samples, seq_len) token ids, or ``CalibrationStatistics`` precomputed on the unchanged
            model (non-sequential mode, reusable across configurations); data-free methods ignore it
            (with a warning).
        device: compute device; layers visit it one at a time (default: the model's device).
        checkpoint_dir: save after every layer and resume an interrupted run from there.

    Returns:
        A :class:`CompressionResult` (parameters, bytes, ranks as built, time breakdown, fallbacks).
    """
    entry = _METHODS.get(getattr(type(config), "method", ""))
    if entry is None or not isinstance(config, entry[0]):
        raise ValueError(
            f"no compression method registered for {type(config).__name__}; "
            f"available: {', '.join(method_names())}"
        )
    from lowrank.linalg import fallback_counts

    reason = refusal(type(config), model)
    if reason:
        raise ValueError(reason)
    if calibration is not None and not config.calibrated:
        logger.warning(
            "method %r reads no calibration text with these settings; the calibration given is ignored",
            config.method,
        )
    ctx = RunContext(model, calibration=calibration, device=device, checkpoint_dir=checkpoint_dir)
    parameters, size, kv = count_parameters(model), weight_bytes(model), _kv_bytes(model)
    before = fallback_counts()
    start = time.perf_counter()
    result = entry[1](model, config, ctx)
    result.time_total_s = round(time.perf_counter() - start, 4)
    after = fallback_counts()
    decomposer_fallbacks = {k: v - before.get(k, 0) for k, v in after.items() if v > before.get(k, 0)}
    if decomposer_fallbacks:
        result.details["decomposer_fallbacks"] = decomposer_fallbacks
    result.parameters_before, result.parameters_after = parameters, count_parameters(model)
    result.weight_bytes_before, result.weight_bytes_after = size, weight_bytes(model)
    result.kv_bytes_per_token_before, result.kv_bytes_per_token_after = kv, _kv_bytes(model)
    result.calibration_tokens = result.calibration_tokens or ctx.tokens
    result.timings = {**ctx.timings.to_dict(), "total": result.time_total_s}
    set_applied_methods(
        model, [*applied_methods(model), config.to_dict()], [*applied_summaries(model), result.summary()]
    )
    return result
