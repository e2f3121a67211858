"""Where a run reads and writes, checked together before any compute; one writer per output at a time.

:func:`check_paths` compares every output path of a command (``--out``, ``--json``, ``--checkpoint-dir``,
…) with every input path (``--model``, ``--teacher``, ``--config``, data files) and with every other
output: an output may not equal, contain or lie inside an input (the input would be destroyed or
swallowed by an atomic directory swap), nor overlap another output (one write would destroy the other).
:func:`output_lock` holds an exclusive lock on an output path for a whole run, so a second run writing
the same output fails in one line instead of both reporting success with one result lost.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

__all__ = ["check_paths", "output_lock", "input_path", "OutputBusyError"]


class OutputBusyError(ValueError):
    """Another process holds the lock of the output path."""


def _real(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.abspath(Path(path).expanduser())).resolve()


def input_path(name: str | os.PathLike[str] | None) -> Path | None:
    """The file or directory an input argument reads (a built-in model name: its cache entry), or None."""
    if name is None:
        return None
    text = str(name)
    from lowrank.io.builtin import BUILTIN_MODELS

    if text in BUILTIN_MODELS:
        from lowrank.io.assets import cache_dir

        return _real(cache_dir() / "models" / text)
    path = Path(text).expanduser()
    return _real(path) if path.exists() else None


def _overlap(a: Path, b: Path) -> str | None:
    if a == b:
        return "is"
    if b in a.parents:
        return "is inside"
    if a in b.parents:
        return "contains"
    return None


def check_paths(
    inputs: Mapping[str, str | os.PathLike[str] | None], outputs: Mapping[str, str | os.PathLike[str] | None]
) -> None:
    """Refuse (one line naming both) an output that overlaps an input or another output.

    Args:
        inputs: label (``"--model"``) → path read by the run (None or a missing path: skipped).
        outputs: label (``"--json"``) → path written by the run (None: not written).

    Raises:
        ValueError: the first collision found, e.g. ``--json X is inside --model Y``.
    """
    ins = {label: p for label, name in inputs.items() if (p := input_path(name)) is not None}
    outs = {label: _real(p) for label, p in outputs.items() if p}
    for label, out in outs.items():
        for other, src in ins.items():
            relation = _overlap(out, src)
            if relation:
                raise ValueError(
                    f"{label} {out} {relation} the input {other} {src}; writing it would destroy the input, "
                    "choose a path outside it"
                )
    labels = list(outs)
    for i, label in enumerate(labels):
        for other in labels[i + 1 :]:
            relation = _overlap(outs[label], outs[other])
            if relation:
                raise ValueError(
                    f"{label} {outs[label]} {relation} {other} {outs[other]}; one write would destroy the "
                    "other, give them separate paths"
                )


def _lock_file(path: Path) -> Path:
    from lowrank.io.assets import cache_dir

    digest = hashlib.sha256(str(path).encode("utf-8")).hexdigest()[:16]
    locks = cache_dir() / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    return locks / f"out-{path.name}-{digest}.lock"


@contextlib.contextmanager
def output_lock(*paths: str | os.PathLike[str] | None) -> Iterator[None]:
    """Hold exclusive locks on output ``paths`` for the block; refuse at once when another run holds one.

    The lock files live in the cache (``<cache>/.locks/``), never beside the user's files; the kernel
    releases them when their holder dies.

    Raises:
        OutputBusyError: (one line naming the path) another process is writing it now.
    """
    with contextlib.ExitStack() as stack:
        for path in paths:
            if not path:
                continue
            real = _real(path)
            fh = stack.enter_context(open(_lock_file(real), "a+b"))
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OutputBusyError(
                    f"{real} is being written by another lowrank run right now; wait for it to finish or "
                    "choose another output path"
                ) from None
            stack.callback(fcntl.flock, fh, fcntl.LOCK_UN)
        yield
