"""Output safety: refusals before compute, user files never lost, usual permissions, stale temporaries."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lowrank.io.files import (
    atomic_dir,
    atomic_path,
    check_output_dir,
    check_output_file,
    read_text,
    remove_stale_temporaries,
    write_text,
)


@pytest.fixture
def thesis(tmp_path):
    """A user's directory that must never be touched."""
    d = tmp_path / "thesis"
    (d / "sub").mkdir(parents=True)
    (d / "thesis.tex").write_text("\\chapter{One}\n")
    (d / "sub" / "data.csv").write_text("a,b\n1,2\n")
    return d


def _intact(d):
    return (d / "thesis.tex").read_text() == "\\chapter{One}\n" and (d / "sub" / "data.csv").is_file()


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_foreign_nonempty_dir_is_refused_and_survives(thesis):
    with pytest.raises(ValueError, match=f"{thesis}.*not written by lowrank.*overwrite") as info:
        check_output_dir(thesis)
    assert "\n" not in str(info.value)
    assert _intact(thesis)
    assert check_output_dir(thesis, overwrite=True) == thesis


def test_toolkit_output_empty_dir_and_new_path_are_accepted(tmp_path):
    done = tmp_path / "done"
    done.mkdir()
    (done / "lowrank.json").write_text('{"files": {"model.safetensors": {}}}')
    (done / "model.safetensors").write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    assert check_output_dir(done) == done
    assert check_output_dir(tmp_path / "empty") == tmp_path / "empty"
    assert check_output_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"


def test_existing_file_and_file_parent_are_refused(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("keep")
    with pytest.raises(ValueError, match=f"{f} is an existing file"):
        check_output_dir(f, overwrite=True)
    with pytest.raises(ValueError, match=f"{f / 'out'}.*parent {f} is a file"):
        check_output_dir(f / "out")
    with pytest.raises(ValueError, match=f"{f / 'r.json'}.*parent {f} is a file"):
        check_output_file(f / "r.json")
    assert f.read_text() == "keep"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_location_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ValueError, match=f"{locked / 'out'}.*not writable"):
            check_output_dir(locked / "out")
        with pytest.raises(ValueError, match=f"{locked / 'r.json'}.*not writable"):
            check_output_file(locked / "r.json")
    finally:
        locked.chmod(0o700)


def test_unwritable_location_is_refused_via_access(tmp_path, monkeypatch):
    """Same check where the tests run as root: ``os.access`` is what decides."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access

    def access(path, mode):
        return os.path.abspath(path) != str(locked) and real_access(path, mode)

    monkeypatch.setattr(os, "access", access)
    with pytest.raises(ValueError, match=f"{locked / 'a' / 'b'}.*{locked} is not writable"):
        check_output_dir(locked / "a" / "b")
    with pytest.raises(ValueError, match="not writable"):
        check_output_file(locked / "r.json")


@pytest.mark.parametrize("where", ["same", "inside", "contains"])
def test_protected_paths_are_refused_even_with_overwrite(thesis, where):
    out = {"same": thesis, "inside": thesis / "sub" / "out", "contains": thesis.parent}[where]
    with pytest.raises(ValueError, match=f"{out} overlaps the input {thesis}"):
        check_output_dir(out, overwrite=True, protected=[thesis])
    assert _intact(thesis)


def test_protected_path_through_a_symlink(thesis, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(thesis)
    with pytest.raises(ValueError, match="overlaps the input"):
        check_output_dir(link / "out", protected=[thesis])


def test_output_file_refuses_a_directory(thesis, tmp_path):
    with pytest.raises(ValueError, match=f"{thesis} is an existing directory"):
        check_output_file(thesis)
    assert check_output_file(tmp_path / "r.json") == tmp_path / "r.json"


def test_failed_atomic_dir_leaves_the_target_intact(thesis):
    with pytest.raises(RuntimeError, match="compute failed"), atomic_dir(thesis) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("compute failed")
    assert _intact(thesis)
    assert sorted(p.name for p in thesis.parent.iterdir()) == ["thesis"]


def test_users_dot_old_directory_survives_a_replacement(tmp_path):
    out = tmp_path / "out"
    user_old = tmp_path / ".out.old"
    (user_old / "sub").mkdir(parents=True)
    (user_old / "sub" / "mine.txt").write_text("mine")
    for round_ in range(2):
        with atomic_dir(out) as tmp:
            (tmp / "lowrank.json").write_text(str(round_))
    assert (out / "lowrank.json").read_text() == "1"
    assert (user_old / "sub" / "mine.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.old", "out"]


def test_atomic_dir_replaces_a_file_target(tmp_path):
    out = tmp_path / "out"
    out.write_text("old")
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("new")
    assert (out / "a").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_finished_outputs_get_umask_permissions(tmp_path, umask_022):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        write_text(tmp / "a.txt", "x")
        (tmp / "sub").mkdir()
        with atomic_path(tmp / "sub" / "w.bin") as w:
            w.write_bytes(b"w")
    assert (out.stat().st_mode & 0o777) == 0o755
    assert (out / "sub").stat().st_mode & 0o777 == 0o755
    assert (out / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (out / "sub" / "w.bin").stat().st_mode & 0o777 == 0o644
    single = tmp_path / "r.json"
    write_text(single, "{}")
    assert single.stat().st_mode & 0o777 == 0o644


def test_replacing_a_file_keeps_its_permissions(tmp_path, umask_022):
    f = tmp_path / "secret.json"
    f.write_text("{}")
    f.chmod(0o600)
    write_text(f, "[]")
    assert f.stat().st_mode & 0o777 == 0o600 and f.read_text() == "[]"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = _dead_pid()
    stale = tmp_path / f".x.{dead}.abcd_123.tmp"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "big.bin").write_bytes(b"0" * 100)
    stale_old = tmp_path / f".x.{dead}.0123456789ab.old"
    stale_old.mkdir()
    live = tmp_path / f".x.{os.getpid()}.zzzz_123.tmp"
    live.mkdir()
    keep = [tmp_path / ".x.old", tmp_path / ".x.thesis.old", tmp_path / f".y.{dead}.abcd_123.tmp"]
    for k in keep:
        k.mkdir()
    legacy_fresh = tmp_path / ".x.qwer_123.tmp"
    legacy_fresh.mkdir()
    removed = remove_stale_temporaries(tmp_path, "x")
    assert sorted(removed) == sorted([stale, stale_old])
    assert not stale.exists() and not stale_old.exists()
    assert live.is_dir() and legacy_fresh.is_dir() and all(k.is_dir() for k in keep)


def test_old_legacy_temporary_is_removed(tmp_path):
    legacy = tmp_path / ".x.qwer_123.tmp"
    legacy.mkdir()
    (legacy / "f").write_text("x")
    for p in (legacy / "f", legacy):
        os.utime(p, (1e9, 1e9))
    assert remove_stale_temporaries(tmp_path, "x") == [legacy]


def test_non_utf8_text_names_the_file(tmp_path):
    f = tmp_path / "latin.txt"
    f.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match=f"{f}: not UTF-8 text \\(byte 0xe9 at offset 3\\)") as info:
        read_text(f)
    assert "\n" not in str(info.value)
    f.write_bytes("\ufeffcaf\u00e9".encode())
    assert read_text(f) == "caf\u00e9"
