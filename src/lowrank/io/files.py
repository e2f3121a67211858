"""Safe file output: nothing this toolkit writes is ever left half written, and nothing of the user's is lost.

Every writer goes through :func:`atomic_path` (one file) or :func:`atomic_dir` (a directory of files):
the content is written under a temporary name beside the target and renamed into place only once it is
complete, so an interrupted run leaves either the old content or none, never a truncated file. Temporary
names carry the writer's process id (``.NAME.<pid>.XXXX.tmp``) so that :func:`remove_stale_temporaries`
can tell the leftovers of a killed run from the work of a live one. Finished files and directories get
the usual permissions under the user's umask (e.g. 0644 / 0755), not the private ones of ``mkstemp``.

:func:`check_output_dir` and :func:`check_output_file` validate an output location before any compute.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_path",
    "atomic_dir",
    "write_json",
    "write_text",
    "check_output_dir",
    "check_output_file",
    "remove_stale_temporaries",
    "publish_permissions",
    "read_text",
    "sha256_file",
    "TOOLKIT_MARKER",
]

#: A directory holding this file was written by the toolkit (see :mod:`lowrank.loading.serialization`).
TOOLKIT_MARKER = "lowrank.json"

#: Leftovers without a process id in their name (older versions) count as stale after this many seconds.
LEGACY_STALE_SECONDS = 3600.0


# ---------------------------------------------------------------- permissions


def _umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: read it the portable way
    os.umask(mask)
    return mask


def _publish_mode(path: Path, mask: int) -> None:
    """Give ``path`` the permissions ``open``/``mkdir`` would have given it under ``mask``."""
    mode = path.lstat().st_mode
    if stat.S_ISLNK(mode):
        return
    executable = stat.S_ISDIR(mode) or mode & stat.S_IXUSR
    os.chmod(path, (0o777 if executable else 0o666) & ~mask)


def publish_permissions(path: str | os.PathLike[str]) -> None:
    """Give ``path`` (and everything under it, for a directory) the permissions that ``open``/``mkdir``
    give under the current umask (0644 / 0755 with umask 022) instead of the private ones of
    ``mkstemp``/``mkdtemp``; executable files keep their execute bits."""
    root = Path(path)
    mask = _umask()
    _publish_mode(root, mask)
    if root.is_dir() and not root.is_symlink():
        for dirpath, dirnames, filenames in os.walk(root):
            for name in (*dirnames, *filenames):
                _publish_mode(Path(dirpath) / name, mask)


# ---------------------------------------------------------------- temporaries


def _temp_prefix(name: str) -> str:
    return f".{name}.{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _newest_mtime(path: Path) -> float:
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for dirpath, dirnames, filenames in os.walk(path):
            for name in (*dirnames, *filenames):
                with contextlib.suppress(OSError):
                    newest = max(newest, (Path(dirpath) / name).lstat().st_mtime)
    return newest


def remove_stale_temporaries(parent: str | os.PathLike[str], name: str) -> list[Path]:
    """Remove leftovers of killed writers of ``parent/name``; return what was removed.

    A leftover is ``.NAME.<pid>.XXXXXXXX.tmp`` or ``.NAME.<pid>.<12 hex>.old`` (the exact shapes
    :func:`atomic_path` and :func:`atomic_dir` create) whose process ``pid`` no longer exists. A
    ``.NAME.XXXXXXXX.tmp`` without a process id (older versions) is removed only when nothing in it
    changed for :data:`LEGACY_STALE_SECONDS`. Work of live processes and other names are never touched.
    """
    parent = Path(parent)
    pattern = re.compile(rf"^\.{re.escape(name)}\.(?:(\d+)\.)?(?:[a-z0-9_]{{8}}\.tmp|[0-9a-f]{{12}}\.old)$")
    removed = []
    if not parent.is_dir():
        return removed
    for path in parent.iterdir():
        match = pattern.match(path.name)
        if match is None:
            continue
        try:
            if match.group(1) is not None:
                stale = not _pid_alive(int(match.group(1)))
            elif path.name.endswith(".old"):
                continue
            else:
                stale = time.time() - _newest_mtime(path) > LEGACY_STALE_SECONDS
        except OSError:  # vanished meanwhile
            continue
        if stale:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


# ---------------------------------------------------------------- atomic writers


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` when the block succeeds.

    On an exception the temporary file is removed and ``target`` is untouched. The finished file gets the
    permissions of the ``target`` it replaces, or the default ones under the umask.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(target.name), suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if target.is_file():
            os.chmod(tmp_path, stat.S_IMODE(target.stat().st_mode))
        elif tmp_path.exists():
            _publish_mode(tmp_path, _umask())
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``target``; move it onto ``target`` on success.

    An existing ``target`` is replaced only after the new directory is complete: it is first renamed to a
    fresh unique name (``.NAME.<pid>.XXXX.old``, never a name that already exists) and that copy alone is
    removed afterwards. Callers that write where the user chose should validate the location with
    :func:`check_output_dir` first: this function replaces whatever ``target`` holds.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target.name), suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        publish_permissions(tmp)
        if target.exists() or target.is_symlink():
            _swap_into_place(tmp, target)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_into_place(tmp: Path, target: Path) -> None:
    old = target.with_name(f"{_temp_prefix(target.name)}{secrets.token_hex(6)}.old")
    while old.exists() or old.is_symlink():
        old = target.with_name(f"{_temp_prefix(target.name)}{secrets.token_hex(6)}.old")
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)  # put the previous content back
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 4 MiB chunks (the one file checksum of caches, checkpoints, outputs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_text(path: str | os.PathLike[str]) -> str:
    """Read a UTF-8 text file (a BOM is dropped).

    Raises:
        ValueError: (one line naming the file) it is not valid UTF-8; says where and what to do.
        FileNotFoundError / IsADirectoryError: as ``open`` does.
    """
    path = Path(path)
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


# ---------------------------------------------------------------- output validation


def _absolute(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.abspath(Path(path).expanduser()))


def _check_location(path: Path, what: str) -> None:
    """The parents of ``path`` are directories (or absent) and the nearest existing one is writable."""
    for ancestor in path.parents:
        if not (ancestor.exists() or ancestor.is_symlink()):
            continue
        if not ancestor.is_dir():
            raise ValueError(f"{what} {path}: parent {ancestor} is a file, not a directory; choose another")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise ValueError(f"{what} {path}: {ancestor} is not writable; choose a writable location")
        return


def _overlaps(path: Path, other: Path) -> bool:
    return path == other or other in path.parents or path in other.parents


def check_output_dir(
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    protected: Sequence[str | os.PathLike[str]] = (),
) -> Path:
    """Validate an output directory before any work is done; return it as an absolute path.

    Args:
        path: where a directory of results will be written (replaced as a whole by :func:`atomic_dir`).
        overwrite: allow replacing an existing non-empty directory that this toolkit did not write.
        protected: paths that must survive (e.g. the source model directory): the output may not equal,
            contain or lie inside any of them, whatever ``overwrite`` says.

    Raises:
        ValueError: (one line naming ``path``) it is an existing file; a parent is a file; the nearest
            existing parent is not writable; it overlaps a protected path; or it holds a file that its
            ``lowrank.json`` does not list (a user's file: only exactly what the toolkit wrote may be
            replaced) and ``overwrite`` is false.
    """
    out = _absolute(path)
    if (out.exists() or out.is_symlink()) and not out.is_dir():
        raise ValueError(f"output directory {out} is an existing file; give a directory path")
    _check_location(out, "output directory")
    real = out.resolve()
    for item in protected:
        guarded = _absolute(item).resolve()
        if _overlaps(real, guarded):
            raise ValueError(
                f"output directory {out} overlaps the input {guarded}; write outside it (and not above it)"
            )
    stranger = _unowned_file(out) if out.is_dir() else None
    if stranger is not None and not overwrite:
        raise ValueError(
            f"output directory {out} holds {stranger}, not written by lowrank (not listed in its "
            f"{TOOLKIT_MARKER}); choose a new or empty directory, or pass overwrite to replace it"
        )
    return out


def _unowned_file(directory: Path) -> str | None:
    """The first entry of ``directory`` that its ``lowrank.json`` does not list (None: all are the
    toolkit's, or it is empty). Without a readable manifest every entry is a user's."""
    entries = sorted(
        p for p in directory.rglob("*") if not p.is_dir() or p.is_symlink() or not any(p.iterdir())
    )
    if not entries:
        return None
    try:
        listed = json.loads((directory / TOOLKIT_MARKER).read_text(encoding="utf-8")).get("files")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        listed = None
    owned = set(listed) | {TOOLKIT_MARKER} if isinstance(listed, dict) else set()
    for entry in entries:
        name = entry.relative_to(directory).as_posix()
        if name not in owned or entry.is_symlink() or entry.is_dir():
            return name
    return None


def check_output_file(path: str | os.PathLike[str]) -> Path:
    """Validate an output file path (e.g. ``--json``) before any work is done; return it absolute.

    Raises:
        ValueError: (one line naming ``path``) it is an existing directory, a parent is a file, or the
            nearest existing parent is not writable.
    """
    out = _absolute(path)
    if out.is_dir():
        raise ValueError(f"output file {out} is an existing directory; give a file path")
    _check_location(out, "output file")
    return out
