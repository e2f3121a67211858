"""Check a GGUF file's header and tensor table against its size before anything is read or allocated.

A GGUF file is a header (magic, version, tensor count, metadata count), the metadata key/value pairs,
one table entry per tensor (name, shape, type, offset) and the aligned tensor data. transformers trusts
every count and offset in it: a truncated file fails with a ``struct.error``, a count of 2⁶³ hangs, a file
of metadata alone becomes a model of randomly initialised weights. :func:`check_gguf_file` walks the
header with every length and count bounded by the bytes left in the file, so each of these is a one-line
``ValueError`` naming the file and what is wrong, in time proportional to the header's true size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["GGUFSummary", "check_gguf_file"]

_VERSIONS = (2, 3)
_MAX_DIMS = 4
#: Fixed sizes of the scalar metadata value types (the GGUF spec's type ids); 8 is a string, 9 an array.
_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4


@dataclass(frozen=True)
class GGUFSummary:
    """What the header of a checked GGUF file describes."""

    version: int
    tensors: int
    elements: int
    """Elements of all tensors together: the parameters of the model (before any tying)."""
    data_bytes: int


class _Reader:
    """Reads little-endian fields, refusing any read past the end of the file."""

    def __init__(self, path: Path) -> None:
        self.path, self.size = path, path.stat().st_size
        self.fh = open(path, "rb")  # noqa: SIM115 - closed by check_gguf_file
        self.pos = 0

    def fail(self, what: str) -> ValueError:
        return ValueError(f"{self.path}: not a usable GGUF file ({what})")

    def left(self) -> int:
        return self.size - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.left():
            raise self.fail(
                f"truncated: {what} needs {n:,} bytes at offset {self.pos:,}, the file ends at {self.size:,}"
            )
        data = self.fh.read(n)
        self.pos += n
        return data

    def uint(self, n: int, what: str) -> int:
        return int.from_bytes(self.take(n, what), "little")

    def count(self, what: str, each: int) -> int:
        """A uint64 count of items of at least ``each`` bytes; refused when the file cannot hold them."""
        n = self.uint(8, what)
        if n * each > self.left():
            raise self.fail(f"the header claims {n:,} {what}, more than the {self.left():,} bytes left hold")
        return n

    def string(self, what: str) -> str:
        raw = self.take(self.count(f"bytes of {what}", 1), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def skip_value(self, kind: int, key: str) -> int | None:
        """Skip one metadata value; return it when it is a uint32 (the alignment), else None."""
        if kind in _SCALARS:
            data = self.take(_SCALARS[kind], f"the value of {key!r}")
            return int.from_bytes(data, "little") if kind == _UINT32 else None
        if kind == _STRING:
            self.take(self.count(f"bytes of the value of {key!r}", 1), f"the value of {key!r}")
        elif kind == _ARRAY:
            item = self.uint(4, f"the item type of {key!r}")
            if item not in _SCALARS and item != _STRING:
                raise self.fail(f"metadata {key!r} is an array of unknown type {item}")
            n = self.count(f"items of {key!r}", _SCALARS.get(item, 8))
            if item in _SCALARS:
                self.take(n * _SCALARS[item], f"the items of {key!r}")
            else:
                for _ in range(n):
                    self.take(self.count(f"bytes of an item of {key!r}", 1), f"an item of {key!r}")
        else:
            raise self.fail(f"metadata {key!r} has unknown value type {kind}")
        return None


def check_gguf_file(path: str | os.PathLike[str]) -> GGUFSummary:
    """Walk the header and tensor table of the GGUF file ``path``, bounded by its size.

    Raises:
        ValueError: (one line naming the file) not GGUF, an unsupported version, a header or table cut
            short or claiming more than the file holds, no tensors, a tensor of unknown type or impossible
            shape, or tensor data that overlaps or runs past the end of the file.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    r = _Reader(Path(path))
    try:
        if r.take(4, "the magic bytes") != b"GGUF":
            raise ValueError(f"{r.path}: not a GGUF file (it does not start with the GGUF magic bytes)")
        version = r.uint(4, "the version")
        if version not in _VERSIONS:
            raise r.fail(f"version {version}; supported: {', '.join(map(str, _VERSIONS))}")
        tensors = r.uint(8, "the tensor count")
        kvs = r.count("metadata entries", 8 + 4 + 1)
        if tensors * (8 + 4 + 8 + 4 + 8) > r.left():
            raise r.fail(f"the header claims {tensors:,} tensors, more than the {r.left():,} bytes left hold")
        alignment = 32
        for _ in range(kvs):
            key = r.string("a metadata key")
            value = r.skip_value(r.uint(4, f"the type of {key!r}"), key)
            if key == "general.alignment":
                if not value or value & (value - 1):
                    raise r.fail(f"general.alignment is {value}; it must be a power of two")
                alignment = value
        if tensors == 0:
            raise r.fail("it holds metadata but no tensors: there are no weights to load")
        table = []
        for _ in range(tensors):
            name = r.string("a tensor name")
            dims = r.uint(4, f"the dimension count of {name!r}")
            if not 1 <= dims <= _MAX_DIMS:
                raise r.fail(f"tensor {name!r} has {dims} dimensions; valid: 1 to {_MAX_DIMS}")
            shape = [r.uint(8, f"the shape of {name!r}") for _ in range(dims)]
            kind = r.uint(4, f"the type of {name!r}")
            offset = r.uint(8, f"the offset of {name!r}")
            table.append((name, shape, kind, offset))
        start = -(-r.pos // alignment) * alignment
        elements = data_bytes = 0
        end_of_last = 0
        for name, shape, kind, offset in sorted(table, key=lambda t: t[3]):
            try:
                block, size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            except (ValueError, KeyError):
                raise r.fail(f"tensor {name!r} has unknown type {kind}") from None
            n = 1
            for d in shape:
                n *= d
            if n == 0 or shape[0] % block:
                raise r.fail(f"tensor {name!r} has shape {shape}, impossible for its type (block {block})")
            nbytes = n // block * size
            if offset % alignment or offset < end_of_last:
                raise r.fail(f"tensor {name!r} starts at data offset {offset:,}, misaligned or overlapping")
            if start + offset + nbytes > r.size:
                raise r.fail(
                    f"truncated: tensor {name!r} ({nbytes:,} bytes at {start + offset:,}) runs past the end "
                    f"of the file at {r.size:,}"
                )
            end_of_last = offset + nbytes
            elements, data_bytes = elements + n, data_bytes + nbytes
        return GGUFSummary(version, tensors, elements, data_bytes)
    finally:
        r.fh.close()
