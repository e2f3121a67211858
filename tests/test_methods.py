"""compress(): every method on every tiny architecture, ratios, full-rank exactness, errors, reuse."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHITECTURES, make_tiny_model, random_tokens

from lowrank.calibration.statistics import Timings
from lowrank.linalg.whitening import output_loss
from lowrank.methods import (
    SVDConfig,
    SVDLLMConfig,
    SVDLLMV2Config,
    collect_gram_statistics,
    compress,
    config_from_dict,
)
from lowrank.nn import LowRankLinear

CONFIGS = {"svd": SVDConfig, "svd-llm": SVDLLMConfig, "svd-llm-v2": SVDLLMV2Config}
CALIB = dict(samples=16, seq=48)  # 768 tokens ≥ 4 × the largest input dimension (160)


pytestmark = pytest.mark.usefixtures("one_thread")


def _calibration(seed=0):
    return random_tokens(CALIB["samples"], CALIB["seq"], seed=seed)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("method", CONFIGS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_method_compresses_every_architecture(arch, method):
    model = make_tiny_model(arch)
    result = compress(model, CONFIGS[method](ratio=0.3), calibration=_calibration())
    lowrank = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert len(lowrank) == 14 and not result.details["dense_kept"]
    # ⌊·⌋ in the rank formula removes slightly more than asked, never less
    assert 0.3 <= result.details["ratio_params_removed"] < 0.36
    assert result.parameters_before - result.parameters_after == (
        result.details["linear_parameters_before"] - result.details["linear_parameters_after"]
    )
    assert result.parameters_after == sum(p.numel() for p in model.parameters())
    assert torch.isfinite(_logits(model, random_tokens(2, 16, seed=9))).all()
    assert result.fallbacks == 0 and result.time_total_s > 0


@pytest.mark.parametrize("method", CONFIGS)
def test_full_rank_reproduces_the_original_logits(method):
    ids = random_tokens(2, 16, seed=9)
    model = make_tiny_model("llama")
    reference = _logits(model, ids)
    config = CONFIGS[method](keep_singular_fraction=1.0, factorize_all=True)
    result = compress(model, config, calibration=_calibration())
    assert result.details["keep_singular_fraction"] == 1.0 and not result.details["dense_kept"]
    # factors of a float32 layer computed in float64: float32 rounding of the logits only
    torch.testing.assert_close(_logits(model, ids), reference, rtol=1e-4, atol=1e-5)


def test_keep_fraction_that_saves_nothing_keeps_matrices_dense():
    model = make_tiny_model("llama")
    result = compress(model, SVDConfig(keep_singular_fraction=0.7))
    # 0.7 of 64 singular values on 64×64 needs 44·128 > 64² parameters: kept dense and listed
    assert "model.layers.0.self_attn.q_proj" in result.details["dense_kept"]
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    assert result.modules["model.layers.0.self_attn.q_proj"].rank is None
    assert "model.layers.0.mlp.down_proj" not in result.details["dense_kept"]  # 160×64 still saves at rank 44


def test_whitening_beats_plain_svd_on_calibration_loss():
    ids = _calibration()
    losses = {}
    for method in ("svd", "svd-llm"):
        model = make_tiny_model("llama")
        original = model.model.layers[0].mlp.down_proj.weight.detach().clone()
        stats = collect_gram_statistics(make_tiny_model("llama"), ids)
        compress(model, CONFIGS[method](ratio=0.4), calibration=ids)
        new = model.model.layers[0].mlp.down_proj
        losses[method] = output_loss(
            original, new.up.weight @ new.down.weight, stats.per_layer[0]["mlp.down_proj"].gram
        )
    assert losses["svd-llm"] < 0.9 * losses["svd"]


def test_v2_keeps_each_group_budget_and_lowers_predicted_loss():
    ids = _calibration()
    v1 = compress(make_tiny_model("gemma2"), SVDLLMConfig(ratio=0.3), calibration=ids)
    v2_config = SVDLLMV2Config(ratio=0.3, allocation="greedy_relative")
    v2 = compress(make_tiny_model("gemma2"), v2_config, calibration=ids)
    assert v2.details["linear_parameters_after"] == v1.details["linear_parameters_after"]
    for kind in ("q", "k", "v", "o", "gate", "up", "down"):
        ranks = [e.rank for e in v2.modules.values() if e.role == kind]
        homogeneous = [e.rank for e in v1.modules.values() if e.role == kind]
        assert sum(ranks) == sum(homogeneous)
    groups = v2.details["allocation"]
    assert set(groups) == {"q", "k", "v", "o", "gate", "up", "down"}
    assert all(
        g["relative_loss_allocated"] <= g["relative_loss_homogeneous"] + 1e-12 for g in groups.values()
    )


def test_v2_uniform_allocation_is_svd_llm_through_the_two_round_route():
    ids, test = _calibration(), random_tokens(2, 16, seed=9)
    v1_model, v2_model = make_tiny_model("llama"), make_tiny_model("llama")
    v1 = compress(v1_model, SVDLLMConfig(ratio=0.3, truncation="eigh"), calibration=ids)
    v2 = compress(v2_model, SVDLLMV2Config(ratio=0.3, allocation="uniform"), calibration=ids)
    assert v2.ranks == v1.ranks and v2.details["allocation"] == {}
    torch.testing.assert_close(_logits(v2_model, test), _logits(v1_model, test), rtol=1e-6, atol=1e-6)


def test_precomputed_statistics_equal_a_non_sequential_run():
    ids, test = _calibration(), random_tokens(2, 16, seed=9)
    stats = collect_gram_statistics(make_tiny_model("qwen2"), ids)
    for config in (
        SVDLLMConfig(ratio=0.2, calibration={"sequential": False}),
        SVDLLMV2Config(ratio=0.2, allocation="uniform", calibration={"sequential": False}),
    ):  # (the default allocation measures the model's output: it needs token ids, not statistics)
        direct, reused = make_tiny_model("qwen2"), make_tiny_model("qwen2")
        compress(direct, config, calibration=ids)
        result = compress(reused, config, calibration=stats)
        assert result.calibration_tokens == ids.numel()
        torch.testing.assert_close(_logits(reused, test), _logits(direct, test), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="non-sequential"):
        compress(make_tiny_model("qwen2"), SVDLLMConfig(ratio=0.2), calibration=stats)


def test_non_positive_definite_gram_falls_back_and_is_counted():
    # 2 × 8 = 16 tokens for 64/160-dimensional inputs: every Gram is rank deficient
    model = make_tiny_model("llama")
    result = compress(model, SVDLLMConfig(ratio=0.3), calibration=random_tokens(2, 8))
    assert result.fallbacks == 14 and len(result.fallback_modules) == 14
    assert torch.isfinite(_logits(model, random_tokens(2, 16, seed=9))).all()
    v2 = compress(make_tiny_model("llama"), SVDLLMV2Config(ratio=0.3), calibration=random_tokens(2, 8))
    assert v2.fallbacks == 0  # the two-round route never needs Cholesky


def test_resume_through_compress_equals_uninterrupted(tmp_path, monkeypatch):
    import lowrank.methods.svd_llm as svd_llm

    ids, test = _calibration(), random_tokens(2, 16, seed=9)
    reference = make_tiny_model("mistral")
    compress(reference, SVDLLMV2Config(ratio=0.25), calibration=ids)
    original = svd_llm.truncate_layer

    def fail_on_layer_1(layer, targets, *args):
        if targets[0].layer == 1:
            raise KeyboardInterrupt
        return original(layer, targets, *args)

    monkeypatch.setattr("lowrank.methods.svd_llm.truncate_layer", fail_on_layer_1)
    with pytest.raises(KeyboardInterrupt):
        compress(
            make_tiny_model("mistral"), SVDLLMV2Config(ratio=0.25), calibration=ids, checkpoint_dir=tmp_path
        )
    monkeypatch.setattr("lowrank.methods.svd_llm.truncate_layer", original)
    resumed = make_tiny_model("mistral")
    result = compress(resumed, SVDLLMV2Config(ratio=0.25), calibration=ids, checkpoint_dir=tmp_path)
    assert torch.equal(_logits(resumed, test), _logits(reference, test))
    assert len(result.modules) == 14


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ratio": 1.2}, "1.2"),
        ({"ratio": -0.1}, "-0.1"),
        ({}, "exactly one"),
        ({"ratio": 0.2, "keep_singular_fraction": 0.5}, "exclusive"),
        ({"keep_singular_fraction": 0.0}, "0.0"),
        ({"ratio": 0.2, "truncation": "qr"}, "'qr'"),
        ({"ratio": 0.2, "calibration": {"samples": 0}}, "samples"),
        ({"ratio": 0.2, "calibration": {"sample": 8}}, "unknown calibration field"),
        ({"ratio": 0.2, "targets": ["q_proj", "q_proj"] + [3]}, "targets"),
    ],
)
def test_bad_config_values_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        SVDLLMConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_unmatched_targets_unsupported_modules_and_missing_calibration():
    with pytest.raises(ValueError, match="select no module"):
        compress(make_tiny_model("llama"), SVDConfig(ratio=0.2, targets=("no_such_proj",)))
    with pytest.raises(ValueError, match="LlamaMLP"):
        compress(make_tiny_model("llama"), SVDConfig(ratio=0.2, targets=("mlp",)))
    with pytest.raises(ValueError, match="outside the decoder layers"):
        compress(make_tiny_model("llama"), SVDConfig(ratio=0.2, targets=("lm_head",)))
    with pytest.raises(ValueError, match="calibration token ids"):
        compress(make_tiny_model("llama"), SVDLLMConfig(ratio=0.2))
    with pytest.raises(ValueError, match="no compression method"):
        compress(make_tiny_model("llama"), object())


def test_targets_and_ignore_select_modules():
    model = make_tiny_model("llama")
    result = compress(model, SVDConfig(ratio=0.2, targets=("re:.*mlp\\..*_proj",), ignore=("down_proj",)))
    assert sorted({e.role for e in result.modules.values()}) == ["gate", "up"]
    assert isinstance(model.model.layers[1].mlp.down_proj, torch.nn.Linear)


@pytest.mark.parametrize(
    "config",
    [
        SVDConfig(ratio=0.2, decomposer="rsvd"),
        SVDLLMConfig(keep_singular_fraction=0.5, targets=("q_proj",), calibration={"sequential": False}),
        SVDLLMV2Config(
            ratio=0.3,
            allocation="log_inverse",
            truncation="projection",
            calibration={"stat_dtype": "float32"},
        ),
    ],
)
def test_config_round_trips_through_dict(config):
    data = config.to_dict()
    assert config_from_dict(data) == config
    with pytest.raises(ValueError, match="unknown .* field"):
        config_from_dict({**data, "bogus": 1})
    with pytest.raises(ValueError, match="unknown method"):
        config_from_dict({**data, "method": "asvd"})


def test_timings_report_every_stage():
    result = compress(make_tiny_model("llama"), SVDLLMConfig(ratio=0.2), calibration=_calibration())
    for stage in ("calibration_forward", "gram_accumulation", "whitening", "decomposition"):
        assert result.timings[stage] > 0, stage
    assert result.timings["total"] == result.time_total_s
    summary = result.summary()
    for key in (
        "method",
        "decomposer",
        "ratio_params_removed",
        "keep_singular_fraction",
        "parameters_before",
        "parameters_after",
        "time_total_s",
        "time_decomposition_s",
        "fallbacks",
        "weight_bytes_before",
        "kv_bytes_per_token_after",
    ):
        assert key in summary
    assert isinstance(Timings().to_dict(), dict)
