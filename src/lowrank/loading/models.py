"""Load a causal LM and its tokenizer: built-in name, local directory, saved compressed model or hub id."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lowrank.core import dtypes
from lowrank.io.builtin import BUILTIN_MODELS, builtin_model_dir
from lowrank.io.weights import check_loading_info

__all__ = ["load_model", "resolve_dtype", "BUILTIN_MODELS"]

logger = logging.getLogger(__name__)

#: The dtypes a model may be loaded in (names in :data:`lowrank.core.dtypes.DTYPES`).
_MODEL_DTYPES = ("float32", "bfloat16", "float16")


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Map ``'float32' | 'bfloat16' | 'float16'`` (or a ``torch.dtype`` of those) to a ``torch.dtype``.

    Raises:
        ValueError: (one line) any other dtype; the message lists the three valid names.
    """
    return dtypes.resolve_dtype(dtype, _MODEL_DTYPES)


def load_model(
    name_or_path: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    trust_remote_code: bool = False,
):
    """Load a causal language model and its tokenizer, in eval mode.

    Args:
        name_or_path: one of
            * a built-in name (``'smollm2-135m'``): converted once into the cache, then loaded from it;
            * a directory written by this toolkit (it holds ``lowrank.json``): loaded by
              :func:`lowrank.loading.serialization.load_compressed`, low-rank layers included;
            * a local Hugging Face model directory (it holds ``config.json``);
            * a ``.gguf`` file: dequantized to float32 like the built-in model, converted once into
              the cache (keyed by the file's content) and loaded from there;
            * a Hugging Face hub id ``'org/name'`` (needs network access).
        device: where to put the model.
        dtype: ``torch.float32`` (default), ``torch.bfloat16`` or ``torch.float16`` (or their names).
        trust_remote_code: allow a model directory or hub repository to run its own Python code
            (``auto_map`` in its config). Off by default: such a model is refused, never run.

    Returns:
        ``(model, tokenizer)``.

    Raises:
        ValueError: (one line) unknown name (the message lists the built-in names), bad dtype, a model
            that needs custom code without ``trust_remote_code``, or a corrupt weights file (named).
    """
    dtype = resolve_dtype(dtype)
    name = str(name_or_path)
    if name in BUILTIN_MODELS:
        return _load_hf(builtin_model_dir(name), device, dtype, False)
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf" and not path.is_dir():
        from lowrank.io.gguf import gguf_model_dir

        return _load_hf(gguf_model_dir(path), device, dtype, False)
    if path.is_dir():
        if (path / "lowrank.json").is_file():
            from lowrank.loading.serialization import load_compressed

            return load_compressed(path, device=device, dtype=dtype)
        if (path / "config.json").is_file():
            _check_weights(path)
            return _load_hf(path, device, dtype, trust_remote_code)
        raise ValueError(f"{path} is a directory without config.json or lowrank.json; not a model directory")
    if _looks_like_hub_id(name):
        try:
            return _load_hf(name, device, dtype, trust_remote_code)
        except (OSError, ValueError) as exc:
            if "trust_remote_code" in str(exc):
                raise
            raise ValueError(
                f"could not load {name!r} from the Hugging Face hub ({str(exc).splitlines()[0]}); "
                f"built-in models: {', '.join(BUILTIN_MODELS)}"
            ) from exc
    raise ValueError(
        f"unknown model {name!r}: not a built-in name, a local model directory, a .gguf file or a hub id; "
        f"built-in models: {', '.join(BUILTIN_MODELS)}"
    )


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~"))


def _check_weights(path: Path) -> None:
    """Refuse, naming the file, a truncated, empty or corrupt ``.safetensors`` file before loading."""
    from lowrank.io.assets import safetensors_problem

    for file in sorted(path.glob("*.safetensors")):
        problem = safetensors_problem(file)
        if problem is not None:
            raise ValueError(f"{file}: corrupt or truncated safetensors file ({problem}); save it again")


def _load_hf(source: str | Path, device: str | torch.device, dtype: torch.dtype, trust_remote_code: bool):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lowrank.io.memory import check_model_fits

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        check_model_fits(config, dtype, source)  # before anything is built: one line, not minutes
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        model, info = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            ignore_mismatched_sizes=True,  # reported by check_loading_info below, never kept
            output_loading_info=True,
        )
    except ValueError as exc:
        if "trust_remote_code" not in str(exc) or trust_remote_code:
            raise
        raise ValueError(
            f"{source} contains custom code (auto_map in its config) that loading would run; "
            "inspect it and pass trust_remote_code=True (--trust-remote-code) to allow it"
        ) from exc
    except OSError as exc:
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        raise ValueError(f"{source}: could not load the model ({first})") from exc
    check_loading_info(source, info)
    model.to(device)
    model.eval()
    logger.debug("loaded %s (%s, %s)", source, dtype, device)
    return model, tokenizer
