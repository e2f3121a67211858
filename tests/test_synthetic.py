"""Sequences a model writes itself: seeded, sampled from the model (greedy at a low temperature), kept on
disk batch by batch, resumed after an interruption, keyed by the weights; healing on them works."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from _tiny import save_tiny_model_dir
from conftest import make_tiny_model, random_tokens
from test_heal import SEQ_LEN, _config

import lowrank.training.teacher_text as synthetic
from lowrank.io.checked import load_checked, save_checked
from lowrank.methods import HealConfig, SVDLLMConfig, compress
from lowrank.training.teacher_text import sample_sequences, teacher_sequences

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("llama", bos_token_id=1, eos_token_id=2, pad_token_id=0)


def test_sequences_start_with_bos_then_a_non_special_token_and_are_seeded(model):
    a = sample_sequences(model, 5, 12, seed=4, batch_size=2, progress=False)
    assert a.shape == (5, 12) and a.dtype == torch.long
    assert (a[:, 0] == 1).all() and not torch.isin(a[:, 1], torch.tensor([0, 1, 2])).any()
    assert int(a.max()) < model.config.vocab_size
    assert torch.equal(a, sample_sequences(model, 5, 12, seed=4, batch_size=2, progress=False))
    assert not torch.equal(a, sample_sequences(model, 5, 12, seed=5, batch_size=2, progress=False))
    # batch b depends only on (seed, b): the first batches of a larger set are those of a smaller one
    assert torch.equal(a[:4], sample_sequences(model, 4, 12, seed=4, batch_size=2, progress=False))


def test_a_low_temperature_samples_the_models_argmax(model):
    ids = sample_sequences(model, 3, 10, temperature=1e-4, batch_size=3, progress=False)
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.equal(ids[:, 2:], logits[:, 1:-1].argmax(-1))


def test_sampling_at_temperature_one_follows_the_model(model):
    # a peaked model: a sampled token's mean log-probability is the mean of -entropy, far above uniform's
    peaked = copy.deepcopy(model)
    with torch.no_grad():
        peaked.lm_head.weight.mul_(40)
    ids = sample_sequences(peaked, 16, 24, seed=1, batch_size=16, progress=False)
    with torch.no_grad():
        logp = torch.log_softmax(peaked(ids).logits[:, 1:-1].float(), -1)
    chosen = float(logp.gather(-1, ids[:, 2:, None]).mean())
    minus_entropy = float((logp.exp() * logp).sum(-1).mean())
    assert minus_entropy > -3.0 > -torch.log(torch.tensor(float(logp.shape[-1])))
    assert abs(chosen - minus_entropy) < 0.25


def _stored(path):
    return load_checked(path, "stored sequences", "remove it")


def test_stored_sequences_are_reused_and_an_interrupted_run_resumes(model, tmp_path, monkeypatch):
    full = teacher_sequences(model, 5, 8, batch_size=2, directory=tmp_path / "a", progress=False)
    assert full.shape == (5, 8)
    assert torch.equal(full, sample_sequences(model, 6, 8, batch_size=2, progress=False)[:5])
    (stored,) = (tmp_path / "a").glob("*.pt")
    assert _stored(stored).shape == (6, 8)  # whole batches are stored

    real, calls = synthetic._sample_batch, []

    def fail_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "_sample_batch", fail_on_third)
    with pytest.raises(KeyboardInterrupt):
        teacher_sequences(model, 5, 8, batch_size=2, directory=tmp_path / "b", progress=False)
    assert _stored(next((tmp_path / "b").glob("*.pt"))).shape == (4, 8)
    assert torch.equal(teacher_sequences(model, 5, 8, batch_size=2, directory=tmp_path / "b"), full)
    assert len(calls) == 4  # two batches kept, the third made once more
    monkeypatch.setattr(synthetic, "_sample_batch", None)  # a stored set needs no sampling
    assert torch.equal(teacher_sequences(model, 3, 8, batch_size=2, directory=tmp_path / "b"), full[:3])


def test_other_weights_or_settings_get_their_own_sequences(model, tmp_path):
    teacher_sequences(model, 2, 8, batch_size=2, directory=tmp_path, progress=False)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.lm_head.weight.mul_(2)
    teacher_sequences(other, 2, 8, batch_size=2, directory=tmp_path, progress=False)
    teacher_sequences(model, 2, 8, batch_size=2, temperature=0.5, directory=tmp_path, progress=False)
    assert len(list(tmp_path.glob("*.pt"))) == 3


def test_damaged_or_foreign_stored_sequences_are_one_line_errors(model, tmp_path):
    teacher_sequences(model, 2, 8, batch_size=2, directory=tmp_path, progress=False)
    (path,) = tmp_path.glob("*.pt")
    path.write_bytes(b"half a file")
    with pytest.raises(ValueError, match="damaged stored sequences.*remove it to sample again") as info:
        teacher_sequences(model, 2, 8, batch_size=2, directory=tmp_path, progress=False)
    assert "\n" not in str(info.value)
    save_checked(torch.zeros(2, 5, dtype=torch.long), path)
    with pytest.raises(ValueError, match=r"does not hold \(n, 8\) token ids"):
        teacher_sequences(model, 2, 8, batch_size=2, directory=tmp_path, progress=False)


@pytest.mark.parametrize(
    "kwargs, shown",
    [
        ({"samples": 0}, "samples must be an integer >= 1; got 0"),
        ({"seq_len": 1}, "seq_len must be an integer >= 2; got 1"),
        ({"temperature": 0.0}, "temperature must be > 0; got 0.0"),
        ({"temperature": float("inf")}, "temperature must be finite; got inf"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1; got 0"),
    ],
)
def test_bad_settings_are_one_line_errors(model, tmp_path, kwargs, shown):
    settings = {"samples": 2, "seq_len": 8, **kwargs}
    for fn in (sample_sequences, teacher_sequences):
        with pytest.raises(ValueError) as info:
            fn(model, **settings, directory=tmp_path) if fn is teacher_sequences else fn(model, **settings)
        assert str(info.value) == shown


def test_healing_on_the_teachers_own_text(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path / "cache"))
    teacher = save_tiny_model_dir(tmp_path / "teacher", "llama")
    student = copy.deepcopy(teacher)
    compress(student, SVDLLMConfig(ratio=0.5), calibration=random_tokens(16, 48))
    config = _config(teacher=str(tmp_path / "teacher"), source="teacher")
    assert HealConfig.from_dict(config.to_dict()) == config
    # no corpus is read (the CLI draws none), so a corpus too short for the budget is no obstacle
    assert not config.calibrated and _config().calibrated
    with caplog.at_level(logging.WARNING, logger="lowrank.methods.base"):
        result = compress(student, config, calibration=random_tokens(40, SEQ_LEN))
    assert "method 'heal' reads no calibration text" in caplog.text  # corpus ids given are ignored, said
    assert result.details["heldout_loss_after"] < result.details["heldout_loss_before"]
    (stored,) = (tmp_path / "cache" / "synthetic").glob("*.pt")
    ids = _stored(stored)[:32]
    assert ids.shape == (32, SEQ_LEN)
    # trained on the teacher's own sequences (the same ones sampled again), not on the corpus
    assert torch.equal(
        ids, teacher_sequences(teacher, 32, SEQ_LEN, directory=tmp_path / "again", progress=False)
    )
    with pytest.raises(ValueError, match="'source' must be one of \\('corpus', 'teacher'\\); got 'web'"):
        HealConfig(teacher="self", source="web")
