"""``method='quantize'``: HQQ through the backend adapter, on dense and factorized layers, stacked, saved."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from _tiny import save_tiny_model_dir
from conftest import make_tiny_model, random_tokens
from safetensors.torch import load_file
from torch import nn

import lowrank.nn.quantization as quantization
from lowrank.cli import main
from lowrank.loading.serialization import load_compressed, save_compressed
from lowrank.methods import QuantizeConfig, compress, config_from_dict, count_parameters, weight_bytes
from lowrank.nn import LowRankLinear, QuantizedLinear
from lowrank.nn.quantization import HQQBackend, get_backend

pytestmark = pytest.mark.usefixtures("one_thread")


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _factorized(model_type: str = "llama"):
    model = make_tiny_model(model_type)
    compress(model, config_from_dict({"method": "svd", "ratio": 0.3}))
    return model


def _hqq_twin(model: nn.Module, bits: int, group_size: int) -> nn.Module:
    """``model`` with every decoder ``nn.Linear`` replaced by HQQ's own ``HQQLinear`` (the library alone)."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    from lowrank.nn.surgery import replace_module

    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    for name in names:
        linear = model.get_submodule(name)
        cfg = BaseQuantizeConfig(nbits=bits, group_size=group_size, axis=1)
        replace_module(
            model, name, HQQLinear(linear, cfg, compute_dtype=torch.float32, device="cpu", del_orig=False)
        )
    return model


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_factorized_model_matches_the_library_quantizing_the_same_layers(bits):
    ids = random_tokens(2, 24)
    model = _factorized()
    twin = _hqq_twin(_factorized(), bits, 16)
    compress(model, QuantizeConfig(bits=bits, group_size=16, scale_dtype="float32"))
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) == len([m for m in twin.modules() if type(m).__name__ == "HQQLinear"]) > 0
    # the factors themselves were quantized (the low-rank layers keep their structure)
    lowrank = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert lowrank and all(isinstance(m.down, QuantizedLinear) for m in lowrank)
    torch.testing.assert_close(_logits(model, ids), _logits(twin, ids), rtol=1e-5, atol=1e-5)


def test_float16_scales_stay_within_the_library_error():
    ids = random_tokens(2, 24)
    dense = _factorized()
    reference = _logits(dense, ids)
    library = _logits(_hqq_twin(_factorized(), 4, 16), ids)
    model = _factorized()
    compress(model, QuantizeConfig(bits=4, group_size=16))
    ours = _logits(model, ids)
    library_error = (library - reference).norm()
    assert library_error > 0
    assert (ours - library).norm() < 0.05 * library_error  # float16 scales move the result by little
    assert (ours - reference).norm() < 1.05 * library_error


def test_error_falls_with_bits():
    ids = random_tokens(2, 24)
    reference = _logits(make_tiny_model(), ids)
    errors = []
    for bits in (2, 3, 4, 8):
        model = make_tiny_model()
        compress(model, QuantizeConfig(bits=bits, group_size=16))
        errors.append(float((_logits(model, ids) - reference).norm() / reference.norm()))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.01


@pytest.mark.parametrize("shape", [(37, 576), (64, 37), (1536, 37), (40, 100), (5, 3)])
def test_odd_shapes_are_padded_and_cropped(shape):
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(shape[1], shape[0], bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(shape, generator=g))
    for bits in (1, 2, 3, 4, 8):  # 1 and 2 bits pack 8 and 4 groups per row: the padding must cover both
        q = QuantizedLinear.from_linear(linear, bits=bits, group_size=64, backend=HQQBackend())
        assert q.weight.shape == shape
        err = float((q.weight - linear.weight).norm() / linear.weight.norm())
        assert err < {1: 2.0, 2: 0.6, 3: 0.3, 4: 0.15, 8: 0.01}[bits]
        x = torch.randn(3, shape[1], generator=g)
        torch.testing.assert_close(q(x), x @ q.weight.T + linear.bias)


def test_save_load_is_exact_and_bytes_are_the_stored_tensors(tmp_path):
    ids = random_tokens(2, 24)
    model = _factorized()
    params = count_parameters(model)
    result = compress(model, QuantizeConfig(bits=3, group_size=16))
    assert result.parameters_after == result.parameters_before == params  # weights represented, not lost
    assert result.weight_bytes_after < result.weight_bytes_before / 2
    out = save_compressed(model, tmp_path / "q")
    stored = load_file(str(out / "model.safetensors"))
    assert weight_bytes(model) == sum(t.numel() * t.element_size() for t in stored.values())
    loaded, _ = load_compressed(out)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    assert weight_bytes(loaded) == weight_bytes(model)
    # stacked history is recorded: svd, then quantize
    assert [m["method"] for m in loaded._lowrank_applied] == ["svd", "quantize"]


def test_dtype_casts_never_touch_what_is_stored():
    model = make_tiny_model()
    compress(model, QuantizeConfig(bits=4, group_size=16))
    before = weight_bytes(model) - sum(p.numel() * p.element_size() for p in model.parameters())
    q = next(m for m in model.modules() if isinstance(m, QuantizedLinear))
    scale = q.stored_tensors()["scale"].clone()
    model.to(torch.float64)
    assert weight_bytes(model) - sum(p.numel() * p.element_size() for p in model.parameters()) == before
    assert torch.equal(q.stored_tensors()["scale"], scale) and scale.dtype == torch.float16
    assert q.weight.dtype == torch.float64  # dequantized to the model's dtype


def test_quantize_after_a_kv_method_keeps_the_cache_and_reloads(tmp_path):
    ids = random_tokens(1, 16)
    model = make_tiny_model()
    compress(model, config_from_dict({"method": "kv-projection", "rank_fraction": 0.5}), calibration=ids)
    kv_before = compress(model, QuantizeConfig(bits=8, group_size=16))
    assert kv_before.kv_bytes_per_token_after == kv_before.kv_bytes_per_token_before
    assert any(isinstance(m, QuantizedLinear) for m in model.model.layers[0].self_attn.modules())
    loaded, _ = load_compressed(save_compressed(model, tmp_path / "kvq"))
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 5}, "bits=5 is not supported by the hqq backend; choose one of 1, 2, 3, 4, 8"),
        ({"bits": 0}, "field 'bits' must be a positive integer"),
        ({"group_size": 12}, "group_size must be a positive multiple of 8 for hqq; got 12"),
        ({"backend": "nope"}, "field 'backend' must be one of ('hqq',); got 'nope'"),
        ({"scale_dtype": "int8"}, "int8"),
    ],
)
def test_bad_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match="^[^\n]*$") as info:
        QuantizeConfig(**kwargs)
    assert message in str(info.value)


def test_nothing_left_to_quantize_and_non_linear_targets_are_refused():
    model = make_tiny_model()
    compress(model, QuantizeConfig(bits=8, group_size=16))
    with pytest.raises(ValueError, match="no plain nn.Linear left"):
        compress(model, QuantizeConfig(bits=8, group_size=16))
    factored = _factorized()
    with pytest.raises(ValueError, match="is a LowRankLinear; quantize replaces plain nn.Linear"):
        compress(factored, QuantizeConfig(bits=8, group_size=16, targets=("down_proj",)))


def test_missing_library_gives_the_install_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "hqq" else real(name, *a)
    )
    monkeypatch.setattr(
        quantization.importlib.metadata,
        "version",
        lambda name: (_ for _ in ()).throw(quantization.importlib.metadata.PackageNotFoundError(name)),
    )
    with pytest.raises(ValueError, match=r"pip install 'hqq==0.2.8.post1'"):
        get_backend("hqq").quantize(torch.ones(8, 8), 4, 8)


def test_cli_quantizes_and_refuses_bad_bits(tmp_path, capsys):
    save_tiny_model_dir(tmp_path / "tiny")
    out = tmp_path / "q"
    argv = ["compress", "--model", str(tmp_path / "tiny"), "--method", "quantize", "--group-size", "16"]
    assert main([*argv, "--bits", "4", "--out", str(out)]) == 0
    loaded, _ = load_compressed(out)
    assert sum(isinstance(m, QuantizedLinear) for m in loaded.modules()) == 14  # 2 layers × 7 linears
    capsys.readouterr()
    assert main([*argv, "--bits", "6", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "bits=6 is not supported" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()
