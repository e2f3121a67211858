"""Load a causal LM and its tokenizer: built-in name, local directory, saved compressed model or hub id."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lowrank.assets import BUILTIN_MODELS, builtin_model_dir

__all__ = ["load_model", "resolve_dtype", "BUILTIN_MODELS"]

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Map ``'float32' | 'bfloat16' | 'float16'`` (or a ``torch.dtype`` of those) to a ``torch.dtype``."""
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}; got {dtype!r}")


def load_model(
    name_or_path: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32
):
    """Load a causal language model and its tokenizer, in eval mode.

    Args:
        name_or_path: one of
            * a built-in name (``'smollm2-135m'``): converted once into the cache, then loaded from it;
            * a directory written by this toolkit (it holds ``lowrank.json``): loaded by
              :func:`lowrank.serialization.load_compressed`, low-rank layers included;
            * a local Hugging Face model directory (it holds ``config.json``);
            * a Hugging Face hub id ``'org/name'`` (needs network access).
        device: where to put the model.
        dtype: ``torch.float32`` (default), ``torch.bfloat16`` or ``torch.float16`` (or their names).

    Returns:
        ``(model, tokenizer)``.

    Raises:
        ValueError: unknown name (the message lists the built-in names) or bad dtype.
    """
    dtype = resolve_dtype(dtype)
    name = str(name_or_path)
    if name in BUILTIN_MODELS:
        return _load_hf(builtin_model_dir(name), device, dtype)
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "lowrank.json").is_file():
            from lowrank.serialization import load_compressed

            return load_compressed(path, device=device, dtype=dtype)
        if (path / "config.json").is_file():
            return _load_hf(path, device, dtype)
        raise ValueError(f"{path} is a directory without config.json or lowrank.json; not a model directory")
    if _looks_like_hub_id(name):
        try:
            return _load_hf(name, device, dtype)
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"could not load {name!r} from the Hugging Face hub ({str(exc).splitlines()[0]}); "
                f"built-in models: {', '.join(BUILTIN_MODELS)}"
            ) from exc
    raise ValueError(
        f"unknown model {name!r}: not a built-in name, a local model directory or a hub id; "
        f"built-in models: {', '.join(BUILTIN_MODELS)}"
    )


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def _load_hf(source: str | Path, device: str | torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    model.to(device)
    model.eval()
    logger.debug("loaded %s (%s, %s)", source, dtype, device)
    return model, tokenizer
