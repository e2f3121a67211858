"""Healing: a distillation fine-tune lowers the loss of a compressed model without changing its structure,
resumes bit for bit after an interruption, and refuses bad settings in one line."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from _tiny import save_tiny_model_dir, tiny_text, tiny_tokenizer
from conftest import make_tiny_model, random_tokens

import lowrank.training.checkpoints as checkpoints
import lowrank.training.healing as heal_module
from lowrank.attention.cache import kv_bytes_per_token
from lowrank.attention.deepseek_mla import DEEPSEEK_MLA_LEARNING_RATE
from lowrank.attention.low_rank_kv import CODEC_LEARNING_RATE
from lowrank.attention.wrapper import ATTENTION_LEARNING_RATE
from lowrank.cli import main
from lowrank.loading.serialization import load_compressed, read_manifest, save_compressed
from lowrank.methods import (
    HealConfig,
    KVProjectionConfig,
    MLAConfig,
    SVDLLMConfig,
    applied_methods,
    compress,
    count_parameters,
)
from lowrank.training.healing import autocast_dtype, fast_bfloat16, heal
from lowrank.training.losses import distillation_loss, hidden_state_loss
from lowrank.training.trainable import (
    LEARNING_RATE,
    default_learning_rate,
    resolve_trainable,
    trainable_parameters,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ_LEN = 32


def _config(**overrides) -> HealConfig:
    # kd_weight 1: the random tokens carry no next-token signal, only the teacher's logits do
    settings = dict(
        teacher="self",
        tokens=24 * SEQ_LEN,
        batch_size=4,
        heldout_sequences=8,
        eval_every=2,
        patience=10,
        kd_weight=1.0,
        learning_rate=3e-4,
        precision="float32",
        calibration={"seq_len": SEQ_LEN},
    )
    return HealConfig(**{**settings, **overrides})


def _mha2mla() -> MLAConfig:
    """MHA2MLA's recipe: a LatentKV codec inside the shared attention wrapper (q/k/v/o kept)."""
    return MLAConfig(partial_rope="mha2mla", rope_dim=4, kv_rank=8)


def _ids() -> torch.Tensor:
    return random_tokens(32, SEQ_LEN, seed=3)


def _compressed(teacher, method=None):
    student = copy.deepcopy(teacher)
    compress(student, method or SVDLLMConfig(ratio=0.5), calibration=random_tokens(16, 48))
    return student


@pytest.fixture
def pair():
    teacher = make_tiny_model("llama")
    return teacher, _compressed(teacher)


def _kl(student, teacher, ids) -> float:
    with torch.no_grad():
        loss, _, _ = distillation_loss(
            student(ids).logits, teacher(ids).logits, ids, temperature=1.0, kd_weight=1.0
        )
    return float(loss)


def _ranks(model) -> dict[str, int]:
    return {name: m.rank for name, m in model.named_modules() if hasattr(m, "rank")}


def test_healing_lowers_training_and_heldout_loss(pair):
    teacher, student = pair
    ids, config = _ids(), _config()
    train = ids[: config.training_sequences(SEQ_LEN)]
    before = _kl(student, teacher, train)
    details = heal(student, teacher, ids, config, progress=False)
    assert _kl(student, teacher, train) < before
    assert details["heldout_loss_after"] < details["heldout_loss_before"]
    assert details["heldout_loss_after"] == pytest.approx(_kl(student, teacher, ids[-8:]), rel=1e-5)
    assert details["steps"] == math.ceil(24 / 4) and details["tokens_trained"] == 24 * SEQ_LEN
    curve = details["heldout_curve"]  # every held-out evaluation, the one before training first
    assert [e["step"] for e in curve] == [0, *range(config.eval_every, 6, config.eval_every), 6]
    assert curve[0]["loss"] == details["heldout_loss_before"]
    assert min(e["loss"] for e in curve) == details["heldout_loss_after"]


@pytest.mark.parametrize("rows", [1, 3, 14, 1000])  # a token a chunk, a remainder, exactly one, less
@pytest.mark.parametrize(("kd_weight", "T"), [(0.0, 1.0), (0.9, 1.0), (0.9, 2.0), (1.0, 0.5)])
def test_the_chunked_loss_and_its_gradient_equal_autograd_over_the_whole_batch(rows, kd_weight, T):
    batch, seq, vocab = 2, 7, 11
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(batch, seq, vocab, generator=gen, dtype=torch.float64) * 3
    teacher = torch.randn(batch, seq, vocab, generator=gen, dtype=torch.float64) * 3
    ids = torch.randint(vocab, (batch, seq), generator=gen)
    # the objective written out over the whole batch
    z = logits.clone().requires_grad_(True)
    ce = F.cross_entropy(z[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    log_s, log_t = F.log_softmax(z / T, -1), F.log_softmax(teacher / T, -1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1).mean() * T * T
    expected = kd_weight * kl + (1 - kd_weight) * ce
    (expected * 0.5).backward()  # a scaled loss: the upstream gradient is not 1
    # in chunks of `rows` tokens (4 bytes a logit)
    chunked = logits.clone().requires_grad_(True)
    loss, got_kl, got_ce = distillation_loss(
        chunked, teacher, ids, temperature=T, kd_weight=kd_weight, chunk_bytes=4 * vocab * rows
    )
    (loss * 0.5).backward(retain_graph=True)
    torch.testing.assert_close(got_ce.double(), ce.detach(), rtol=1e-5, atol=1e-6)
    if kd_weight:
        torch.testing.assert_close(got_kl.double(), kl.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked.grad, z.grad, rtol=1e-4, atol=1e-7)
    with pytest.raises(RuntimeError, match="already backpropagated"):
        loss.backward()
    with pytest.raises(ValueError, match="at least 2 tokens; got 1"):
        distillation_loss(logits[:, :1], teacher[:, :1], ids[:, :1], temperature=T, kd_weight=kd_weight)


def _hidden(student, teacher, ids) -> float:
    with torch.no_grad():
        s = student(ids, output_hidden_states=True).hidden_states[1:]
        t = teacher(ids, output_hidden_states=True).hidden_states[1:]
    return float(hidden_state_loss(s, t))


def test_the_hidden_state_error_is_relative_per_token_and_averaged_over_layers():
    t = [torch.tensor([[[3.0, 4.0], [300.0, 400.0]]]), torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])]
    # layer 0: token errors 1²/25 and (100² + 100²)/250000 = 0.04 and 0.08; layer 1: 0 and 1/4
    s = [t[0] + torch.tensor([[[1.0, 0.0], [100.0, 100.0]]]), t[1] + torch.tensor([[[0.0, 0.0], [1.0, 0.0]]])]
    assert float(hidden_state_loss(s, t)) == pytest.approx(((0.04 + 0.08) / 2 + 0.25 / 2) / 2)
    assert float(hidden_state_loss(t, t)) == 0.0
    scaled = [x * 1000 for x in s], [x * 1000 for x in t]
    assert float(hidden_state_loss(*scaled)) == pytest.approx(float(hidden_state_loss(s, t)))
    with pytest.raises(ValueError, match="got 2 and 1") as info:
        hidden_state_loss(s, t[:1])
    with pytest.raises(ValueError, match=r"got \(1, 2, 2\) \(student\) and \(1, 2, 3\)"):
        hidden_state_loss(s[:1], [torch.zeros(1, 2, 3)])
    assert "\n" not in str(info.value)


def test_hidden_state_matching_heals_the_residual_stream(pair):
    teacher, student = pair
    ids, heldout = _ids(), _ids()[-8:]
    logits_only = heal(copy.deepcopy(student), teacher, ids, _config(), progress=False)
    assert logits_only["heldout_hidden_before"] == logits_only["heldout_hidden_after"] == 0.0  # not computed
    before = _hidden(student, teacher, heldout)
    details = heal(student, teacher, ids, _config(hidden_weight=1.0), progress=False)
    assert details["heldout_hidden_before"] == pytest.approx(before, rel=1e-5)
    assert details["heldout_hidden_after"] == pytest.approx(_hidden(student, teacher, heldout), rel=1e-5)
    assert details["heldout_hidden_after"] < details["heldout_hidden_before"]
    # the held-out loss is the whole objective: KL (kd_weight 1) plus the hidden-state term
    assert details["heldout_loss_after"] == pytest.approx(
        _kl(student, teacher, heldout) + details["heldout_hidden_after"], rel=1e-5
    )
    assert details["heldout_loss_before"] > logits_only["heldout_loss_before"]


def test_bfloat16_autocast_heals_while_parameters_stay_float32(pair):
    teacher, student = pair
    ids = _ids()
    before = _kl(student, teacher, ids[-8:])
    float32 = heal(copy.deepcopy(student), teacher, ids, _config(), progress=False)
    details = heal(student, teacher, ids, _config(precision="bfloat16"), progress=False)
    assert details["compute_dtype"] == "bfloat16" and float32["compute_dtype"] == "float32"
    assert details["heldout_loss_after"] < details["heldout_loss_before"]
    # the held-out loss is measured under bfloat16 too: close to, but not exactly, the float32 one
    assert details["heldout_loss_before"] == pytest.approx(float32["heldout_loss_before"], rel=0.05)
    assert details["heldout_loss_before"] != float32["heldout_loss_before"]
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert _kl(student, teacher, ids[-8:]) < before  # and in float32 compute the student is closer too


def test_the_default_learning_rate_follows_what_trains():
    teacher = make_tiny_model("llama")
    kv = _compressed(teacher, KVProjectionConfig(**KVProjectionConfig.example))
    mla = _compressed(teacher, _mha2mla())
    both = _compressed(kv, SVDLLMConfig(ratio=0.5))
    assert default_learning_rate(kv) == CODEC_LEARNING_RATE < LEARNING_RATE < ATTENTION_LEARNING_RATE
    assert default_learning_rate(kv, "all") == default_learning_rate(mla, "replaced") == LEARNING_RATE
    assert default_learning_rate(mla) == default_learning_rate(kv, "attention") == ATTENTION_LEARNING_RATE
    assert default_learning_rate(both) == default_learning_rate(both, "attention") == LEARNING_RATE
    deepseek = _compressed(teacher, MLAConfig(**MLAConfig.example))  # mla's default, DeepSeek layout
    assert resolve_trainable(deepseek) == "attention"
    assert default_learning_rate(deepseek) == DEEPSEEK_MLA_LEARNING_RATE < ATTENTION_LEARNING_RATE
    details = heal(kv, teacher, _ids(), _config(learning_rate=None, tokens=4 * SEQ_LEN), progress=False)
    assert details["learning_rate"] == CODEC_LEARNING_RATE


def test_auto_trains_the_converted_attention_only_after_partial_rope():
    teacher = make_tiny_model("llama")
    kv = _compressed(teacher, KVProjectionConfig(**KVProjectionConfig.example))
    mla = _compressed(teacher, MLAConfig(**MLAConfig.example))
    svd = _compressed(teacher)
    assert [resolve_trainable(m) for m in (kv, mla, svd)] == ["replaced", "attention", "replaced"]
    assert resolve_trainable(mla, "replaced") == "replaced" and resolve_trainable(kv, "all") == "all"
    assert trainable_parameters(mla).keys() == trainable_parameters(mla, "attention").keys()
    assert trainable_parameters(kv).keys() == trainable_parameters(kv, "replaced").keys()
    details = heal(mla, teacher, _ids(), _config(trainable="auto", tokens=4 * SEQ_LEN), progress=False)
    assert details["trainable"] == "attention"
    assert details["trainable_parameters"] == sum(p.numel() for p in trainable_parameters(mla).values())
    with pytest.raises(ValueError, match="got 'norms'"):
        resolve_trainable(mla, "norms")


def test_auto_precision_follows_the_device():
    assert autocast_dtype("float32", "cpu") is None
    assert autocast_dtype("bfloat16", "cpu") is torch.bfloat16
    assert autocast_dtype("auto", "cpu") is (torch.bfloat16 if fast_bfloat16("cpu") else None)
    assert autocast_dtype("auto", "meta") is None
    with pytest.raises(ValueError, match="got 'fp8'"):
        autocast_dtype("fp8", "cpu")


@pytest.mark.parametrize(
    ("method", "trainable"),
    [
        (SVDLLMConfig(ratio=0.5), "replaced"),
        (_mha2mla(), "replaced"),
        (_mha2mla(), "attention"),
    ],
)
def test_only_replaced_parameters_change_and_the_structure_is_kept(method, trainable):
    teacher = make_tiny_model("llama")
    student = _compressed(teacher, method)
    trained = set(trainable_parameters(student, trainable))
    if isinstance(method, MLAConfig):
        layers = teacher.config.num_hidden_layers
        codecs = {name for name in trained if ".self_attn.kv." in name}
        assert len(codecs) == layers  # the codec trains (one latent per layer) ...
        if trainable == "replaced":  # ... and the q/k/v/o weights it shares stay as they were
            assert trained == codecs
        else:  # ... and so do the converted layers' q/k/v/o, nothing outside attention
            projections = {
                f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(layers) for p in "qkvo"
            }
            assert projections <= trained and all(".self_attn." in name for name in trained)
    state = {k: v.clone() for k, v in student.state_dict().items()}
    ranks, size, kv = _ranks(student), count_parameters(student), kv_bytes_per_token(student)
    heal(student, teacher, _ids(), _config(trainable=trainable), progress=False)
    after = student.state_dict()
    for name, value in state.items():
        if name not in trained:
            assert torch.equal(after[name], value), name
    assert any(not torch.equal(after[name], state[name]) for name in trained)
    assert _ranks(student) == ranks and count_parameters(student) == size
    assert kv_bytes_per_token(student) == kv
    assert all(p.requires_grad for p in student.parameters())  # flags restored


def test_resume_after_an_interruption_equals_an_uninterrupted_run(pair, tmp_path, monkeypatch):
    teacher, student = pair
    ids, config = _ids(), _config(checkpoint_minutes=0)
    uninterrupted = copy.deepcopy(student)
    expected = heal(uninterrupted, teacher, ids, config, progress=False)

    real_step, calls = heal_module._train_step, []

    def interrupted_step(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(heal_module, "_train_step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        heal(copy.deepcopy(student), teacher, ids, config, checkpoint_dir=tmp_path, progress=False)
    monkeypatch.setattr(heal_module, "_train_step", real_step)
    # resumed where precision 'auto' means float32 too: the compute is what must match, not the words
    monkeypatch.setattr(heal_module, "fast_bfloat16", lambda device: False)
    resumed = copy.deepcopy(student)
    auto = dataclasses.replace(config, precision="auto")
    details = heal(resumed, teacher, ids, auto, checkpoint_dir=tmp_path, progress=False)
    assert details["resumed_from_step"] == 3
    for name, value in uninterrupted.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    volatile = ("resumed_from_step", "train_time_s")
    assert {k: v for k, v in details.items() if k not in volatile} == {
        k: v for k, v in expected.items() if k not in volatile
    }
    with pytest.raises(checkpoints.CheckpointError, match="another healing run") as info:
        heal(copy.deepcopy(student), teacher, ids, _config(learning_rate=1e-4), checkpoint_dir=tmp_path)
    # the refusal names what differs, here the learning rate as configured and as used
    assert "learning_rate: 0.0003 there, 0.0001 here" in str(info.value)
    assert "peak_learning_rate: 0.0003 there, 0.0001 here" in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(checkpoints.CheckpointError, match="other training text or starting weights"):
        heal(copy.deepcopy(student), teacher, ids.flip(0), config, checkpoint_dir=tmp_path)
    (tmp_path / checkpoints.CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoints.CheckpointError, match="damaged healing checkpoint.*delete it") as info:
        heal(copy.deepcopy(student), teacher, ids, config, checkpoint_dir=tmp_path, progress=False)
    assert "\n" not in str(info.value)


def test_early_stopping_keeps_the_best_heldout_state(pair):
    teacher, student = pair
    details = heal(student, teacher, _ids(), _config(learning_rate=0.5, eval_every=1, patience=1))
    assert details["stopped_early"] and details["steps"] < details["steps_planned"]
    assert details["heldout_loss_after"] <= details["heldout_loss_before"]
    assert details["heldout_loss_after"] == pytest.approx(_kl(student, teacher, _ids()[-8:]), rel=1e-5)


@pytest.mark.parametrize(
    ("overrides", "shown"),
    [
        ({"tokens": 0}, "got 0"),
        ({"tokens": 2.5}, "got 2.5"),
        ({"learning_rate": 0.0}, "got 0.0"),
        ({"learning_rate": -1e-3}, "got -0.001"),
        ({"learning_rate": float("nan")}, "got nan"),
        ({"kd_weight": 1.5}, "got 1.5"),
        ({"temperature": 0}, "got 0"),
        ({"hidden_weight": -1.0}, "got -1.0"),
        ({"hidden_weight": float("inf")}, "got inf"),
        ({"trainable": "norms"}, "got 'norms'"),
        ({"precision": "float16"}, "got 'float16'"),
        ({"teacher": ""}, "got ''"),
        ({"calibration": {"samples": 7, "seq_len": SEQ_LEN}}, "samples=7"),
    ],
)
def test_bad_settings_are_one_line_errors(overrides, shown):
    with pytest.raises(ValueError) as info:
        _config(**overrides)
    assert shown in str(info.value) and "\n" not in str(info.value)


def test_the_config_round_trips_and_derives_its_calibration_samples():
    config = _config()
    assert config.calibration.samples == 24 + 8
    assert HealConfig.from_dict(config.to_dict()) == config


def test_mismatched_vocabularies_and_too_little_text_are_one_line_errors(pair):
    teacher, student = pair
    with pytest.raises(ValueError, match="vocabularies differ") as info:
        heal(student, make_tiny_model("llama", vocab_size=300), _ids(), _config())
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="needs 40 sequences") as info:
        heal(student, teacher, _ids(), _config(tokens=32 * SEQ_LEN))
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="no compressed modules"):
        compress(make_tiny_model("llama"), _config(), calibration=_ids())


def test_a_stacked_heal_step_is_recorded_saved_and_reloaded(tmp_path):
    teacher = save_tiny_model_dir(tmp_path / "teacher", "qwen2")
    student = _compressed(teacher)
    kv = kv_bytes_per_token(student)
    result = compress(student, _config(teacher=str(tmp_path / "teacher")), calibration=_ids())
    assert result.parameters_after == result.parameters_before
    assert result.kv_bytes_per_token_after == result.kv_bytes_per_token_before == kv
    assert result.details["heldout_loss_after"] < result.details["heldout_loss_before"]
    assert [m["method"] for m in applied_methods(student)] == ["svd-llm", "heal"]
    save_compressed(student, tmp_path / "healed")
    assert read_manifest(tmp_path / "healed")["methods"][-1]["teacher"] == str(tmp_path / "teacher")
    loaded, _ = load_compressed(tmp_path / "healed")
    ids = random_tokens(2, 16, seed=9)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, student(ids).logits)


def test_cli_heals_a_saved_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path / "cache"))
    teacher = save_tiny_model_dir(tmp_path / "teacher", "llama")
    save_compressed(_compressed(teacher), tmp_path / "small", tokenizer=tiny_tokenizer())
    (tmp_path / "text.txt").write_text(tiny_text(4000), encoding="utf-8")
    common = ["--model", str(tmp_path / "small"), "--teacher", str(tmp_path / "teacher")]
    common += ["--data", str(tmp_path / "text.txt"), "--calib-seq-len", str(SEQ_LEN), "--device", "cpu"]
    flags = ["--tokens", "512", "--heldout-sequences", "4", "--kd-weight", "1", "--learning-rate", "3e-4"]
    assert main(["heal", *common, *flags, "--out", str(tmp_path / "healed")]) == 0
    assert "heldout loss after" in capsys.readouterr().out
    loaded, _ = load_compressed(tmp_path / "healed")
    assert [m["method"] for m in applied_methods(loaded)] == ["svd-llm", "heal"]
    assert main(["heal", *common, "--tokens", "0"]) == 2
    assert "field 'tokens' must be a positive integer; got 0" in capsys.readouterr().err
    # the teacher writes its own text: a corpus far too short for the budget is never read
    (tmp_path / "short.txt").write_text(tiny_text(20), encoding="utf-8")
    short = [*common[:4], "--data", str(tmp_path / "short.txt"), *common[6:]]
    assert main(["heal", *short, *flags, "--source", "teacher", "--out", str(tmp_path / "sampled")]) == 0
    assert main(["heal", *short, *flags, "--out", str(tmp_path / "corpus")]) == 2
    assert "text has 20 tokens but 20 samples x 32 tokens need 640" in capsys.readouterr().err
    assert main(["heal", *common, "--learning-rate", "-1"]) == 2
    assert "field 'learning_rate' must be in (0, 1]; got -1.0" in capsys.readouterr().err
