"""The KV cache a model decodes with: a registry of cache classes, the model's installed cache, its bytes.

A method that compresses the KV cache (low-rank K/V projections, latent attention) ships its own
``transformers.Cache`` subclass. It registers the class once::

    @register_cache
    class LatentCache(DynamicCache):
        def __init__(self, config=None, *, rank: int): ...

        @classmethod
        def bytes_per_token(cls, model, *, rank): ...  # optional, analytic

and installs it on the model it compressed: ``install_cache(model, "LatentCache", {"rank": 64})``. From then
on ``model.generate(...)``, :func:`lowrank.evaluation.throughput` and :func:`lowrank.evaluation.memory_report`
all decode with a fresh ``LatentCache(config=model.config, rank=64)``, and :func:`installed_cache` gives the
JSON-able description ``{"class": "LatentCache", "spec": {"rank": 64}}`` that a saved model records so that
loading it can install the same cache again.

How ``generate`` picks the cache up: ``generate`` accepts a ready ``Cache`` object through its documented
``cache=`` argument. :func:`install_cache` sets an instance attribute ``generate`` on this one model (the
class is untouched) that passes ``cache=make_cache(model)`` whenever the caller passed no cache, no
``cache_implementation`` and did not turn the cache off, then calls the class's ``generate``.
:func:`uninstall_cache` deletes the attribute. (transformers 5.24 has no registry of cache implementations:
``cache_implementation`` accepts a fixed list of names, and ``_prepare_cache_for_generation`` is private.)
"""

from __future__ import annotations

import inspect
import json
import logging
import types
from typing import Any

import torch
from torch import nn
from transformers import Cache, DynamicCache
from transformers.cache_utils import get_layer_types_and_kwargs

from lowrank.nn.attention_layout import attention_shape

__all__ = [
    "register_cache",
    "registered_caches",
    "unregister_cache",
    "install_cache",
    "installed_cache",
    "uninstall_cache",
    "make_cache",
    "cache_argument",
    "kv_bytes_per_token",
    "default_kv_bytes_per_token",
]

logger = logging.getLogger(__name__)

_REGISTRY: dict[str, type[Cache]] = {}
_INSTALLED = "_lowrank_installed_cache"  # instance attribute: {"class": name, "spec": {...}}

#: Layer types (``config.layer_types``) whose dynamic cache keeps a window of recent tokens.
_WINDOWED = ("sliding_attention", "chunked_attention")


def register_cache(cls: type[Cache] | None = None, *, name: str | None = None):
    """Register a ``transformers.Cache`` subclass under ``name`` (default: the class name).

    Usable as ``@register_cache``, ``@register_cache(name="...")`` or ``register_cache(cls)``.

    Contract of a registered class:
        - built as ``cls.from_model(model, **spec)`` when it defines that classmethod, else as
          ``cls(config=model.config, **spec)``; ``spec`` is a JSON-able dict of keyword arguments;
        - optionally a classmethod ``bytes_per_token(model, **spec) -> float`` giving its analytic
          footprint per token and sequence (see :func:`kv_bytes_per_token`).

    Returns:
        ``cls`` (so it works as a decorator).

    Raises:
        ValueError: ``cls`` is not a ``Cache`` subclass, or ``name`` is taken by another class.
    """
    if cls is None:
        return lambda c: register_cache(c, name=name)
    if not (isinstance(cls, type) and issubclass(cls, Cache)):
        raise ValueError(f"register_cache needs a transformers.Cache subclass; got {cls!r}")
    key = name or cls.__name__
    if _REGISTRY.get(key, cls) is not cls:
        raise ValueError(f"cache name {key!r} is already registered to {_REGISTRY[key].__qualname__}")
    _REGISTRY[key] = cls
    return cls


def registered_caches() -> dict[str, type[Cache]]:
    """Name → class of every registered cache (a copy)."""
    return dict(_REGISTRY)


def unregister_cache(name: str) -> None:
    """Remove ``name`` from the registry (a no-op for an unknown name); installed models keep their
    description but can no longer build the cache."""
    _REGISTRY.pop(name, None)


def _resolve(cache: str | type[Cache]) -> tuple[str, type[Cache]]:
    if isinstance(cache, str):
        if cache not in _REGISTRY:
            known = ", ".join(sorted(_REGISTRY)) or "none"
            raise ValueError(f"unknown cache class {cache!r}; registered: {known}")
        return cache, _REGISTRY[cache]
    names = [n for n, c in _REGISTRY.items() if c is cache]
    if not names:
        raise ValueError(
            f"cache class {getattr(cache, '__qualname__', cache)!r} is not registered; "
            "decorate it with @lowrank.attention.cache.register_cache first"
        )
    return names[0], cache


def _build(model: nn.Module, cls: type[Cache], spec: dict[str, Any], **kwargs) -> Cache:
    if hasattr(cls, "from_model"):
        return cls.from_model(model, **spec, **kwargs)
    return cls(config=model.config, **spec, **kwargs)


def install_cache(model: nn.Module, cache: str | type[Cache], spec: dict[str, Any] | None = None) -> None:
    """Make ``model`` decode with the registered cache class ``cache`` built from ``spec``.

    Replaces any cache installed before. ``spec`` must be JSON-able and accepted by the class: a cache is
    built once here, so a bad spec fails now rather than at the first ``generate``.

    Args:
        model: a causal LM.
        cache: a registered name, or a registered class.
        spec: keyword arguments of the class's constructor (default: none).

    Raises:
        ValueError: unknown name or unregistered class (the message lists the registered names), a spec
            that is not a JSON-able dict, or a spec the class rejects.
    """
    name, cls = _resolve(cache)
    spec = dict(spec or {})
    try:
        spec = json.loads(json.dumps(spec))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"cache spec must be a JSON-able dict; got {spec!r} ({exc})") from None
    try:
        _build(model, cls, spec)
    except TypeError as exc:
        raise ValueError(f"cache class {name!r} rejected spec {spec!r}: {exc}") from None
    model.__dict__[_INSTALLED] = {"class": name, "spec": spec}
    model.__dict__["generate"] = types.MethodType(_generate_with_installed_cache, model)


def installed_cache(model: nn.Module) -> dict[str, Any] | None:
    """The JSON-able description ``{"class": name, "spec": {...}}`` of the installed cache, or ``None``."""
    desc = model.__dict__.get(_INSTALLED)
    return None if desc is None else json.loads(json.dumps(desc))


def uninstall_cache(model: nn.Module) -> None:
    """Return ``model`` to the default cache (``DynamicCache``); a no-op when nothing is installed."""
    model.__dict__.pop(_INSTALLED, None)
    generate = model.__dict__.get("generate")
    if getattr(generate, "__func__", None) is _generate_with_installed_cache:
        del model.__dict__["generate"]


def make_cache(model: nn.Module, **kwargs) -> Cache:
    """A fresh, empty cache for ``model``: the installed class, else ``DynamicCache(config=model.config)``.

    Args:
        model: a causal LM.
        **kwargs: extra constructor arguments (e.g. ``offloading=True`` for ``DynamicCache``).
    """
    desc = model.__dict__.get(_INSTALLED)
    if desc is None:
        return DynamicCache(config=model.config, **kwargs)
    _, cls = _resolve(desc["class"])
    return _build(model, cls, desc["spec"], **kwargs)


def cache_argument(model: nn.Module) -> str:
    """Name of the keyword that passes a cache to ``model``'s forward: ``'cache'`` (transformers >= 5.x)
    or, for a model whose forward predates the rename, ``'past_key_values'``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params or "past_key_values" not in params else "past_key_values"


def _generate_with_installed_cache(model: nn.Module, *args, **kwargs):
    """``type(model).generate`` with ``cache=make_cache(model)`` unless the caller chose the cache."""
    config = kwargs.get("generation_config") or (args[1] if len(args) > 1 else None)
    config = config or model.generation_config
    chose_cache = any(kwargs.get(k) is not None for k in ("cache", "past_key_values"))
    use_cache = kwargs.get("use_cache", getattr(config, "use_cache", True))
    implementation = kwargs.get("cache_implementation", getattr(config, "cache_implementation", None))
    if not chose_cache and use_cache is not False:
        if implementation is None:
            kwargs["cache"] = make_cache(model)
        else:
            logger.warning(
                "cache_implementation=%r overrides the installed cache %s",
                implementation,
                model.__dict__[_INSTALLED]["class"],
            )
    return type(model).generate(model, *args, **kwargs)


def kv_bytes_per_token(model: nn.Module) -> float:
    """Analytic KV-cache bytes per token (per sequence) of the cache ``model`` decodes with.

    The installed class answers through its ``bytes_per_token`` classmethod when it has one. Otherwise the
    default ``DynamicCache`` formula: each attention layer holds K and V, ``2 x kv_heads x head_dim x
    element size`` bytes per token, in the model's dtype; layers that reuse another layer's KV hold nothing.

    Sliding-window (and chunked) layers are counted like full layers. That is exact for contexts within the
    window, and also what ``DynamicCache`` holds right after a prefill of any length: its sliding layer keeps
    the last ``window - 1`` tokens as a view that pins the storage of the whole prefill. Once decoding runs
    past the window, each sliding layer's storage settles at ``window`` tokens, so the figure is then an
    upper bound.

    Args:
        model: a causal LM.

    Returns:
        Bytes per token; equal to ``memory_report(model).kv_cache_bytes_per_token``.

    Raises:
        ValueError: a layer type with no formula (e.g. linear attention) and no ``bytes_per_token`` on the
            installed class.
    """
    desc = model.__dict__.get(_INSTALLED)
    if desc is not None:
        _, cls = _resolve(desc["class"])
        if hasattr(cls, "bytes_per_token"):
            return float(cls.bytes_per_token(model, **desc["spec"]))
    return default_kv_bytes_per_token(model)


def default_kv_bytes_per_token(model: nn.Module) -> float:
    """:func:`kv_bytes_per_token` of the default ``DynamicCache(config=model.config)``, whatever is
    installed (a cache class's ``bytes_per_token`` may build on it)."""
    config = model.config.get_text_config(decoder=True)
    shape = attention_shape(config)
    element = torch.empty((), dtype=_model_dtype(model)).element_size()
    per_layer = 2 * shape.num_kv_heads * shape.head_dim * element
    layer_types, _ = get_layer_types_and_kwargs(config)
    unknown = sorted(set(layer_types) - {"full_attention", "dummy", *_WINDOWED})
    if unknown:
        raise ValueError(
            f"no KV-bytes formula for layer type {unknown[0]!r} (known: full_attention, "
            f"{', '.join(_WINDOWED)}, dummy); install a cache class with a bytes_per_token method"
        )
    return float(per_layer * sum(t != "dummy" for t in layer_types))


def _model_dtype(model: nn.Module) -> torch.dtype:
    dtype = getattr(model, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else next(model.parameters()).dtype
