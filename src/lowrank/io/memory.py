"""The memory a model needs, estimated from its config before it is built, against the memory available.

A config claiming 100,000 layers of width 4096 would otherwise be built for minutes before failing with a
traceback. :func:`check_model_fits` counts the parameters the config describes (embeddings, attention,
MLP, norms, output head; the Llama-shaped families the toolkit supports) times the bytes of the dtype, and
refuses in one line what exceeds the available RAM (``MemAvailable`` of ``/proc/meminfo``). Setting the
environment variable ``LOWRANK_IGNORE_MEMORY=1`` skips the check (swap, or an estimate known to be high).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = [
    "config_parameters",
    "available_bytes",
    "check_model_fits",
    "check_bytes_fit",
    "OVERRIDE",
    "OutOfMemoryError",
]

OVERRIDE = "LOWRANK_IGNORE_MEMORY"


class OutOfMemoryError(ValueError):
    """The estimated memory of a model exceeds the memory available (a one-line error, CLI exit 2)."""


def _field(config: Any, name: str, default: Any = None) -> Any:
    value = config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)
    return default if value is None else value


def config_parameters(config: Any) -> int | None:
    """Parameters a decoder-only config (a transformers config or its dict) describes, or None when it lacks
    the sizes (``hidden_size``, ``num_hidden_layers``, ``vocab_size``) to tell."""
    config = _field(config, "text_config", config)
    try:
        h = int(_field(config, "hidden_size"))
        layers = int(_field(config, "num_hidden_layers"))
        vocab = int(_field(config, "vocab_size"))
    except (TypeError, ValueError):
        return None
    heads = int(_field(config, "num_attention_heads", 1) or 1)
    kv_heads = int(_field(config, "num_key_value_heads", heads) or heads)
    head_dim = int(_field(config, "head_dim", h // heads if heads else h) or h // heads)
    inter = int(_field(config, "intermediate_size", 4 * h))
    attention = h * heads * head_dim * 2 + h * kv_heads * head_dim * 2
    mlp = 3 * h * inter
    per_layer = attention + mlp + 4 * h + 2 * head_dim  # norms (up to four per layer, q/k norms)
    head = 0 if _field(config, "tie_word_embeddings", True) else vocab * h
    return vocab * h + head + layers * per_layer + h


def available_bytes() -> int | None:
    """Memory available to a new allocation (``MemAvailable``), or None when the system does not say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - no psutil, or it cannot tell: no estimate
        return None


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_bytes_fit(needed: int, source: Any, what: str) -> None:
    """Refuse (one line naming ``source``) ``needed`` bytes of ``what`` beyond the available memory.

    Raises:
        OutOfMemoryError: the estimate exceeds the available memory and ``LOWRANK_IGNORE_MEMORY`` is not set.
    """
    if os.environ.get(OVERRIDE, "").strip() not in ("", "0"):
        return
    available = available_bytes()
    if available is None or needed <= available:
        return
    raise OutOfMemoryError(
        f"{source}: {what} needs about {_gib(needed)} of memory, {_gib(available)} is available; use a "
        f"smaller model or a smaller dtype, or set {OVERRIDE}=1 to try anyway"
    )


def check_model_fits(config: Any, dtype: Any, source: Any) -> int | None:
    """Refuse a model whose parameters (from ``config``) in ``dtype`` cannot fit in the available memory.

    Returns:
        The estimated bytes, or None when the config does not tell.

    Raises:
        OutOfMemoryError: (one line naming ``source``, the parameter count and both sizes) it cannot fit.
    """
    import torch

    parameters = config_parameters(config)
    if parameters is None:
        return None
    itemsize = dtype.itemsize if isinstance(dtype, torch.dtype) else torch.empty(0, dtype=dtype).itemsize
    needed = parameters * itemsize
    layers = _field(_field(config, "text_config", config), "num_hidden_layers")
    what = f"the model its config describes ({parameters:,} parameters, {layers} layers)"
    check_bytes_fit(needed, source, what)
    return needed
