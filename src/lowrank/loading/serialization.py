"""Save a compressed model as a plain directory and rebuild it exactly.

Layout of a saved directory (written atomically as a whole):

* ``model.safetensors``: the state dict (tied weights stored once);
* ``config.json``: the base architecture's transformers config;
* ``lowrank.json``: format version; every replaced module's class and shape spec (ranks), outer modules
  before the modules nested in them; the ordered list of applied method configs (methods stack); the
  installed KV-cache class; the compression summaries; and the size and SHA-256 of every file written;
* tokenizer files when a tokenizer is given.

Loading verifies the recorded sizes and checksums, builds the base architecture with empty (meta)
parameters, swaps in the registered replacement modules (each receives the module it replaces and the
model config), reinstalls the cache class, and loads the state dict strictly, so the rebuilt model
computes exactly what the saved one did. Nothing from the directory is executed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowrank.io.files import atomic_dir, check_output_dir, sha256_file, write_json
from lowrank.nn import build_replacement, describe_replacements
from lowrank.nn.attention_layout import attention_implementation
from lowrank.nn.surgery import get_module, replace_module

__all__ = ["save_compressed", "load_compressed", "is_compressed_dir", "FORMAT_VERSION", "MANIFEST"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
MANIFEST = "lowrank.json"
WEIGHTS = "model.safetensors"


def is_compressed_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by :func:`save_compressed`."""
    return (Path(path) / MANIFEST).is_file()


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


def file_digest(path: Path) -> dict[str, Any]:
    """``{"size": bytes, "sha256": hex}`` of a file."""
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def save_compressed(
    model: nn.Module,
    out_dir: str | Path,
    *,
    tokenizer: Any = None,
    result: Any = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (a transformers causal LM, possibly with replaced modules) to ``out_dir``.

    Args:
        model: the (compressed) model; must have a transformers ``config``.
        out_dir: target directory: new, empty, or an earlier output of this toolkit (replaced atomically).
        tokenizer: optional tokenizer saved alongside.
        result: a ``CompressionResult`` to record when the model's own record of applied methods is empty
            (models compressed by :func:`lowrank.compress` carry theirs).
        overwrite: also replace a non-empty directory this toolkit did not write.

    Returns:
        The directory path.

    Raises:
        ValueError: not a transformers model, or ``out_dir`` is unusable or holds a user's files.
    """
    from safetensors.torch import save_file

    from lowrank.attention.cache import installed_cache
    from lowrank.nn.history import applied_methods, applied_summaries

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ValueError(
            f"save_compressed needs a transformers model with a config; got {type(model).__name__}"
        )
    out = check_output_dir(out_dir, overwrite=overwrite)
    state, ties = _state_without_ties(model)
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in state.values() if t.is_floating_point()})
    summaries = applied_summaries(model)
    if result is not None and not summaries:  # a result not produced by lowrank.compress
        summaries = [result.summary()]
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "modules": describe_replacements(model),
        "tied": ties,
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "attn_implementation": attention_implementation(config),
        "methods": applied_methods(model),
        "cache": installed_cache(model),
        "summaries": summaries,
    }
    with atomic_dir(out) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        write_json(tmp / "config.json", config.to_dict())
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        manifest["files"] = {
            p.relative_to(tmp).as_posix(): file_digest(p) for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        write_json(tmp / MANIFEST, manifest)
    logger.info("saved compressed model (%d replaced modules) to %s", len(manifest["modules"]), out)
    return out


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The checked ``lowrank.json`` of a saved directory (one-line ``ValueError`` naming the file)."""
    file = Path(path) / MANIFEST
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file}: not a readable JSON manifest ({exc})") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{file}: expected a JSON object; got {type(manifest).__name__}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{file}: format_version {manifest.get('format_version')!r} is not supported "
            f"(this version reads {FORMAT_VERSION}; re-save the model with this version)"
        )
    for key, kind in (("modules", dict), ("tied", dict), ("methods", list), ("files", dict)):
        if not isinstance(manifest.get(key), kind):
            raise ValueError(
                f"{file}: field {key!r} must be a JSON {kind.__name__}; got {manifest.get(key)!r}"
            )
    return manifest


def verify_files(path: Path, manifest: dict[str, Any]) -> None:
    """Check every recorded file's size and SHA-256 (a one-line ``ValueError`` names the first bad file)."""
    for name, expected in manifest["files"].items():
        file = path / name
        if not file.is_file():
            raise ValueError(f"{file}: missing; the saved model is incomplete")
        if not isinstance(expected, dict) or "size" not in expected or "sha256" not in expected:
            raise ValueError(f"{path / MANIFEST}: malformed entry for {name!r}")
        if file.stat().st_size != expected["size"] or file_digest(file)["sha256"] != expected["sha256"]:
            raise ValueError(
                f"{file}: size or SHA-256 differs from {MANIFEST}; the file is damaged or was changed"
            )


def load_compressed(
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    verify: bool = True,
) -> tuple[nn.Module, Any]:
    """Rebuild a model saved by :func:`save_compressed`; returns ``(model, tokenizer or None)``.

    Args:
        path: directory written by :func:`save_compressed`.
        device: where the model is placed.
        dtype: floating dtype of the parameters.
        attn_implementation: attention kernel (default: the one the saved model used, so logits match).
        verify: check the recorded sizes and SHA-256 of every file first.

    Raises:
        FileNotFoundError: ``path`` holds no ``lowrank.json``.
        ValueError: unsupported format, a damaged file, or weights that do not fit the recorded modules.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    import lowrank.attention.wrapper  # noqa: F401  (registers the compressed attention and its cache class)
    from lowrank.attention.cache import install_cache
    from lowrank.nn.history import set_applied_methods

    path = Path(path)
    if not is_compressed_dir(path):
        raise FileNotFoundError(f"{str(path)!r} is not a compressed model directory (no {MANIFEST})")
    manifest = read_manifest(path)
    if verify:
        verify_files(path, manifest)
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    # parameters on meta (no init cost), buffers (rotary frequencies, …) computed for real on CPU
    attn = attn_implementation or manifest.get("attn_implementation")
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, trust_remote_code=False, **({"attn_implementation": attn} if attn else {})
        )
    for name, desc in manifest["modules"].items():
        try:
            original = get_module(model, name)
        except ValueError:
            raise ValueError(
                f"{path / MANIFEST}: recorded module {name!r} does not exist in the model"
            ) from None
        try:
            module = build_replacement(
                desc, original=original, model_config=config, device="meta", dtype=dtype
            )
        except ValueError as exc:
            raise ValueError(f"{path / MANIFEST}: module {name!r}: {exc}") from None
        replace_module(model, name, module)
    _load_state(model, _read_weights(path, dtype, manifest), path)
    model.to(device).eval()
    set_applied_methods(model, manifest["methods"], manifest.get("summaries") or [])
    if manifest.get("cache"):
        install_cache(model, manifest["cache"]["class"], manifest["cache"].get("spec", {}))
    return model, _load_tokenizer(path)


def _read_weights(path: Path, dtype: torch.dtype, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path / WEIGHTS}: not a readable safetensors file ({exc})") from None
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    for dropped, kept in manifest["tied"].items():
        if kept not in state:
            raise ValueError(f"{path / MANIFEST}: tied tensor {dropped!r} points at missing {kept!r}")
        state[dropped] = state[kept]
    return state


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path / WEIGHTS} does not fit the recorded architecture: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    wrong = [k for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        k = wrong[0]
        raise ValueError(
            f"{path / WEIGHTS}: tensor {k!r} has shape {tuple(state[k].shape)} but {MANIFEST} describes "
            f"{tuple(expected[k].shape)} ({len(wrong)} mismatching tensor(s))"
        )
    # floating tensors were cast to the requested dtype; any other dtype is part of what the manifest says
    kinds = [k for k, v in state.items() if not v.is_floating_point() and v.dtype != expected[k].dtype]
    if kinds:
        k = kinds[0]
        raise ValueError(
            f"{path / WEIGHTS}: tensor {k!r} is stored as {state[k].dtype} but {MANIFEST} describes "
            f"{expected[k].dtype} ({len(kinds)} mismatching tensor(s))"
        )
    model.load_state_dict(state, strict=True, assign=True)
    if "tie_word_embeddings" in model.config.to_dict() and model.config.tie_word_embeddings:
        model.tie_weights()


def _load_tokenizer(path: Path) -> Any:
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
