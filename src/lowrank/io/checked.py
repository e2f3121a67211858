"""Torch files that carry their own SHA-256: a flipped bit is a one-line error, never a wrong resume.

Heal checkpoints and stored teacher sequences are read back across runs. Each is one file: a header line
(``LOWRANK-CHECKED 1 <sha256 of the payload>``) followed by the ``torch.save`` payload, written atomically
(:func:`lowrank.io.files.atomic_path`). :func:`load_checked` recomputes the digest before unpickling anything.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import torch

from lowrank.io.files import atomic_path

__all__ = ["save_checked", "load_checked", "ChecksumError"]

_MAGIC = b"LOWRANK-CHECKED 1 "


class ChecksumError(ValueError):
    """The file is damaged: its content does not match its recorded SHA-256 (or it has none)."""


def save_checked(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj)`` to ``path`` atomically, with the payload's SHA-256 in a header line."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest().encode("ascii")
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(_MAGIC + digest + b"\n")
        fh.write(payload)


def load_checked(path: str | os.PathLike[str], what: str, advice: str) -> Any:
    """The object saved by :func:`save_checked` at ``path`` (``weights_only`` unpickling).

    Args:
        what: what the file holds, for the message (``"healing checkpoint"``).
        advice: what to do about a damaged one (``"delete it to start afresh"``).

    Raises:
        ChecksumError: (one line: ``PATH: damaged WHAT (why); ADVICE``) no header, a digest that differs
            from the content, or a payload torch cannot read.
    """
    path = Path(path)
    header, _, payload = path.read_bytes().partition(b"\n")
    if not header.startswith(_MAGIC):
        why = "no checksum header: not written by this version"
    elif hashlib.sha256(payload).hexdigest().encode("ascii") != header[len(_MAGIC) :]:
        why = "its content differs from its recorded SHA-256"
    else:
        try:
            return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable payload gets the same advice
            why = f"unreadable: {type(exc).__name__}"
    raise ChecksumError(f"{path}: damaged {what} ({why}); {advice}")
