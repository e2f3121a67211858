"""GGUF input: dequantize a ``.gguf`` file into a cached float32 safetensors checkpoint.

transformers reads the GGUF file (``gguf_file=``); the model is rebuilt from its config without the
``quantization_config`` and saved as a plain Hugging Face checkpoint, so the rest of the toolkit only ever
sees ordinary float weights. A user's file is cached under ``<cache>/models/gguf/<stem>-<sha256 prefix>``
(:func:`gguf_model_dir`); the built-in model (:func:`lowrank.io.builtin.builtin_model_dir`) is converted by
the same :func:`convert_gguf_file`.
"""

from __future__ import annotations

import logging
import os
import re
import struct
from pathlib import Path
from typing import Any

from lowrank.io.assets import cache_dir, ensure_entry
from lowrank.io.files import sha256_file
from lowrank.io.gguf_header import check_gguf_file

__all__ = ["gguf_model_dir", "convert_gguf_file"]

logger = logging.getLogger(__name__)


def gguf_model_dir(path: str | os.PathLike[str], *, hash_files: bool = True) -> Path:
    """Directory of a plain float32 HF checkpoint converted from the GGUF file ``path`` (cached).

    The file is dequantized exactly as the built-in model is. The cache entry
    (``<cache>/models/gguf/<stem>-<sha256 prefix>``) is keyed by the file's name and content, so a changed
    file is converted again and an unchanged one (anywhere on disk) is reused.

    Raises:
        ValueError: (one line naming the file) it is missing; its header or tensor table is not GGUF, is cut
            short, claims more than the file holds or lists no tensors (:func:`check_gguf_file`, before
            anything is allocated); transformers cannot read it; a tensor is missing for the model it
            describes. A failed conversion leaves nothing in the cache.
    """
    src = Path(path).expanduser().resolve()
    if not src.is_file():
        raise ValueError(f"{src}: no such GGUF file")
    check_gguf_file(src)  # before hashing, allocating or converting anything
    digest = sha256_file(src)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", src.stem)[:80]
    entry = cache_dir() / "models" / "gguf" / f"{stem}-{digest[:16]}"
    ensure_entry(entry, lambda out: convert_gguf_file(src, out, sha256=digest), hash_files=hash_files)
    return entry


def convert_gguf_file(src: Path, out: Path, *, sha256: str | None = None) -> dict[str, Any]:
    """Dequantize the GGUF file ``src`` to float32, rebuild a plain model from its config, save to ``out``.

    transformers reads the file (``gguf_file=``); the model is rebuilt from its config without the
    ``quantization_config``, the state dict is copied and the logits are checked to be identical.

    Returns:
        Facts for the cache manifest (source, weights, parameter count, seconds).
    """
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowrank.io.memory import check_bytes_fit
    from lowrank.io.weights import check_loading_info

    start = time.perf_counter()
    summary = check_gguf_file(src)
    # the dequantized model and its rebuilt copy, both float32, live together during the conversion
    check_bytes_fit(8 * summary.elements, src, f"converting {summary.elements:,} parameters to float32")
    logger.info("converting %s to a float32 safetensors checkpoint (one-off)", src.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name, trust_remote_code=False)
        quantized, info = AutoModelForCausalLM.from_pretrained(
            src.parent,
            gguf_file=src.name,
            dtype=torch.float32,
            trust_remote_code=False,
            output_loading_info=True,
        )
    except (OSError, ValueError, KeyError, RuntimeError, NotImplementedError, struct.error) as exc:
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        raise ValueError(f"{src}: transformers cannot load this GGUF file ({first})") from exc
    check_loading_info(src, info)  # a tensor missing from the file would be random: never converted
    config_dict = quantized.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = type(quantized.config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.tie_weights()
    model.eval()
    _check_same_logits(quantized, model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {
        "source": str(src),
        "source_sha256": sha256 or sha256_file(src),
        "weights": "dequantized from GGUF to float32",
        "tied_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "parameters": sum(p.numel() for p in model.parameters()),
        "conversion_seconds": round(time.perf_counter() - start, 2),
    }


def _check_same_logits(reference, model) -> None:
    """The rebuilt model must reproduce the GGUF-loaded model's logits exactly (same weights, same code)."""
    import torch

    ids = torch.arange(1, 17).unsqueeze(0)
    with torch.no_grad():
        a = reference(ids).logits
        b = model(ids).logits
    if not torch.equal(a, b):
        raise RuntimeError(
            f"converted model differs from the GGUF model: max |Δlogit| {(a - b).abs().max():.3g}"
        )
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    if model.config.tie_word_embeddings and head.data_ptr() != emb.data_ptr():
        raise RuntimeError("tie_word_embeddings is set but lm_head does not share embed_tokens' storage")
