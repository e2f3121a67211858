"""mla's rorope path (DeepSeek-V3 layout): RoRoPE commutes with RoPE at one frequency per block, exact
conversion of MQA at full size, a cache of latent + rotary key only, fewer parameters, save/load, errors."""

from __future__ import annotations

import pytest
import torch
from _decoding import decoded, logits
from conftest import make_tiny_model, random_tokens

from lowrank.attention.deepseek_mla import DeepseekLatentAttention, LatentRopeCache
from lowrank.evaluation.memory import memory_report
from lowrank.linalg.rorope import rope_ladder, rorope
from lowrank.loading.export_deepseek import stock_rope_theta
from lowrank.loading.serialization import load_compressed, save_compressed
from lowrank.methods import MLAConfig, compress, count_parameters
from lowrank.methods.mla_rorope import resolved_freqfold

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = random_tokens(2, 24, seed=5)
CALIB = random_tokens(16, 48)
EXACT_FAMILIES = ("llama", "qwen2", "mistral", "gemma", "gemma2")  # every family without q/k norms


def _gram(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * n, n, generator=g, dtype=torch.float64) * torch.logspace(
        0, -2, n, dtype=torch.float64
    )
    return X.T @ X


def _pairs(rope: int, D: int) -> list[tuple[int, int]]:
    """(real row, imaginary row) pairs of rorope's output layout."""
    return [(j, j + rope // 2) for j in range(rope // 2)] + [(a, a + 1) for a in range(rope, D, 2)]


def _score(q, k, omega, t_q, t_k):
    """Σ_pairs Re(q̃ · conj(k̃) · exp(iω(t_q − t_k))): a query-key product after RoPE at each pair's ω."""
    return sum(
        (q[a] + 1j * q[b]) * (k[a] - 1j * k[b]) * torch.exp(1j * w * (t_q - t_k)) for (a, b), w in omega
    ).real


@pytest.mark.parametrize("rotation", ["key", "query-aware"])
def test_rorope_commutes_with_rope_at_one_frequency_per_block_and_not_beyond(rotation):
    H, d, rope = 3, 8, 4
    D, half = H * d, d // 2
    theta = 10.0 ** -torch.arange(half, dtype=torch.float64)  # well-separated frequencies
    Ck, Cq = _gram(D, 0), _gram(D, 1)
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(D, generator=g, dtype=torch.float64), torch.randn(D, generator=g, dtype=torch.float64)
    # the original score: every head's frequency i turns at θ_i (rotate-half: features i and i + d/2)
    original = [((h * d + i, h * d + i + half), theta[i]) for h in range(H) for i in range(half)]
    for fold, exact in ((1, True), (2, False)):
        A, B = rorope(
            Ck,
            num_kv_heads=H,
            head_dim=d,
            rope_dim=rope,
            freqfold=fold,
            query_gram=Cq if rotation == "query-aware" else None,
        )
        torch.testing.assert_close(B.T @ A, torch.eye(D, dtype=torch.float64), atol=1e-8, rtol=0)
        omega = []
        for a, b in _pairs(rope, D):  # the frequency a row pair turns at: the one its columns read
            freqs = sorted({int(c) % d % half for c in A[a].nonzero().flatten()})
            omega.append(((a, b), theta[freqs[0]]))
            assert len(freqs) == (1 if exact else 2)
        for a, _ in omega[: rope // 2]:  # the rotary key turns at DeepSeek's ladder
            assert {int(c) % d % half for c in A[a[0]].nonzero().flatten()} <= set(range(half))
        new = _score(B @ q, A @ k, omega, 7.0, 2.0)
        old = _score(q, k, original, 7.0, 2.0)
        assert (abs(new - old) < 1e-9) == exact


def test_rope_ladder_is_deepseeks_frequency_ladder():
    base, d, rope = 10000.0, 64, 16
    kept = rope_ladder(d, rope)
    original = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    deepseek = base ** (-torch.arange(0, rope, 2, dtype=torch.float64) / rope)
    torch.testing.assert_close(original[kept], deepseek)


@pytest.mark.parametrize(
    ("rope", "stride", "kept"), [(8, None, [0, 4, 8, 12]), (8, 1, [0, 1, 2, 3]), (12, 2, [0, 2, 4, 6, 8, 10])]
)
def test_a_strided_ladder_is_a_stock_ladder_with_another_base(rope, stride, kept):
    """Every stride keeps frequencies j·s from the fastest, which a stock rotary key of width rope turns at
    with the base export writes (stock_rope_theta): the same angles, to float64 rounding."""
    base, d = 10000.0, 32
    assert rope_ladder(d, rope, stride).tolist() == kept
    original = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    stock = stock_rope_theta(base, d, kept) ** (-torch.arange(0, rope, 2, dtype=torch.float64) / rope)
    torch.testing.assert_close(original[kept], stock, rtol=1e-12, atol=0)


@pytest.mark.parametrize("arch", EXACT_FAMILIES)
def test_mqa_with_every_component_rotary_and_a_full_latent_is_exact(arch):
    model = make_tiny_model(arch, num_key_value_heads=1)
    reference = logits(model, IDS)
    compress(model, MLAConfig(rope_dim=16, kv_lora_rank=16), calibration=CALIB)
    assert all(not hasattr(m, "k_proj") for m in model.modules() if isinstance(m, DeepseekLatentAttention))
    torch.testing.assert_close(logits(model, IDS), reference, rtol=1e-4, atol=1e-4)


def test_gqa_full_latent_at_full_nope_width_equals_partial_rope_alone_and_rotation_matters():
    """At full latent rank and qk_nope_dim = head_dim only the RoPE choice loses; RoRoPE loses less than
    putting the shared rotary key on an unrotated head (freqfold 1 beats 8 here too: exact blocks)."""
    errors = {}
    for fold in (1, 8):
        model = make_tiny_model("llama")
        reference = logits(model, IDS)
        compress(
            model, MLAConfig(rope_dim=8, kv_lora_rank=56, qk_nope_dim=16, freqfold=fold), calibration=CALIB
        )
        errors[fold] = float((logits(model, IDS) - reference).abs().max())
    assert 0 < errors[1] < 0.1 and errors[1] < errors[8] * 1.5


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_the_cache_holds_latent_plus_rotary_key_and_decodes_like_the_forward(arch):
    model = make_tiny_model(arch)
    result = compress(model, MLAConfig(rope_dim=4, kv_lora_rank=12), calibration=CALIB)
    stepwise, cache = decoded(model, IDS)
    assert isinstance(cache, LatentRopeCache)
    torch.testing.assert_close(stepwise, logits(model, IDS), rtol=1e-4, atol=1e-4)
    for layer in cache.layers:  # measured on the cache object: one "head" of [latent r, rotary key ρ]
        assert layer.keys.shape == (2, 1, IDS.shape[1], 12 + 4) and layer.values.shape == (
            2,
            1,
            IDS.shape[1],
            0,
        )
    expected = 2 * (12 + 4) * 4  # layers × (latent + rotary key) × float32
    assert result.kv_bytes_per_token_after == memory_report(model).kv_cache_bytes_per_token == expected
    out = model.generate(IDS[:1, :8], max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert isinstance(out.cache, LatentRopeCache) and out.cache.layers[0].keys.shape[-1] == 12 + 4


def test_the_converted_attention_has_fewer_parameters_at_a_real_budget():
    model = make_tiny_model("llama", num_key_value_heads=4, hidden_size=128)
    before = count_parameters(model)
    compress(model, MLAConfig(rope_dim=8, kv_fraction=0.3125), calibration=random_tokens(16, 64))
    assert count_parameters(model) < before


def test_the_converted_model_reloads_bit_for_bit(tmp_path):
    model = make_tiny_model("llama")
    compress(
        model, MLAConfig(rope_dim=4, kv_lora_rank=12, rotation="query-aware", freqfold=2), calibration=CALIB
    )
    save_compressed(model, tmp_path / "m")
    loaded, _ = load_compressed(tmp_path / "m")
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))
    assert memory_report(loaded).kv_cache_bytes_per_token == 2 * 16 * 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kv_rank": 8}, "kv_rank=8 belongs to partial_rope='mha2mla'"),
        ({"partial_rope": "mha2mla", "kv_lora_rank": 8}, "kv_lora_rank=8 belongs to partial_rope='rorope'"),
        ({"freqfold": 0}, "field 'freqfold' must be a positive integer; got 0"),
        ({"rotation": "both"}, "'both'"),
        ({"kv_lora_rank": 8, "kv_fraction": 0.5}, "not both"),
    ],
)
def test_bad_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        MLAConfig(**kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("arch", "kwargs", "message"),
    [
        ("llama", {"rope_dim": 18}, r"rope_dim must be even and in \[2, head_dim\] = \[2, 16\]; got 18"),
        ("llama", {"rope_dim": 6, "rope_stride": 3}, r"rope_stride must be an integer in \[1, 2\]"),
        ("llama", {"rope_dim": 4, "freqfold": 3}, r"freqfold must be one of \[1, 2, 4, 8\]"),
        ("llama", {"rope_dim": 4, "kv_lora_rank": 61}, r"kv_lora_rank must be in \[1, 60\]"),
        ("qwen3", {"rope_dim": 4}, "normalised"),
    ],
)
def test_what_does_not_fit_is_refused_before_any_work(arch, kwargs, message):
    model = make_tiny_model(arch)
    with pytest.raises(ValueError, match=message) as info:
        compress(model, MLAConfig(**kwargs), calibration=CALIB)
    assert "\n" not in str(info.value)
    assert not any(isinstance(m, DeepseekLatentAttention) for m in model.modules())


@pytest.mark.parametrize(
    ("kwargs", "head_dim", "fold"),
    [
        ({"rope_dim": 32}, 64, 4),  # spread ladder (stride 2): blocks of 4 keep 2 rotary components
        ({"rope_dim": 32, "rope_stride": 1}, 64, 1),  # every kept frequency is its own block
        ({"rope_dim": 64}, 64, 1),  # every frequency rotary: folding could only mix them
        ({"rope_dim": 4}, 12, 1),  # 4 does not divide head_dim/2 = 6
        ({"rope_dim": 32, "freqfold": 2}, 64, 2),
    ],
)
def test_the_default_freqfold_folds_only_where_the_ladder_skips_frequencies(kwargs, head_dim, fold):
    assert resolved_freqfold(MLAConfig(**kwargs), head_dim) == fold


def test_a_version_1_config_keeps_transmlas_settings():
    """Saved before the defaults moved to the calibration-chosen ones: what a version-1 config left out
    meant the spread ladder, freqfold 1 and the key/value latent; a new config gets the new defaults."""
    old = MLAConfig.from_dict({"method": "mla", "version": 1, "rope_dim": 32, "kv_lora_rank": 88})
    assert (old.rope_stride, old.freqfold, old.latent_objective) == (None, 1, "kv")
    new = MLAConfig.from_dict(MLAConfig(rope_dim=32, kv_lora_rank=88).to_dict())
    assert (new.freqfold, new.latent_objective) == (None, "attention")
    assert new.to_dict()["version"] == 2
