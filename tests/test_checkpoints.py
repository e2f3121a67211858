"""Checkpoints never mix models or pass off a lost layer as done: faults injected into a finished run."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model, random_tokens

from lowrank.methods import SVDLLMConfig, compress
from lowrank.nn import LowRankLinear

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = SVDLLMConfig(ratio=0.25)


def _logits(model):
    with torch.no_grad():
        return model(random_tokens(2, 16, seed=9)).logits


@pytest.fixture
def finished(tmp_path):
    """A finished checkpointed run and the logits of its result."""
    model = make_tiny_model("llama")
    compress(model, CONFIG, calibration=random_tokens(16, 48), checkpoint_dir=tmp_path / "ckpt")
    return tmp_path / "ckpt", _logits(model)


def test_a_rerun_with_other_weights_of_the_same_config_is_refused(finished):
    ckpt, _ = finished
    with pytest.raises(ValueError, match="model weights"):
        compress(
            make_tiny_model("llama", seed=1), CONFIG, calibration=random_tokens(16, 48), checkpoint_dir=ckpt
        )
    swapped = make_tiny_model("llama")  # same embeddings, one decoder layer changed
    with torch.no_grad():
        swapped.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    with pytest.raises(ValueError, match="other weights \\(layer 0 differs\\)"):
        compress(swapped, CONFIG, calibration=random_tokens(16, 48), checkpoint_dir=ckpt)


@pytest.mark.parametrize("damage", ["delete", "truncate", "flip"])
def test_a_missing_or_damaged_layer_file_is_recomputed_bit_for_bit(finished, damage):
    ckpt, reference = finished
    path = ckpt / "layer_0000.safetensors"
    if damage == "delete":
        path.unlink()
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    else:
        data = bytearray(path.read_bytes())
        data[-1] ^= 1
        path.write_bytes(bytes(data))
    model = make_tiny_model("llama")
    result = compress(model, CONFIG, calibration=random_tokens(16, 48), checkpoint_dir=ckpt)
    assert torch.equal(_logits(model), reference)
    built = sum(isinstance(m, LowRankLinear) for m in model.modules())
    assert built == len([e for e in result.modules.values() if e.rank is not None]) == 14
    assert result.parameters_after == sum(p.numel() for p in model.parameters())


def test_a_damaged_progress_file_is_a_one_line_error(finished):
    ckpt, _ = finished
    (ckpt / "progress.json").write_text('{"records": ')
    with pytest.raises(ValueError, match="damaged checkpoint progress file") as info:
        compress(make_tiny_model("llama"), CONFIG, calibration=random_tokens(16, 48), checkpoint_dir=ckpt)
    assert "\n" not in str(info.value)


def test_other_calibration_tokens_are_refused(finished):
    ckpt, _ = finished
    with pytest.raises(ValueError, match="different configuration, calibration data or model weights"):
        compress(
            make_tiny_model("llama"), CONFIG, calibration=random_tokens(16, 48, seed=3), checkpoint_dir=ckpt
        )
