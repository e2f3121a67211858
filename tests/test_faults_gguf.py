"""Fault injection, GGUF input: the header and tensor table are checked against the file's size before
anything is allocated or converted (a truncated file once gave a ``struct.error`` traceback, a file of
metadata alone was evaluated as random weights with rc 0 and cached, absurd sizes hung)."""

from __future__ import annotations

import struct
import time

import gguf
import pytest
from conftest import make_tiny_model
from test_gguf import write_tiny_gguf

from lowrank.cli import main
from lowrank.io.gguf_header import check_gguf_file
from lowrank.loading.models import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path, make_tiny_model("llama"))
    return path.read_bytes()


def _refused(path, cache, *what: str) -> str:
    """load_model refuses ``path`` in one line naming it (and each of ``what``), fast, caching nothing."""
    start = time.perf_counter()
    with pytest.raises(ValueError) as info:
        load_model(str(path))
    message = str(info.value)
    assert time.perf_counter() - start < 20
    assert "\n" not in message and message.startswith(f"{path}: ")
    assert all(w in message for w in what), message
    entries = cache / "models" / "gguf"
    assert not entries.exists() or not list(entries.iterdir())  # no entry, no leftover
    return message


def test_the_checker_describes_a_good_file(good, tmp_path):
    path = tmp_path / "good.gguf"
    path.write_bytes(good)
    summary = check_gguf_file(path)
    model = make_tiny_model("llama")
    assert summary.tensors == len(model.state_dict()) and summary.version == 3
    assert summary.elements == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("fraction", [0.0005, 0.002, 0.01, 0.05, 0.2, 0.5, 0.9, 0.999, 1.0])
def test_a_truncated_file_is_one_line_never_a_struct_error(good, tmp_path, cache, fraction):
    path = tmp_path / "cut.gguf"
    path.write_bytes(good[: min(len(good) - 1, max(5, int(len(good) * fraction)))])
    _refused(path, cache, "truncated")


def _without_tensors(monkeypatch, path, keep):
    real = gguf.GGUFWriter.add_tensor

    def add_tensor(self, name, *args, **kwargs):
        if keep(name):
            real(self, name, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "add_tensor", add_tensor)
    write_tiny_gguf(path, make_tiny_model("llama"))
    monkeypatch.undo()


def test_metadata_without_tensors_is_refused_and_never_cached(tmp_path, cache, monkeypatch, capsys):
    path = tmp_path / "meta.gguf"
    _without_tensors(monkeypatch, path, keep=lambda name: False)
    monkeypatch.setenv("LOWRANK_CACHE", str(cache))
    _refused(path, cache, "no tensors")
    rc = main(["evaluate", "--model", str(path), "--data", "wiki", "--seq-len", "8", "--max-windows", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "no tensors" in err and "\n" not in err


@pytest.mark.parametrize("dropped", ["output_norm.weight", "blk.1.ffn_down.weight", "blk.0.attn_q.weight"])
def test_a_missing_tensor_is_refused_never_random_weights(tmp_path, cache, monkeypatch, dropped):
    path = tmp_path / "partial.gguf"
    _without_tensors(monkeypatch, path, keep=lambda name: name != dropped)
    monkeypatch.setenv("LOWRANK_CACHE", str(cache))
    _refused(path, cache, "missing")


def _patched(good, offset, fmt, value):
    data = bytearray(good)
    struct.pack_into(fmt, data, offset, value)
    return bytes(data)


@pytest.mark.parametrize(
    ("offset", "fmt", "value", "what"),
    [
        (4, "<I", 99, "version 99"),
        (8, "<Q", 2**63, "tensors"),
        (8, "<Q", 10**6, "tensors"),
        (16, "<Q", 2**62, "metadata entries"),
        (24, "<Q", 2**60, "bytes of a metadata key"),
    ],
)
def test_absurd_header_sizes_are_refused_at_once(good, tmp_path, cache, offset, fmt, value, what):
    path = tmp_path / "absurd.gguf"
    path.write_bytes(_patched(good, offset, fmt, value))
    _refused(path, cache, what)


def test_absurd_tensor_shapes_and_offsets_are_refused(good, tmp_path, cache):
    """Every tensor's shape or offset made absurd in turn: each is refused, naming the tensor."""
    raw = good
    names = [f"blk.{i}.attn_q.weight" for i in range(2)] + ["token_embd.weight", "output.weight"]
    for name in names:
        at = raw.index(name.encode()) + len(name)  # the table entry: n_dims, dims, type, offset
        for field_offset, value in ((4, 2**40), (4 + 8, 2**40), (4 + 16 + 4, 2**50)):
            path = tmp_path / "shape.gguf"
            path.write_bytes(_patched(raw, at + field_offset, "<Q", value))
            _refused(path, cache, repr(name))
