"""Save a compressed model as a plain directory and rebuild it exactly.

Layout of a saved directory (written atomically as a whole):

* ``model.safetensors``: the state dict (tied weights stored once);
* ``config.json``: the base architecture's transformers config;
* ``lowrank.json``: format version, every replaced module's class and shape spec (ranks), the method
  config and the compression summary;
* tokenizer files when a tokenizer is given.

Loading builds the base architecture with empty (meta) parameters, swaps in the registered replacement
modules recorded in ``lowrank.json`` (``LowRankLinear`` and any module registered later), and loads the
state dict strictly, so the rebuilt model computes exactly what the saved one did.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank.io import atomic_dir, write_json
from lowrank.nn import build_replacement, describe_replacement
from lowrank.surgery import replace_module

__all__ = ["save_compressed", "load_compressed", "is_compressed_dir", "FORMAT_VERSION", "MANIFEST"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "lowrank.json"
WEIGHTS = "model.safetensors"


def is_compressed_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by :func:`save_compressed`."""
    return (Path(path) / MANIFEST).is_file()


def _replaced_modules(model: nn.Module) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        if not name or any(name.startswith(f + ".") for f in found):
            continue
        desc = describe_replacement(module)
        if desc is not None:
            found[name] = desc
    return found


def _state_without_ties(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict with each shared storage saved once, plus {dropped_name: kept_name}."""
    state, ties, seen = {}, {}, {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype, tensor.device)
        if tensor.numel() and key in seen:
            ties[name] = seen[key]
            continue
        seen[key] = name
        state[name] = tensor.detach().cpu().contiguous()
    return state, ties


def save_compressed(
    model: nn.Module, out_dir: str | Path, *, tokenizer: Any = None, result: Any = None
) -> Path:
    """Write ``model`` (a transformers causal LM, possibly with replaced modules) to ``out_dir``.

    Args:
        model: the (compressed) model; must have a transformers ``config``.
        out_dir: target directory, replaced atomically if it exists.
        tokenizer: optional tokenizer saved alongside.
        result: optional ``CompressionResult``; its config and summary go into ``lowrank.json``.

    Returns:
        The directory path.
    """
    from safetensors.torch import save_file

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ValueError(
            f"save_compressed needs a transformers model with a config; got {type(model).__name__}"
        )
    state, ties = _state_without_ties(model)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in state.values() if t.is_floating_point()})
    manifest = {
        "format_version": FORMAT_VERSION,
        "modules": _replaced_modules(model),
        "tied": ties,
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "attn_implementation": getattr(config, "_attn_implementation", None),
        "method": None if result is None else result.config,
        "summary": None if result is None else result.summary(),
    }
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        write_json(tmp / "config.json", config.to_dict())
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        write_json(tmp / MANIFEST, manifest)
    logger.info("saved compressed model (%d replaced modules) to %s", len(manifest["modules"]), out)
    return out


def load_compressed(
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
) -> tuple[nn.Module, Any]:
    """Rebuild a model saved by :func:`save_compressed`; returns ``(model, tokenizer or None)``.

    Args:
        path: directory written by :func:`save_compressed`.
        device: where the model is placed.
        dtype: floating dtype of the parameters.
        attn_implementation: attention kernel (default: the one the saved model used, so logits match).

    Raises:
        FileNotFoundError: ``path`` holds no ``lowrank.json``.
        ValueError: unsupported format version, or the weights do not fit the recorded modules.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not is_compressed_dir(path):
        raise FileNotFoundError(f"{str(path)!r} is not a compressed model directory (no {MANIFEST})")
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path / MANIFEST}: format_version {manifest.get('format_version')!r} is not supported "
            f"(this version reads {FORMAT_VERSION})"
        )
    from accelerate import init_empty_weights

    config = AutoConfig.from_pretrained(str(path))
    # parameters on meta (no init cost), buffers (rotary frequencies, …) computed for real on CPU
    attn = attn_implementation or manifest.get("attn_implementation")
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, **({"attn_implementation": attn} if attn else {})
        )
    for name, desc in manifest["modules"].items():
        replace_module(model, name, build_replacement(desc, device="meta", dtype=dtype))
    state = {
        k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(str(path / WEIGHTS)).items()
    }
    for dropped, kept in manifest.get("tied", {}).items():
        state[dropped] = state[kept]
    _load_state(model, state, path)
    model.to(device).eval()
    return model, _load_tokenizer(path)


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{path / WEIGHTS} does not fit the recorded architecture: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    model.load_state_dict(state, strict=True, assign=True)
    if "tie_word_embeddings" in model.config.to_dict() and model.config.tie_word_embeddings:
        model.tie_weights()


def _load_tokenizer(path: Path) -> Any:
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
