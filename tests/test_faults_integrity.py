"""Fault injection, integrity of everything read back: flipped bits in heal checkpoints and stored teacher
sequences, token ids out of range, and the generic checked file format under generated damage."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_model
from test_heal import SEQ_LEN, _compressed, _config, _ids

import lowrank.training.checkpoints as checkpoints
from lowrank.io.checked import ChecksumError, load_checked, save_checked
from lowrank.training.healing import heal
from lowrank.training.teacher_text import teacher_sequences

pytestmark = pytest.mark.usefixtures("one_thread")


def _flip(path, offset: int, bit: int = 6) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset % len(raw)] ^= 1 << bit
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("where", [0.3, 0.5, 0.8, 0.99])
def test_checked_files_refuse_any_flipped_bit(tmp_path, where):
    path = tmp_path / "state.pt"
    save_checked({"w": torch.arange(4096, dtype=torch.float32), "step": 3}, path)
    assert load_checked(path, "thing", "redo it")["step"] == 3
    _flip(path, int(path.stat().st_size * where))
    with pytest.raises(ChecksumError, match=r"damaged thing \(.*\); redo it") as info:
        load_checked(path, "thing", "redo it")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("damage", ["truncate", "header", "plain torch file"])
def test_checked_files_refuse_truncation_and_foreign_files(tmp_path, damage):
    path = tmp_path / "state.pt"
    save_checked(torch.ones(64), path)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-10])
    elif damage == "header":
        path.write_bytes(path.read_bytes().replace(b"LOWRANK-CHECKED 1 ", b"LOWRANK-CHECKED 1 0", 1))
    else:
        torch.save(torch.ones(64), path)
    with pytest.raises(ChecksumError, match="damaged"):
        load_checked(path, "thing", "redo it")


def test_a_bit_flipped_in_a_heal_checkpoint_is_refused_not_resumed(tmp_path):
    teacher = make_tiny_model("llama")
    student = _compressed(teacher)
    config = _config(checkpoint_minutes=0, tokens=12 * SEQ_LEN, heldout_sequences=4)
    heal(copy.deepcopy(student), teacher, _ids(), config, checkpoint_dir=tmp_path, progress=False)
    path = tmp_path / checkpoints.CHECKPOINT_FILE
    _flip(path, path.stat().st_size // 2)
    with pytest.raises(checkpoints.CheckpointError, match="damaged healing checkpoint.*SHA-256") as info:
        heal(copy.deepcopy(student), teacher, _ids(), config, checkpoint_dir=tmp_path, progress=False)
    assert "\n" not in str(info.value)


@pytest.fixture(scope="module")
def teacher():
    return make_tiny_model("llama")


def test_a_flipped_token_id_in_stored_sequences_is_a_one_line_error(teacher, tmp_path):
    teacher_sequences(teacher, 2, 8, batch_size=2, directory=tmp_path, progress=False)
    (path,) = tmp_path.glob("*.pt")
    _flip(path, path.stat().st_size - 40)
    with pytest.raises(ValueError, match="damaged stored sequences.*remove it to sample again") as info:
        teacher_sequences(teacher, 2, 8, batch_size=2, directory=tmp_path, progress=False)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("bad", [-1, 256, 10**9])
def test_stored_token_ids_outside_the_vocabulary_are_refused(teacher, tmp_path, bad):
    teacher_sequences(teacher, 2, 8, batch_size=2, directory=tmp_path, progress=False)
    (path,) = tmp_path.glob("*.pt")
    ids = load_checked(path, "stored sequences", "")
    ids[1, 3] = bad
    save_checked(ids, path)  # a valid checksum over invalid content
    with pytest.raises(ValueError, match=r"token ids outside \[0, 256\)"):
        teacher_sequences(teacher, 2, 8, batch_size=2, directory=tmp_path, progress=False)
